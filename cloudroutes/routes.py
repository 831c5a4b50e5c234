"""Entries, plans and the route-table protocol shared by kernel and cloud tables.

A route table holds at most one entry per key. For plain routes the key is the destination;
a richer entry (a vxlan peer: neighbour, FDB entry and route, applied in order) has a key of its
own. A table reports and changes only the entries it owns; everything else it may report as
*foreign* (a conflict, or a route it may adopt), but the reconciler never changes it.

Cloud tables are neither synchronous nor strongly consistent, so the protocol carries what they
need: an entry's state (active, pending, broken), the table's capacity, outcomes that say
"accepted, not done yet", and limits on how much one pass may do.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Protocol, runtime_checkable

from cloudroutes.errors import RouteError

Destination = IPv4Network | IPv6Network
EntryKey = Hashable


class KeyedIPv4Network(IPv4Network):
    """An IPv4Network that computes its hash once. Destinations are dict keys many times in
    every pass, and IPv4Network works its hash out from scratch at each use."""

    def __hash__(self) -> int:
        try:
            return self.__dict__["_hash"]  # type: ignore[no-any-return]
        except KeyError:
            value = self.__dict__["_hash"] = super().__hash__()
            return value

    def __repr__(self) -> str:
        return f"IPv4Network('{self}')"


class KeyedIPv6Network(IPv6Network):
    """KeyedIPv4Network's IPv6 twin."""

    def __hash__(self) -> int:
        try:
            return self.__dict__["_hash"]  # type: ignore[no-any-return]
        except KeyError:
            value = self.__dict__["_hash"] = super().__hash__()
            return value

    def __repr__(self) -> str:
        return f"IPv6Network('{self}')"


class Entry(Protocol):
    """What a route table holds. Entries compare by value, ignoring ``lease_key``."""

    @property
    def key(self) -> EntryKey: ...

    @property
    def lease_key(self) -> str: ...

    def sort_key(self) -> tuple[Any, ...]: ...


@dataclass(frozen=True, order=True)
class Route:
    """One route: traffic for ``destination`` goes to ``next_hop``.

    ``next_hop`` is a gateway address for kernel tables (or a route type such as "blackhole"),
    and an instance, ENI or similar target id for cloud tables. ``device`` and ``onlink`` only
    mean something to kernel tables. ``lease_key`` names the lease the route serves.
    """

    destination: Destination
    next_hop: str
    device: str | None = None
    onlink: bool = False
    lease_key: str = field(default="", compare=False)

    @property
    def key(self) -> Destination:
        return self.destination

    def sort_key(self) -> tuple[Any, ...]:
        return (self.destination.version, int(self.destination.network_address), self)

    def __str__(self) -> str:
        text = f"{self.destination} via {self.next_hop}"
        if self.device:
            text += f" dev {self.device}"
        if self.onlink:
            text += " onlink"
        return text


class EntryState(enum.Enum):
    ACTIVE = "active"
    # Accepted by the table but not in effect yet (an operation in flight, a Pending entry).
    PENDING = "pending"
    # Present but not carrying traffic (an AWS blackhole route): it is replaced.
    BROKEN = "broken"


@dataclass(frozen=True)
class Observed:
    """One owned entry as the table holds it now."""

    entry: Entry
    state: EntryState = EntryState.ACTIVE


@dataclass(frozen=True)
class Foreign:
    """An entry that is not ours at a key the table reports (because we may want that key).

    ``holder`` says who holds it, for messages. ``adoptable`` marks an entry the table may
    take over when it is exactly the entry a lease wants (flanneld's routes, when a node
    switches): it is then adopted in place, never removed and re-added.
    """

    entry: Entry
    holder: str
    adoptable: bool = False
    # What the operator can do about it, for the conflict's message.
    advice: str = ""

    def conflict(self, key: EntryKey) -> str:
        text = f"{key} is held by {self.holder}"
        return f"{text}; {self.advice}" if self.advice else text


@dataclass(frozen=True)
class Capacity:
    """How many entries the table can hold and holds now (ours and everybody else's)."""

    limit: int
    used: int

    @property
    def room(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class Observation:
    """What ``observe()`` found: owned entries by key, foreign ones, and the capacity (None when
    the table has no limit worth tracking)."""

    owned: Mapping[EntryKey, Observed] = field(default_factory=dict)
    foreign: Mapping[EntryKey, Foreign] = field(default_factory=dict)
    capacity: Capacity | None = None

    @classmethod
    def of(cls, entries: Iterable[Entry], **kwargs: Any) -> Observation:
        """An observation of active entries (most kernel tables)."""
        return cls(owned={e.key: Observed(e) for e in entries}, **kwargs)

    def entries(self) -> set[Entry]:
        return {observed.entry for observed in self.owned.values()}


class Action(enum.Enum):
    ADD = "add"
    REPLACE = "replace"
    DELETE = "delete"
    # Take over a foreign entry identical to the wanted one, without a moment without it.
    ADOPT = "adopt"


@dataclass(frozen=True)
class Change:
    action: Action
    entry: Entry
    # For REPLACE, DELETE and ADOPT: what is in the table now.
    current: Entry | None = None

    @property
    def key(self) -> EntryKey:
        return self.entry.key

    def __str__(self) -> str:
        if self.action is Action.REPLACE and self.current is not None:
            return f"replace {self.current} -> {_target(self.entry)}"
        return f"{self.action.value} {self.entry}"


def _target(entry: Entry) -> str:
    return entry.next_hop if isinstance(entry, Route) else str(entry)


@dataclass(frozen=True)
class Plan:
    """The changes that turn the observed owned entries into the desired ones, in the order a
    table should make them: deletes (they free room), then replaces and adoptions, then adds."""

    changes: tuple[Change, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changes)

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self) -> Iterator[Change]:
        return iter(self.changes)

    def of(self, action: Action) -> list[Change]:
        return [c for c in self.changes if c.action is action]


class _Unknown(enum.Enum):
    UNKNOWN = "unknown"


UNKNOWN = _Unknown.UNKNOWN


@dataclass(frozen=True)
class Outcome:
    """What happened to one change; matched to its change by key.

    ``error`` is None when the change was made. ``pending`` says the table accepted it but it is
    not in effect yet; the reconciler looks again after the table's settle time. ``present``
    is what the table holds at the key after a failure, when the table knows (a replace done as
    delete-then-create that failed halfway holds nothing); UNKNOWN makes the reconciler read the
    table again.
    """

    change: Change
    error: RouteError | None = None
    pending: bool = False
    present: Entry | _Unknown | None = UNKNOWN

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class TableLimits:
    """How a table wants to be driven.

    ``max_changes``: changes per pass at most (the rest goes in the next pass, at once), so
    lease events are never stuck behind one long pass. ``pass_deadline``: seconds one apply()
    may take; a table stops starting changes after it, and the rest is planned again.
    ``settle``: seconds after a pending outcome before the table is read again.
    ``read_lag``: how long a read may miss our own writes (eventual consistency); a change
    made that recently and not seen yet is taken as pending, never made twice.
    """

    max_changes: int | None = None
    pass_deadline: float | None = None
    settle: float = 2.0
    read_lag: float = 0.0


@runtime_checkable
class RouteTable(Protocol):
    """A table of entries that cloudroutes can read and write.

    ``observe()`` returns the entries this table owns (a kernel rt protocol, a cloud ledger and
    name), and the foreign ones at keys it reports. ``apply(plan, deadline)`` makes the changes
    in plan order and returns one outcome per change it started; it starts none after
    ``deadline`` (a time.monotonic() value, or None). A failure of the whole call may be raised
    as a RouteError instead, and then counts against every change.
    """

    name: str
    resync_period: float
    limits: TableLimits

    def observe(self) -> Observation: ...

    def apply(self, plan: Plan, deadline: float | None = None) -> Sequence[Outcome]: ...

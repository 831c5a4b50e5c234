"""Routes, plans and the route-table protocol shared by kernel and cloud tables.

A route table holds at most one route per destination. A route table implementation only
reports and changes the routes it owns; everything else in the real table is invisible to
the reconciler, so it can never be deleted by mistake.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol, runtime_checkable

from cloudroutes.errors import RouteError

Destination = IPv4Network | IPv6Network


@dataclass(frozen=True, order=True)
class Route:
    """One route: traffic for ``destination`` goes to ``next_hop``.

    ``next_hop`` is a gateway address for kernel tables, and an instance, ENI or similar target
    id for cloud tables. ``device`` and ``onlink`` only mean something to kernel tables.
    ``lease_key`` names the lease the route serves, for status reporting.
    """

    destination: Destination
    next_hop: str
    device: str | None = None
    onlink: bool = False
    lease_key: str = field(default="", compare=False)

    def __str__(self) -> str:
        text = f"{self.destination} via {self.next_hop}"
        if self.device:
            text += f" dev {self.device}"
        if self.onlink:
            text += " onlink"
        return text


class Action(enum.Enum):
    ADD = "add"
    REPLACE = "replace"
    DELETE = "delete"


@dataclass(frozen=True)
class Change:
    action: Action
    route: Route
    # For REPLACE and DELETE: what is in the table now.
    current: Route | None = None

    def __str__(self) -> str:
        if self.action is Action.REPLACE and self.current is not None:
            return f"replace {self.current} -> {self.route.next_hop}"
        return f"{self.action.value} {self.route}"


@dataclass(frozen=True)
class Plan:
    """The changes that turn the observed owned routes into the desired ones."""

    changes: tuple[Change, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changes)

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.changes)

    def of(self, action: Action) -> list[Change]:
        return [c for c in self.changes if c.action is action]

    def without(self, actions: Iterable[Action]) -> Plan:
        drop = set(actions)
        return Plan(tuple(c for c in self.changes if c.action not in drop))


@dataclass(frozen=True)
class Outcome:
    """What happened to one change. ``error`` is None when the change is in the table."""

    change: Change
    error: RouteError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class RouteTable(Protocol):
    """A table of routes that cloudroutes can read and write.

    ``observe`` returns only the routes this table owns (a kernel rt protocol, a cloud name or
    ledger). ``apply`` makes each change and returns one outcome per change, in any order; a
    failure of the whole call (the API is unreachable, say) may be raised as a RouteError
    instead, and then counts against every change.
    """

    name: str
    resync_period: float

    def observe(self) -> set[Route]: ...

    def apply(self, plan: Plan) -> Sequence[Outcome]: ...

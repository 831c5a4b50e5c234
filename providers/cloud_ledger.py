"""What every cloud route table holds, and the ledger steps it takes, whatever its cloud's calls.

``cloudroutes.ledger`` holds the rule; a table (aws_route_table, ali_route_table,
gce_route_table) is a ``CloudTable``, keeps its cloud's reads and writes, and asks its
``TableLedger`` to:

- read the ledger next to each listing of the table, and remember what it read: a delete goes
  ahead only while the entry is the one the table last saw (a node may have taken the subnet
  again meanwhile);
- record an entry before a create or retarget, and record it ``confirmed`` once the route was
  made, adopted, or found as wanted: from then on the destination is ours whatever it points
  at, so a route of ours that someone pointed elsewhere by hand is repaired;
- put an entry back as it was when a create met someone else's route;
- forget the entry after a delete, and, in a collecting table, forget entries whose route has
  been gone for longer than the table's grace (a delete that died before it forgot).

Safe to use from several threads (the gce table writes in parallel).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from cloudroutes.election import Deposed, Fence
from cloudroutes.errors import RouteNotFound, Transient
from cloudroutes.ledger import Ledger, LedgerEntry
from cloudroutes.reconciler import Gate
from cloudroutes.routes import UNKNOWN, Change, Destination, Outcome, Route

log = logging.getLogger(__name__)


class TableLedger:
    """One route table's use of its ledger.

    ``scope``: the destinations the table reports as owned (a node-mode agent: its own); None:
    all. ``skip_young``: leave out routes recorded within the grace (the node-mode collector:
    the node that made one may hold a lease it has not heard of yet). ``fence``: for a table
    driven by an election winner, its fence, passed to every ledger write.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        name: str,
        table_id: str,
        member: str,
        scope: frozenset[Destination] | None = None,
        skip_young: bool = False,
        fence: Callable[[], Fence | None] | None = None,
    ) -> None:
        self.name = name
        self.table_id = table_id
        self.member = member
        self.scope = scope
        self._ledger = ledger
        self._skip_young = skip_young
        self._fence = fence
        self._lock = threading.RLock()
        self._seen: dict[Destination, LedgerEntry] = {}

    # --- the fence --------------------------------------------------------------------------

    def fence(self) -> Fence | None:
        return self._fence() if self._fence is not None else None

    def not_leader(self, fence: Fence | None) -> bool:
        """Whether a table driven by an election may not write now (its fence is gone)."""
        return self._fence is not None and (fence is None or not fence.valid())

    # --- reading ----------------------------------------------------------------------------

    def read(self) -> dict[Destination, LedgerEntry]:
        """Every entry, from etcd (a Transient error when etcd cannot say)."""
        try:
            with self._lock:
                return self._ledger.entries()
        except Exception as exc:  # etcd unreachable or refusing: read again later
            raise Transient(
                f"cannot read the route ledger of {self.table_id} in etcd: {exc}"
            ) from None

    def seen(self, entries: Mapping[Destination, LedgerEntry]) -> None:
        """The entries as the table's last observe() read them."""
        with self._lock:
            self._seen = dict(entries)

    def get(self, destination: Destination) -> LedgerEntry | None:
        """The entry as last read or written."""
        with self._lock:
            return self._ledger.get(destination)

    def owns(
        self, destination: Destination, observed_target: str, networks: Iterable[Destination]
    ) -> bool:
        """The ownership rule, from the last read, for a route observed in the table."""
        with self._lock:
            return self._ledger.owns(destination, observed_target, networks)

    def hidden(
        self, destination: Destination, entry: LedgerEntry, now: float, grace: float
    ) -> bool:
        """Whether an owned route is left out of what the table reports: another node's
        (outside the scope), or too young for the node-mode collector."""
        if self.scope is not None and destination not in self.scope:
            return True  # another node's route: that node's to keep
        return self._skip_young and now - entry.written < grace

    # --- writing ----------------------------------------------------------------------------

    def entry(
        self, route: Route, target: str | None = None, *, previous: str | None = None
    ) -> LedgerEntry:
        """The entry recorded before a route is made (or retargeted from ``previous``)."""
        hop = route.next_hop if target is None else target
        return LedgerEntry(
            route.destination, hop, route.lease_key, self.member, previous_target=previous
        )

    def confirmed(self, route: Route, target: str | None = None) -> LedgerEntry:
        """The entry of a route made, adopted or found as wanted."""
        hop = route.next_hop if target is None else target
        return LedgerEntry(route.destination, hop, route.lease_key, self.member, confirmed=True)

    def record(self, entries: Sequence[LedgerEntry], fence: Fence | None) -> None:
        """Write entries (a Transient error when etcd cannot; Deposed as it comes)."""
        try:
            with self._lock:
                self._ledger.record(entries, fence)
                for entry in entries:
                    self._seen[entry.destination] = entry
        except Deposed:
            raise
        except Exception as exc:
            raise Transient(f"could not write the route ledger in etcd: {exc}") from None

    def confirm(self, route: Route, target: str | None, fence: Fence | None) -> None:
        """The route is in the table as we made it: from now on its destination is ours."""
        self.record([self.confirmed(route, target)], fence)

    def forget(self, destinations: Sequence[Destination], fence: Fence | None) -> None:
        """Forget the entries of deleted routes; one that stays is forgotten by a later pass."""
        try:
            with self._lock:
                self._ledger.forget(destinations, fence)
        except Deposed:
            raise
        except Exception as exc:
            log.info("%s: ledger entries kept for now: %s", self.name, exc)
        with self._lock:
            for destination in destinations:
                self._seen.pop(destination, None)

    def restore(
        self, before: Mapping[Destination, LedgerEntry | None], fence: Fence | None
    ) -> None:
        """Put entries back as they were before creates that surely did not happen."""
        gone = [d for d, entry in before.items() if entry is None]
        again = [entry for entry in before.values() if entry is not None]
        try:
            if gone:
                self.forget(gone, fence)
            if again:
                self.record(again, fence)
        except Exception as exc:
            log.info("%s: ledger entries not restored: %s", self.name, exc)

    def forget_stale(
        self,
        entries: Mapping[Destination, LedgerEntry],
        present: set[Destination],
        now: float,
        grace: float,
        busy: Iterable[Destination] = (),
    ) -> None:
        """Forget entries whose route is gone (a delete that died before it forgot), once
        they are older than ``grace``; ``busy``: destinations with a write under way."""
        skip = set(busy)
        stale = [
            d
            for d, e in entries.items()
            if d not in present
            and d not in skip
            and now - e.written >= grace
            and (self.scope is None or d in self.scope)
        ]
        fence = self.fence()
        if not stale or (self._fence is not None and fence is None):
            return
        try:
            with self._lock:
                self._ledger.forget(stale, fence)
                for destination in stale:
                    self._seen.pop(destination, None)
        except Exception as exc:  # deposed, or etcd trouble: the next pass tries again
            log.info("%s: stale ledger entries kept for now: %s", self.name, exc)

    # --- deleting ---------------------------------------------------------------------------

    def refused_delete(
        self,
        change: Change,
        fresh: Mapping[Destination, LedgerEntry],
        destination: Destination,
        observed_target: str,
    ) -> Outcome | None:
        """Why a delete must not go ahead (as its outcome), or None when the route is still
        ours by the ledger read again for the plan (``fresh``), unchanged since observe()."""
        entry = fresh.get(destination)
        with self._lock:
            seen = self._seen.get(destination)
        if entry != seen:
            # Rewritten since we read it: a node may have taken this subnet again.
            why = Transient(f"{destination}: its ledger entry changed since the table was read")
            return Outcome(change, why, present=UNKNOWN)
        if entry is None or not entry.owns(observed_target):
            # Nothing of ours to delete there (any more): the route, if any, is left alone.
            why = RouteNotFound(f"{destination}: not in the ledger; left alone")
            return Outcome(change, why, present=None)
        return None


class CloudTable:
    """What every cloud route table holds besides its cloud client.

    ``networks``: the cluster's Network (and IPv6Network); routes outside are never ours.
    ``scope``: the destinations this table reports as owned (a node-mode agent: its own
    subnets); None: every owned route. ``collect``: this table deletes routes of leases that
    are gone (the garbage collector, cluster mode), so it also forgets ledger entries left
    without a route for the table's grace. ``skip_young``: leave out routes recorded within
    the grace (the node-mode collector: the node that made one may hold a lease it has not
    heard of yet). ``fence``: for a table driven by an election winner, its fence, checked
    before every write and passed to ledger writes. ``route_limit``: the table's route quota,
    when known. ``name``: the table's name in /status and metrics (default its id).
    """

    def __init__(
        self,
        table_id: str,
        *,
        ledger: Ledger,
        networks: Sequence[Destination],
        member: str,
        gate: Gate,
        name: str | None = None,
        scope: frozenset[Destination] | None = None,
        collect: bool = False,
        skip_young: bool = False,
        fence: Callable[[], Fence | None] | None = None,
        route_limit: int | None = None,
        resync_period: float = 300.0,
    ) -> None:
        self.name = name or table_id
        self.table_id = table_id
        self.resync_period = resync_period
        self.gate = gate
        self._book = TableLedger(
            ledger,
            name=self.name,
            table_id=table_id,
            member=member,
            scope=scope,
            skip_young=skip_young,
            fence=fence,
        )
        self._networks = tuple(networks)
        self._collect = collect
        self._route_limit = route_limit

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

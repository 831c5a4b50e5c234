"""The GCE routes of one VPC network behind the route-table protocol.

A GCE "route table" is the set of routes of one network in one project. Each route is a
resource with a name, unique in the project, and is immutable: it is inserted or deleted,
never changed. What is ours follows the ledger's rule (``cloudroutes.ledger``) and, as GCE
routes carry a name and a description, two more marks:

- a route cloudroutes made is named ``cloudroutes-<hash of cluster and CIDR>`` and its
  description carries ``cloudroutes cluster=<hash of cluster>``; one of that name without the
  marker is not ours, unless its ledger entry is confirmed (then it is ours re-created by
  hand, and is repaired);
- a route adopted from flanneld keeps its name (``flannel-10-5-1-0-24``: names cannot change);
  its ledger entry records that name with the next hop, so only that very route is ours.

A confirmed entry (the route was made or adopted) owns the route of the name it records
whatever its next hop; other routes to the destination are never ours.

The ledger's ``target`` is the next-hop instance as a resource path
(``projects/P/zones/Z/instances/N``), followed by `` as <name>`` for an adopted route.

Each ``observe()`` is one filtered ``routes.list`` of the network (paged to the end) and one
etcd read of the ledger, plus one ``globalOperations.get`` per operation of ours still in
flight. Writes are ``insert_unary`` / ``delete_unary`` followed by ``globalOperations.wait``
through a client on the same endpoint, at most MAX_IN_FLIGHT operations at once; an operation
still RUNNING when the pass ends is reported pending and looked at again by the next read.
A wrong route is replaced by a delete, then an insert (GCE has no update).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any, Unpack

from cloudroutes.election import Deposed, Fence
from cloudroutes.errors import Rejected, RouteConflict, RouteError, RouteNotFound, Transient
from cloudroutes.ledger import LedgerEntry, within
from cloudroutes.routes import (
    Action,
    Capacity,
    Change,
    Destination,
    EntryState,
    Foreign,
    Observation,
    Observed,
    Outcome,
    Plan,
    Route,
    TableLimits,
)
from providers.cloud import TableArgs
from providers.cloud_ledger import CloudTable
from providers.gce_api import (
    CALL_TIMEOUT,
    DONE,
    AlreadyExists,
    Compute,
    cluster_mark,
    description,
    flannel_name,
    operation_error,
    resource_path,
    route_name,
)

log = logging.getLogger(__name__)

PRIORITY = 1000
MAX_IN_FLIGHT = 10  # operations of one table in flight at once
PAGE_SIZE = 500
# Seconds one apply() may take: operations still running then are reported pending.
PASS_DEADLINE = 30.0
# A ledger entry younger than this whose route is not listed may belong to an insert under way
# (perhaps another node's); only older ones are forgotten.
LEDGER_GRACE = 60.0
NO_INSTANCE = "NEXT_HOP_INSTANCE_NOT_FOUND"


class _NotLeader(Transient):
    """This process lost the election its writes need: the rest of the plan is not started."""


def ledger_target(hop: str, name: str, canonical: str) -> str:
    """The ledger's target for a route: its next hop, and its name when it is not ours."""
    return hop if name == canonical else f"{hop} as {name}"


def _recorded_names(entry: LedgerEntry, canonical: str) -> set[str]:
    """The names of the routes an entry records (its target's, and a retarget's old one)."""
    targets = (t for t in (entry.target, entry.previous_target) if t is not None)
    return {t.split(" as ", 1)[1] if " as " in t else canonical for t in targets}


# --- one listed route ----------------------------------------------------------------------


@dataclass(frozen=True)
class GceRoute:
    """A route as routes.list shows it, reduced to what ownership needs."""

    name: str
    destination: Destination
    hop: str  # the next-hop instance's path, or "<field> <value>" for other next hops
    instance: bool  # its next hop is an instance
    description: str
    priority: int
    warnings: frozenset[str]
    # Counts against the routes quota (GCE's own subnet and default routes do not).
    quota: bool = True


def parse_route(raw: Any) -> GceRoute | None:
    """A listed route, or None when it is unreadable (never ours, never touched)."""
    try:
        destination = ip_network(str(raw.dest_range))
    except ValueError:
        return None
    name = str(raw.name)
    if raw.next_hop_instance:
        hop, instance = resource_path(raw.next_hop_instance), True
    else:
        hop, instance = "another next hop", False
        for field_name in ("next_hop_ip", "next_hop_gateway", "next_hop_ilb", "next_hop_peering"):
            value = getattr(raw, field_name, "")
            if value:
                hop = f"{field_name.removeprefix('next_hop_')} {resource_path(value)}"
                break
    return GceRoute(
        name=name,
        destination=destination,
        hop=hop,
        instance=instance,
        description=str(raw.description or ""),
        priority=int(raw.priority),
        warnings=frozenset(str(w.code) for w in raw.warnings),
        quota=str(raw.route_type or "STATIC") == "STATIC" and not name.startswith("default-route-"),
    )


@dataclass
class _InFlight:
    """An operation of ours not yet seen DONE."""

    operation: str
    kind: str  # "insert" | "delete"
    route: Route  # what the insert makes, or what the delete removes
    name: str


class GceRouteTable(CloudTable):
    """The routes of one network, as one reconciler sees them.

    ``scope``: the destinations reported as owned (a node-mode agent: its own); None: all.
    ``collect``: this table deletes routes of leases that are gone (the garbage collector,
    cluster mode), so it also forgets ledger entries left without a route. ``skip_young``:
    leave out routes recorded within LEDGER_GRACE (the node-mode collector). ``fence``: the
    election's fence, checked before every write and passed to ledger writes.
    ``can_forward(instance_path)`` raises a RouteError unless that instance forwards IP
    packets (``ForwardingCheck``); it is called before a route to it is inserted.
    """

    def __init__(
        self,
        compute: Compute,
        network: str,
        *,
        cluster: str,
        can_forward: Callable[[str], None],
        pass_deadline: float | None = None,
        **args: Unpack[TableArgs],
    ) -> None:
        super().__init__(resource_path(network), **args)
        self.network = self.table_id  # projects/ID/global/networks/NET
        self.limits = TableLimits(pass_deadline=pass_deadline or PASS_DEADLINE, settle=2.0)
        self._compute = compute
        self._cluster = cluster
        self._mark = f"cloudroutes cluster={cluster_mark(cluster)}"
        self._can_forward = can_forward
        self._lock = threading.Lock()  # _inflight and _adoptable_names
        self._inflight: dict[Destination, _InFlight] = {}
        # The name of the adoptable route at each destination, as last listed.
        self._adoptable_names: dict[Destination, str] = {}
        self._pool: ThreadPoolExecutor | None = None

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    # --- observe ----------------------------------------------------------------------------

    def observe(self) -> Observation:
        listed = self._list()
        entries = self._book.read()
        now = time.time()
        owned: dict[Destination, Observed] = {}
        foreign: dict[Destination, Foreign] = {}
        present: set[Destination] = set()
        adoptable: dict[Destination, str] = {}
        deleting = self._settle_inflight({r.name for r in listed})
        for route in listed:
            present.add(route.destination)
            if route.name in deleting:
                continue  # our delete is under way: gone as far as plans go
            entry = entries.get(route.destination)
            if self._ours(route, entry):
                assert entry is not None
                if self._book.hidden(route.destination, entry, now, LEDGER_GRACE):
                    continue
                state = EntryState.BROKEN if NO_INSTANCE in route.warnings else EntryState.ACTIVE
                owned[route.destination] = Observed(Route(route.destination, route.hop), state)
            elif within(route.destination, self._networks):
                if route.destination not in foreign or self._adoptable(route):
                    foreign[route.destination] = self._foreign(route, entry)
                if self._adoptable(route):
                    adoptable[route.destination] = route.name
        self._book.seen(entries)
        with self._lock:
            self._adoptable_names = adoptable
            pending = [f for f in self._inflight.values() if f.kind == "insert"]
        for flight in pending:
            destination = flight.route.destination
            scope = self._book.scope
            if scope is None or destination in scope:
                owned[destination] = Observed(flight.route, EntryState.PENDING)
                foreign.pop(destination, None)
        for destination in owned:
            foreign.pop(destination, None)
        if self._collect:
            with self._lock:
                busy = set(self._inflight)
            self._book.forget_stale(entries, present, now, LEDGER_GRACE, busy)
        return Observation(owned=owned, foreign=foreign, capacity=self._capacity(listed))

    def _ours(self, route: GceRoute, entry: LedgerEntry | None) -> bool:
        if entry is None or not route.instance or not within(route.destination, self._networks):
            return False
        canonical = route_name(self._cluster, route.destination)
        if entry.confirmed:
            # Its route was made or adopted: the route of the name the entry records is ours
            # whatever its hop (or description), so one someone re-created by hand pointing
            # elsewhere is repaired. Others' routes to the destination keep other names.
            return route.name in _recorded_names(entry, canonical)
        if route.name == canonical and self._mark not in route.description:
            return False  # our name without our mark: not made by this cluster
        return entry.owns(ledger_target(route.hop, route.name, canonical))

    def _adoptable(self, route: GceRoute) -> bool:
        if not route.instance or route.priority != PRIORITY or NO_INSTANCE in route.warnings:
            return False
        canonical = route_name(self._cluster, route.destination)
        ours_unrecorded = route.name == canonical and self._mark in route.description
        return ours_unrecorded or route.name == flannel_name(route.destination)

    def _foreign(self, route: GceRoute, entry: LedgerEntry | None) -> Foreign:
        if entry is not None:
            holder = (
                f"route {route.name} to {route.hop}, but the ledger of cluster "
                f"{self._cluster} records {entry.target}"
            )
        else:
            holder = (
                f"route {route.name} to {route.hop}, which cluster {self._cluster} did not create"
            )
        advice = (
            "cloudroutes never changes routes it did not create; delete it "
            f"(gcloud compute routes delete {route.name}) if nothing needs it"
        )
        shown = Route(route.destination, route.hop)
        return Foreign(shown, holder=holder, adoptable=self._adoptable(route), advice=advice)

    def _capacity(self, listed: list[GceRoute]) -> Capacity | None:
        # The ROUTES quota is per project; the listing shows this network only, so the limit
        # is known only as the budget the operator gives cloudroutes (RouteLimit), counted
        # against the routes of this network.
        if self._route_limit is None:
            return None
        return Capacity(self._route_limit, sum(1 for r in listed if r.quota))

    def _list(self) -> list[GceRoute]:
        from google.cloud import compute_v1

        network = self.network.rsplit("/", 1)[-1]

        def listing(clients: Any) -> list[Any]:
            request = compute_v1.ListRoutesRequest(
                project=clients.project,
                filter=f'network eq ".*/projects/{clients.project}/global/networks/{network}"',
                max_results=PAGE_SIZE,
            )
            # The pager follows nextPageToken to the end.
            return list(clients.routes.list(request=request, retry=None, timeout=CALL_TIMEOUT))

        raw = self._compute.call("routes.list", self.network, listing)
        routes = [r for r in (parse_route(item) for item in raw) if r is not None]
        return [r for r in routes if r.destination.version == 4]

    def _settle_inflight(self, listed: set[str]) -> set[str]:
        """Look at the operations still in flight; return the names whose delete is under way."""
        with self._lock:
            flights = list(self._inflight.items())
        deleting: set[str] = set()
        for destination, flight in flights:
            if flight.kind == "insert" and flight.name in listed:
                running = False  # listed: it took effect
            else:
                try:
                    running = self._get_operation(flight.operation).status.name != DONE
                except RouteError as exc:
                    log.info("%s: operation %s unknown: %s", self.name, flight.operation, exc)
                    running = False  # the listing tells what is there
            if not running:
                self._drop_flight(destination, flight)
            elif flight.kind == "delete":
                deleting.add(flight.name)
        return deleting

    # --- apply ------------------------------------------------------------------------------

    def apply(self, plan: Plan, deadline: float | None = None) -> Sequence[Outcome]:
        """Deletes first (they free quota), then replaces and adoptions, then inserts; each
        group runs in parallel, within the cap on operations in flight."""
        fresh: dict[Destination, LedgerEntry] | None = None
        if plan.of(Action.DELETE):
            try:
                fresh = self._book.read()  # one read, for every delete of this plan
            except Transient as exc:
                return [Outcome(c, exc) for c in plan.of(Action.DELETE)]
        outcomes: list[Outcome] = []
        groups = (
            plan.of(Action.DELETE),
            plan.of(Action.REPLACE) + plan.of(Action.ADOPT),
            plan.of(Action.ADD),
        )
        for group in groups:
            if not group:
                continue
            done, stop = self._run_group(group, deadline, fresh or {})
            outcomes.extend(done)
            if stop:
                break
        return outcomes

    def _run_group(
        self, group: list[Change], deadline: float | None, fresh: Mapping[Destination, LedgerEntry]
    ) -> tuple[list[Outcome], bool]:
        fence = self._book.fence()
        if self._book.not_leader(fence):
            return [Outcome(group[0], _NotLeader("not the leader now; not writing"))], True
        slots = self._free_slots(deadline)
        if slots <= 0:
            return [], True
        pool = self._executor()
        outcomes: list[Outcome] = []
        stop = False
        for start in range(0, len(group), slots):
            if deadline is not None and time.monotonic() >= deadline:
                return outcomes, True
            batch = group[start : start + slots]
            futures = [pool.submit(self._one, c, fence, fresh, deadline) for c in batch]
            done = [future.result() for future in futures]
            # Changes made at once have no order; those that went through are reported first,
            # as if made first: a refusal for quota is then the last word on the quota.
            outcomes.extend(sorted(done, key=lambda o: o.error is not None))
            stop = any(isinstance(o.error, _NotLeader) for o in done)
            if stop:
                break
            slots = self._free_slots(deadline)
            if slots <= 0:
                return outcomes, True
        return outcomes, stop

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="gce-op")
            return self._pool

    def _free_slots(self, deadline: float | None) -> int:
        """Room for more operations: MAX_IN_FLIGHT less those still running from earlier
        passes, waiting (until ``deadline``) for the oldest to finish when there is none."""
        while True:
            with self._lock:
                flights = list(self._inflight.items())
            free = MAX_IN_FLIGHT - len(flights)
            if free > 0:
                return free
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return 0
            destination, flight = flights[0]
            op = self._wait_operation(flight.operation, left)
            if op is None or op.status.name == DONE:
                self._drop_flight(destination, flight)
                # The others started about together: those done too make room now.
                for other, later in flights[1:]:
                    try:
                        running = self._get_operation(later.operation).status.name != DONE
                    except RouteError:
                        running = False
                    if not running:
                        self._drop_flight(other, later)

    def _drop_flight(self, destination: Destination, flight: _InFlight) -> None:
        with self._lock:
            if self._inflight.get(destination) is flight:
                del self._inflight[destination]

    def _one(
        self,
        change: Change,
        fence: Fence | None,
        fresh: Mapping[Destination, LedgerEntry],
        deadline: float | None,
    ) -> Outcome:
        route = change.entry
        assert isinstance(route, Route)
        try:
            if change.action is Action.ADD:
                return self._add(change, route, fence, deadline)
            if change.action is Action.REPLACE:
                return self._replace(change, route, fence, deadline)
            if change.action is Action.ADOPT:
                return self._adopt(change, route, fence)
            return self._delete(change, route, fence, fresh, deadline)
        except Deposed as exc:
            return Outcome(change, _NotLeader(str(exc)))
        except RouteError as exc:
            return Outcome(change, exc)
        except Exception as exc:  # a bug must not take the other changes with it
            log.error("%s: %s failed", self.name, change, exc_info=True)
            return Outcome(change, Transient(f"{change}: {type(exc).__name__}: {exc}"))

    def _adopt(self, change: Change, route: Route, fence: Fence | None) -> Outcome:
        current = change.current
        with self._lock:
            name = self._adoptable_names.get(route.destination, flannel_name(route.destination))
        canonical = route_name(self._cluster, route.destination)
        hop = current.next_hop if isinstance(current, Route) else route.next_hop
        target = ledger_target(hop, name, canonical)
        self._book.confirm(route, target, fence)
        log.info("%s: adopted route %s (%s) as it is, with no write", self.name, name, route)
        return Outcome(change)

    def _add(
        self, change: Change, route: Route, fence: Fence | None, deadline: float | None
    ) -> Outcome:
        name = route_name(self._cluster, route.destination)
        self._can_forward(route.next_hop)
        before = self._book.get(route.destination)
        self._book.record([self._book.entry(route)], fence)
        try:
            return self._insert(change, route, name, fence, deadline)
        except AlreadyExists:
            return self._already_exists(change, route, name, before, fence, deadline)

    def _already_exists(
        self,
        change: Change,
        route: Route,
        name: str,
        before: LedgerEntry | None,
        fence: Fence | None,
        deadline: float | None,
    ) -> Outcome:
        """An insert found a route of our name: done if it is the one we want; else, as the
        name is unique per cluster and CIDR, it is ours to another instance: replaced."""
        existing = self._get_route(name)
        if existing.hop == route.next_hop and NO_INSTANCE not in existing.warnings:
            log.info("%s: %s already exists as wanted", self.name, name)
            self._book.confirm(route, None, fence)
            return Outcome(change)
        if self._mark not in existing.description:
            self._book.restore({route.destination: before}, fence)
            raise RouteConflict(
                f"{route.destination}: route {name} exists without cloudroutes' mark for "
                f"cluster {self._cluster}; it is left alone (delete it if nothing needs it)"
            )
        current = Route(route.destination, existing.hop, lease_key=route.lease_key)
        replace = Change(Action.REPLACE, route, current)
        outcome = self._replace(replace, route, fence, deadline, old_name=name)
        return Outcome(change, outcome.error, outcome.pending, outcome.present)

    def _replace(
        self,
        change: Change,
        route: Route,
        fence: Fence | None,
        deadline: float | None,
        old_name: str | None = None,
    ) -> Outcome:
        """Delete the wrong route, then insert the right one (GCE routes are immutable)."""
        current = change.current
        assert isinstance(current, Route)
        name = route_name(self._cluster, route.destination)
        entry = self._book.get(route.destination)
        if old_name is None:
            old_name = self._recorded_name(entry, current)
        self._can_forward(route.next_hop)
        old_target = ledger_target(current.next_hop, old_name, name)
        self._book.record([self._book.entry(route, previous=old_target)], fence)
        log.info(
            "%s: replacing %s (route %s) by deleting it and inserting %s (routes cannot be "
            "changed in place)",
            self.name,
            current,
            old_name,
            route,
        )
        try:
            deleted = self._write_delete(old_name, current, fence, deadline)
        except RouteNotFound:
            deleted = True
        if not deleted:
            return Outcome(change, pending=True)
        try:
            outcome = self._insert(change, route, name, fence, deadline)
        except RouteError as exc:
            # The old route is gone and the new one is not there: the table holds nothing.
            return Outcome(change, exc, present=None)
        return outcome

    def _recorded_name(self, entry: LedgerEntry | None, current: Route) -> str:
        canonical = route_name(self._cluster, current.destination)
        if entry is not None:
            for target in (entry.target, entry.previous_target):
                if target and target.startswith(f"{current.next_hop} as "):
                    return target.removeprefix(f"{current.next_hop} as ")
        return canonical

    def _insert(
        self,
        change: Change,
        route: Route,
        name: str,
        fence: Fence | None,
        deadline: float | None,
    ) -> Outcome:
        from google.cloud import compute_v1

        resource = compute_v1.Route(
            name=name,
            network=self.network,
            dest_range=str(route.destination),
            next_hop_instance=route.next_hop,
            priority=PRIORITY,
            description=description(self._cluster, route.lease_key),
        )
        done, error = self._operation(
            "insert",
            f"{self.network} ({route.destination})",
            lambda c: c.routes.insert_unary(
                project=c.project, route_resource=resource, retry=None, timeout=CALL_TIMEOUT
            ),
            route,
            name,
            fence,
            deadline,
        )
        if not done:
            return Outcome(change, pending=True)
        if error is not None:
            if isinstance(error, AlreadyExists):
                raise error
            return Outcome(change, error, present=None)
        # Settled: the route is in the table (a read that misses it lags, see settle). Its
        # entry is confirmed, and a retarget's previous_target goes.
        try:
            self._book.confirm(route, None, fence)
        except (Deposed, RouteError) as exc:
            log.info("%s: ledger entry of %s kept as is: %s", self.name, route, exc)
        return Outcome(change)

    def _finish(self, op: Any, deadline: float | None) -> Any:
        """The operation once DONE, or as it is when the deadline comes first."""
        while op.status.name != DONE:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return op
            waited = self._wait_operation(op.name, left)
            if waited is None:
                return op
            op = waited
        with self._lock:
            for destination, flight in list(self._inflight.items()):
                if flight.operation == op.name:
                    del self._inflight[destination]
        return op

    def _write_delete(
        self, name: str, route: Route, fence: Fence | None, deadline: float | None
    ) -> bool:
        """Delete route ``name``; True once it is gone, False while its operation runs."""
        done, error = self._operation(
            "delete",
            f"route {name} ({route.destination})",
            lambda c: c.routes.delete_unary(
                project=c.project, route=name, retry=None, timeout=CALL_TIMEOUT
            ),
            route,
            name,
            fence,
            deadline,
        )
        if error is not None:
            raise error
        return done

    def _operation(
        self,
        kind: str,
        where: str,
        call: Callable[[Any], Any],
        route: Route,
        name: str,
        fence: Fence | None,
        deadline: float | None,
    ) -> tuple[bool, RouteError | None]:
        """Start ``routes.<kind>`` of route ``name`` (once the fence says this process may
        still write), keep it in flight, and wait for it until ``deadline``: whether it is
        done, and the error it ended with."""
        if fence is not None:
            fence.check()
        method = f"routes.{kind}"
        op = self._compute.call(method, where, call)
        with self._lock:
            self._inflight[route.destination] = _InFlight(op.name, kind, route, name)
        op = self._finish(op, deadline)
        if op.status.name != DONE:
            return False, None
        return True, operation_error(op, method, where, self._compute.policy)

    def _delete(
        self,
        change: Change,
        route: Route,
        fence: Fence | None,
        fresh: Mapping[Destination, LedgerEntry],
        deadline: float | None,
    ) -> Outcome:
        destination = route.destination
        name = self._recorded_name(fresh.get(destination), route)
        target = ledger_target(route.next_hop, name, route_name(self._cluster, destination))
        refused = self._book.refused_delete(change, fresh, destination, target)
        if refused is not None:
            return refused
        error: RouteError | None = None
        try:
            if not self._write_delete(name, route, fence, deadline):
                return Outcome(change, pending=True)
        except RouteNotFound as exc:
            error = exc
        self._book.forget([destination], fence)
        return Outcome(change, error, present=None)

    # --- calls ------------------------------------------------------------------------------

    def _get_route(self, name: str) -> GceRoute:
        raw = self._compute.call(
            "routes.get",
            f"route {name}",
            lambda c: c.routes.get(project=c.project, route=name, retry=None, timeout=CALL_TIMEOUT),
        )
        route = parse_route(raw)
        if route is None:
            raise Rejected(f"route {name} has an unreadable destRange; left alone")
        return route

    def _get_operation(self, name: str) -> Any:
        return self._compute.call(
            "globalOperations.get",
            name,
            lambda c: c.operations.get(
                project=c.project, operation=name, retry=None, timeout=CALL_TIMEOUT
            ),
        )

    def _wait_operation(self, name: str, left: float | None) -> Any | None:
        """globalOperations.wait for at most ``left`` seconds; None when it cannot say (the
        next read of the routes does)."""
        timeout = CALL_TIMEOUT * 6 if left is None else max(0.1, left)
        try:
            return self._compute.call(
                "globalOperations.wait",
                name,
                lambda c: c.operations.wait(
                    project=c.project, operation=name, retry=None, timeout=timeout
                ),
            )
        except RouteError as exc:
            log.info("%s: waiting for operation %s: %s", self.name, name, exc)
            return None

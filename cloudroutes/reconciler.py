"""The one reconcile loop, for kernel and cloud route tables alike.

Level-triggered: each pass reads the desired routes (from the lease table) and the routes the
table owns, diffs them into a plan and applies it. Lease changes wake it, coalesced; a
periodic resync re-reads the table and repairs drift. Between resyncs the reconciler trusts
its own successful writes, so a lease change costs one change, not a full table read.

Each route's outcome is classified by the error class the table raised:

=================  ==========================================================================
programmed         the route is in the table
retry              a transient failure; the pass is retried with backoff
throttled          the API asked us to slow down; the whole table backs off
quota-blocked      the table is full; no creates until a delete frees room or a resync
failed             refused for good (conflict with a route we do not own, bad next hop);
                   tried again at the next resync
=================  ==========================================================================
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cloudroutes.errors import (
    QuotaExceeded,
    RouteError,
    RouteNotFound,
    Throttled,
    Transient,
)
from cloudroutes.lease import Lease
from cloudroutes.lease_table import LeaseTable
from cloudroutes.metrics import Metrics
from cloudroutes.plan import by_destination, make_plan
from cloudroutes.routes import Action, Change, Destination, Outcome, Plan, Route, RouteTable

log = logging.getLogger(__name__)

# Maps leases to the routes a table should hold. Each route names its lease in ``lease_key``,
# and a lease's routes depend on that lease alone (and on this node), so the reconciler can
# recompute just the leases that changed.
DesiredRoutes = Callable[[list[Lease]], Iterable[Route]]


class RouteState(enum.Enum):
    PROGRAMMED = "programmed"
    PENDING = "pending"
    RETRY = "retry"
    THROTTLED = "throttled"
    QUOTA_BLOCKED = "quota-blocked"
    FAILED = "failed"


@dataclass(frozen=True)
class RouteStatus:
    route: Route
    state: RouteState
    reason: str = ""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``initial`` doubling up to ``maximum``."""

    initial: float
    maximum: float

    def delay(self, attempt: int) -> float:
        return min(self.maximum, self.initial * (2 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class ReconcilePolicy:
    coalesce: float = 0.005
    retry: Backoff = Backoff(0.2, 30.0)
    throttle: Backoff = Backoff(2.0, 300.0)


def classify(change: Change, error: RouteError | Exception | None) -> RouteState:
    if error is None:
        return RouteState.PROGRAMMED
    if isinstance(error, RouteNotFound) and change.action is Action.DELETE:
        return RouteState.PROGRAMMED
    if isinstance(error, Throttled):
        return RouteState.THROTTLED
    if isinstance(error, QuotaExceeded):
        return RouteState.QUOTA_BLOCKED
    if isinstance(error, Transient | RouteNotFound):
        return RouteState.RETRY
    return RouteState.FAILED


@dataclass(frozen=True)
class PassResult:
    plan: Plan
    outcomes: tuple[Outcome, ...]

    @property
    def clean(self) -> bool:
        return all(classify(o.change, o.error) is RouteState.PROGRAMMED for o in self.outcomes)


class _DesiredState:
    """The desired routes, kept per lease so one lease change recomputes one lease's routes.

    Two leases claiming one destination (a store that is not healthy) resolve to the smallest
    route, as ``by_destination`` does.
    """

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self.by_lease: dict[str, list[Route]] = defaultdict(list)
        self.claims: dict[Destination, set[Route]] = defaultdict(set)
        self.routes: dict[Destination, Route] = {}
        for route in routes:
            self._add(route)
        self.routes = {d: min(c) for d, c in self.claims.items()}

    def _add(self, route: Route) -> None:
        self.by_lease[route.lease_key].append(route)
        self.claims[route.destination].add(route)

    def update(self, leases: dict[str, Lease | None], desired: DesiredRoutes) -> set[Destination]:
        """Recompute the routes of ``leases`` (None: removed); return what may have moved."""
        touched: set[Destination] = set()
        for key in leases:
            for route in self.by_lease.pop(key, ()):
                self.claims[route.destination].discard(route)
                touched.add(route.destination)
        for route in desired([lease for lease in leases.values() if lease is not None]):
            self._add(route)
            touched.add(route.destination)
        for destination in touched:
            claims = self.claims.get(destination)
            if claims:
                self.routes[destination] = min(claims)
            else:
                self.claims.pop(destination, None)
                self.routes.pop(destination, None)
        return touched


class Reconciler:
    def __init__(
        self,
        table: RouteTable,
        leases: LeaseTable,
        desired: DesiredRoutes,
        *,
        metrics: Metrics | None = None,
        policy: ReconcilePolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.leases = leases
        self._desired_fn = desired
        self.metrics = metrics
        self.policy = policy or ReconcilePolicy()
        self._clock = clock
        self._wakeup = threading.Event()
        self._lock = threading.Lock()
        self._want = _DesiredState()
        self._want_generation: int | None = None
        self._actual: dict[Destination, Route] | None = None
        self._status: dict[Destination, RouteStatus] = {}
        self._generation_done = 0
        self._retry_attempt = 0
        self._throttle_attempt = 0
        self._not_before = 0.0
        self._quota_blocked = False
        # Creates refused for quota, planned again as soon as a delete frees room.
        self._awaiting_room: set[Destination] = set()
        self._replan: set[Destination] = set()
        self._passes = 0
        leases.subscribe(self.wake)

    # --- triggers -------------------------------------------------------------------------

    def wake(self) -> None:
        """A lease changed: reconcile soon (many wakes coalesce into one pass)."""
        self._wakeup.set()

    def invalidate(self) -> None:
        """The table changed behind our back: re-read it on the next pass, which comes now."""
        with self._lock:
            self._actual = None
        self._wakeup.set()

    # --- one pass ---------------------------------------------------------------------------

    def plan(self) -> Plan:
        """What a pass would change now, without changing anything (always a fresh read)."""
        leases, _ = self.leases.snapshot()
        return make_plan(by_destination(self._desired_fn(leases)).values(), self.table.observe())

    def reconcile(self, *, resync: bool = False) -> PassResult:
        """One pass. Between resyncs it trusts its own picture of the table and plans only the
        destinations whose leases changed, so a lease event costs O(changes), not O(leases).
        A resync, or a picture made doubtful by a failure or by drift, plans everything."""
        started = self._clock()
        scope = self._update_want(full=resync)
        with self._lock:
            if resync or self._actual is None:
                observed = self.table.observe()
                self._actual = by_destination(observed)
                scope = None
                if resync:
                    self._quota_blocked = False
            actual = self._actual
            if scope is None:
                self._replan.clear()
                self._awaiting_room.clear()
            else:
                scope |= self._replan
                self._replan.clear()
        want = self._want.routes
        if scope is None:
            plan = make_plan(want.values(), observed)
        else:
            plan = make_plan(
                [want[d] for d in scope if d in want], [actual[d] for d in scope if d in actual]
            )
        if self._quota_blocked:
            blocked = plan.of(Action.ADD)
            plan = plan.without([Action.ADD])
        else:
            blocked = []
        outcomes = tuple(self._apply(plan)) if plan else ()
        self._record(scope, outcomes, blocked)
        result = PassResult(plan=plan, outcomes=outcomes)
        self._schedule(result)
        self._observe_metrics(result, self._clock() - started)
        self._passes += 1
        return result

    def _update_want(self, *, full: bool) -> set[Destination] | None:
        """Bring the desired routes up to the lease table; return the destinations that may
        have changed, or None when everything was recomputed."""
        changes = None
        if not full and self._want_generation is not None:
            changes = self.leases.changes_since(self._want_generation)
        if changes is None:
            leases, generation = self.leases.snapshot()
            self._want = _DesiredState(self._desired_fn(leases))
            self._want_generation = generation
            return None
        scope = self._want.update(changes.leases, self._desired_fn)
        self._want_generation = changes.generation
        return scope

    def _apply(self, plan: Plan) -> list[Outcome]:
        try:
            outcomes = list(self.table.apply(plan))
        except RouteError as exc:
            return [Outcome(c, exc) for c in plan]
        answered = {id(o.change) for o in outcomes}
        missing = [c for c in plan if id(c) not in answered]
        if missing:
            log.error(
                "route table %s gave no outcome for %d changes", self.table.name, len(missing)
            )
            outcomes += [Outcome(c, Transient("no outcome reported")) for c in missing]
        return outcomes

    def _record(
        self, scope: set[Destination] | None, outcomes: tuple[Outcome, ...], blocked: list[Change]
    ) -> None:
        want = self._want.routes
        with self._lock:
            actual = self._actual if self._actual is not None else {}
            status = {} if scope is None else self._status
            for destination in want if scope is None else scope:
                route = want.get(destination)
                if route is None:
                    status.pop(destination, None)
                elif actual.get(destination) == route:
                    status[destination] = RouteStatus(route, RouteState.PROGRAMMED)
                else:
                    status[destination] = RouteStatus(route, RouteState.PENDING)
            doubtful = False
            for outcome in outcomes:
                change = outcome.change
                state = classify(change, outcome.error)
                if self.metrics:
                    self.metrics.route_changes.labels(
                        self.table.name, change.action.value, state.value
                    ).inc()
                destination = change.route.destination
                if state is RouteState.PROGRAMMED:
                    if change.action is Action.DELETE:
                        if actual.get(destination) == change.route:
                            del actual[destination]
                        if self._quota_blocked:
                            self._quota_blocked = False
                            self._replan |= self._awaiting_room
                            self._awaiting_room.clear()
                            self._wakeup.set()
                    else:
                        actual[destination] = change.route
                        status[destination] = RouteStatus(change.route, RouteState.PROGRAMMED)
                    continue
                reason = str(outcome.error)
                log.warning("%s: %s failed (%s): %s", self.table.name, change, state.value, reason)
                if state is RouteState.QUOTA_BLOCKED:
                    self._quota_blocked = True
                    self._awaiting_room.add(destination)
                # A transient failure may have left the table in any state: read it again.
                # A refusal (quota, conflict, rejected) changed nothing; it waits for a resync.
                doubtful |= state in (RouteState.RETRY, RouteState.THROTTLED)
                if change.action is not Action.DELETE:
                    status[destination] = RouteStatus(change.route, state, reason)
            for change in blocked:
                self._awaiting_room.add(change.route.destination)
                status[change.route.destination] = RouteStatus(
                    change.route,
                    RouteState.QUOTA_BLOCKED,
                    "route table is full; waiting for room (delete routes or raise the quota)",
                )
            self._actual = None if doubtful else actual
            self._status = status

    def _schedule(self, result: PassResult) -> None:
        states = {classify(o.change, o.error) for o in result.outcomes}
        now = self._clock()
        if RouteState.THROTTLED in states:
            self._throttle_attempt += 1
            self._not_before = now + self.policy.throttle.delay(self._throttle_attempt)
            self._wakeup.set()
        elif RouteState.RETRY in states:
            self._throttle_attempt = 0
            self._retry_attempt += 1
            self._not_before = now + self.policy.retry.delay(self._retry_attempt)
            self._wakeup.set()
        else:
            self._throttle_attempt = 0
            self._retry_attempt = 0
            self._not_before = 0.0

    def _observe_metrics(self, result: PassResult, took: float) -> None:
        if self.metrics is None:
            return
        name = self.table.name
        self.metrics.reconcile_duration.labels(name).observe(took)
        counts = Counter(status.state for status in self.status().values())
        self.metrics.routes_desired.labels(name).set(len(self._want.routes))
        self.metrics.routes_programmed.labels(name).set(counts[RouteState.PROGRAMMED])
        for state in RouteState:
            if state is not RouteState.PROGRAMMED:
                self.metrics.routes_failed.labels(name, state.value).set(counts[state])
        generation = self._want_generation or 0
        if result.clean and generation > self._generation_done:
            now = time.monotonic()
            for arrived in self.leases.arrival_times(self._generation_done, generation):
                self.metrics.lease_to_route_latency.labels(name).observe(now - arrived)
            self._generation_done = generation

    # --- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Reconcile until ``stop`` is set: on wake-ups, retries and every resync period."""
        next_resync = self._clock()
        while not stop.is_set():
            now = self._clock()
            resync = now >= next_resync
            if resync or (self._wakeup.is_set() and now >= self._not_before):
                if not resync and self.policy.coalesce:
                    stop.wait(self.policy.coalesce)
                self._wakeup.clear()
                try:
                    self.reconcile(resync=resync)
                except Exception:
                    # A bug or an unclassified failure of observe(): keep the loop alive and
                    # re-read the table next time.
                    log.exception("%s: reconcile pass failed", self.table.name)
                    with self._lock:
                        self._actual = None
                    self._not_before = self._clock() + self.policy.retry.delay(
                        self._retry_attempt + 1
                    )
                    self._retry_attempt += 1
                    self._wakeup.set()
                if resync:
                    next_resync = self._clock() + self.table.resync_period
                continue
            deadline = next_resync
            if self._wakeup.is_set():
                deadline = min(deadline, self._not_before)
                stop.wait(max(0.0, deadline - self._clock()))
            else:
                self._wait_for_wakeup(stop, max(0.0, deadline - self._clock()))

    def _wait_for_wakeup(self, stop: threading.Event, timeout: float) -> None:
        end = self._clock() + timeout
        while not stop.is_set() and not self._wakeup.is_set():
            left = end - self._clock()
            if left <= 0:
                return
            self._wakeup.wait(min(left, 0.5))

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[Destination, RouteStatus]:
        with self._lock:
            return dict(self._status)

    @property
    def passes(self) -> int:
        return self._passes

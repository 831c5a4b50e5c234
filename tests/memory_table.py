"""An in-memory route table that behaves like a cloud table, with error injection.

It holds routes of several owners, as a shared VPC route table does: only the routes marked
as ours are observed as owned; the others are reported as foreign (adoptable when their owner
is "flanneld"). Like a cloud API it can lag (a read misses writes made within ``read_lag``
seconds), keep new entries pending for a while, apply at most ``batch`` changes per call,
throttle calls beyond a rate, and report a route limit. Faults are queued per destination (or
for the next whole call) and raised as the route-error classes a real provider maps its API
errors to.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence

from cloudroutes.errors import QuotaExceeded, RouteConflict, RouteError, RouteNotFound, Throttled
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


class MemoryRouteTable:
    def __init__(
        self,
        name: str = "memory",
        *,
        limit: int | None = None,
        report_capacity: bool = False,
        limits: TableLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.resync_period = 60.0
        self.limits = limits or TableLimits()
        self.limit = limit
        self.report_capacity = report_capacity
        self.clock = clock
        self.routes: dict[Destination, tuple[Route, str]] = {}
        self.faults: dict[Destination, deque[RouteError]] = defaultdict(deque)
        self.call_faults: deque[RouteError] = deque()
        self.calls: list[str] = []
        # Cloud-like behaviours, off by default.
        self.read_lag = 0.0
        self.pending_for = 0.0
        self.batch: int | None = None
        self.rate: tuple[int, float] | None = None  # at most N calls per window seconds
        self._written: dict[Destination, float] = {}
        self._history: dict[Destination, tuple[Route, str] | None] = {}
        self._call_times: deque[float] = deque()
        self.made = 0
        self._lock = threading.Lock()

    # --- test controls ----------------------------------------------------------------------

    def put_foreign(self, route: Route, owner: str = "operator") -> None:
        self.routes[route.destination] = (route, owner)

    def fail_next(self, destination: Destination, error: RouteError) -> None:
        self.faults[destination].append(error)

    def fail_next_call(self, error: RouteError) -> None:
        self.call_faults.append(error)

    def owned(self) -> dict[Destination, Route]:
        return {d: r for d, (r, owner) in self.routes.items() if owner == "ours"}

    def attempts(self) -> int:
        """Changes sent to the table, whatever became of them."""
        return sum(int(c.split(":")[1]) for c in self.calls if c.startswith("apply:"))

    def writes(self) -> int:
        """Changes the table made (refused and throttled ones do not count)."""
        return self.made

    # --- RouteTable protocol ----------------------------------------------------------------

    def observe(self) -> Observation:
        with self._lock:
            self.calls.append("observe")
            self._rate_check()
            now = self.clock()
            owned: dict[Destination, Observed] = {}
            foreign: dict[Destination, Foreign] = {}
            for destination, (route, owner) in self._visible(now).items():
                if owner == "ours":
                    written = self._written.get(destination, -1e9)
                    pending = now - written < self.pending_for
                    state = EntryState.PENDING if pending else EntryState.ACTIVE
                    if route.next_hop == "blackhole":
                        state = EntryState.BROKEN
                    owned[destination] = Observed(route, state)
                else:
                    foreign[destination] = Foreign(
                        route, holder=owner, adoptable=owner == "flanneld"
                    )
            capacity = None
            if self.report_capacity and self.limit is not None:
                capacity = Capacity(self.limit, len(self.routes))
            return Observation(owned=owned, foreign=foreign, capacity=capacity)

    def _visible(self, now: float) -> dict[Destination, tuple[Route, str]]:
        """The table as a lagging read sees it: writes younger than read_lag are not seen."""
        if not self.read_lag:
            return dict(self.routes)
        seen = dict(self.routes)
        for destination, written in self._written.items():
            if now - written < self.read_lag:
                before = self._history.get(destination)
                if before is None:
                    seen.pop(destination, None)
                else:
                    seen[destination] = before
        return seen

    def apply(self, plan: Plan, deadline: float | None = None) -> Sequence[Outcome]:
        with self._lock:
            changes = list(plan)[: self.batch] if self.batch else list(plan)
            self.calls.append(f"apply:{len(changes)}")
            self._rate_check()
            if self.call_faults:
                raise self.call_faults.popleft()
            outcomes = []
            for change in changes:
                if deadline is not None and self.clock() >= deadline:
                    break
                outcomes.append(self._one(change))
            return outcomes

    def _rate_check(self) -> None:
        if self.rate is None:
            return
        most, window = self.rate
        now = self.clock()
        while self._call_times and now - self._call_times[0] > window:
            self._call_times.popleft()
        if len(self._call_times) >= most:
            raise Throttled("RequestLimitExceeded", retry_after=window)
        self._call_times.append(now)

    def _one(self, change: Change) -> Outcome:
        route = change.entry
        assert isinstance(route, Route)
        destination = route.destination
        if self.faults[destination]:
            return Outcome(change, self.faults[destination].popleft())
        present = self.routes.get(destination)
        if change.action is Action.DELETE:
            if present is None or present[1] != "ours":
                return Outcome(change, RouteNotFound(f"no route to {destination}"))
            self._write(destination, None)
            return Outcome(change)
        if present is not None and present[1] != "ours":
            adopting = change.action is Action.ADOPT and present[0] == route
            if not adopting:
                return Outcome(
                    change, RouteConflict(f"{destination} is held by {present[1]}: {present[0]}")
                )
        if change.action is Action.ADD and present is None and self._full():
            return Outcome(change, QuotaExceeded(f"route limit {self.limit} reached"))
        self._write(destination, (route, "ours"))
        return Outcome(change, pending=self.pending_for > 0)

    def _write(self, destination: Destination, value: tuple[Route, str] | None) -> None:
        self.made += 1
        self._history[destination] = self.routes.get(destination)
        self._written[destination] = self.clock()
        if value is None:
            del self.routes[destination]
        else:
            self.routes[destination] = value

    def _full(self) -> bool:
        return self.limit is not None and len(self.routes) >= self.limit

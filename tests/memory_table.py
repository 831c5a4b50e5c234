"""An in-memory route table that behaves like a cloud table, with error injection.

It holds routes of several owners, as a shared VPC route table does: only the routes marked
as ours are observed. Faults are queued per destination (or for the next whole call) and
raised as the route-error classes a real provider maps its API errors to.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Sequence

from cloudroutes.errors import QuotaExceeded, RouteConflict, RouteError, RouteNotFound
from cloudroutes.routes import Action, Change, Destination, Outcome, Plan, Route


class MemoryRouteTable:
    def __init__(self, name: str = "memory", *, limit: int | None = None) -> None:
        self.name = name
        self.resync_period = 60.0
        self.limit = limit
        self.routes: dict[Destination, tuple[Route, str]] = {}
        self.faults: dict[Destination, deque[RouteError]] = defaultdict(deque)
        self.call_faults: deque[RouteError] = deque()
        self.calls: list[str] = []
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

    # --- RouteTable protocol ----------------------------------------------------------------

    def observe(self) -> set[Route]:
        with self._lock:
            self.calls.append("observe")
            return set(self.owned().values())

    def apply(self, plan: Plan) -> Sequence[Outcome]:
        with self._lock:
            self.calls.append(f"apply:{len(plan)}")
            if self.call_faults:
                raise self.call_faults.popleft()
            return [self._one(change) for change in plan]

    def _one(self, change: Change) -> Outcome:
        destination = change.route.destination
        if self.faults[destination]:
            return Outcome(change, self.faults[destination].popleft())
        present = self.routes.get(destination)
        if change.action is Action.DELETE:
            if present is None or present[1] != "ours":
                return Outcome(change, RouteNotFound(f"no route to {destination}"))
            del self.routes[destination]
            return Outcome(change)
        if present is not None and present[1] != "ours":
            return Outcome(
                change, RouteConflict(f"{destination} is held by {present[1]}: {present[0]}")
            )
        if change.action is Action.ADD and present is None and self._full():
            return Outcome(change, QuotaExceeded(f"route limit {self.limit} reached"))
        self.routes[destination] = (change.route, "ours")
        return Outcome(change)

    def _full(self) -> bool:
        return self.limit is not None and len(self.routes) >= self.limit

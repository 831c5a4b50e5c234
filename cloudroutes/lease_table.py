"""The lease table: every node's current lease, keyed by lease key.

It is the only state the reconciler reads. A lease source fills it with a snapshot and then
with changes; listeners are told after each update, so reconcilers wake up coalesced.

Every update that changes something is a new generation, and the table remembers which keys
each recent generation changed and when. A reconciler that saw generation g asks for what
changed since, and recomputes the routes of those leases only.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cloudroutes.lease import Lease


class EventType(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True)
class LeaseEvent:
    type: EventType
    lease: Lease


@dataclass(frozen=True)
class _Generation:
    number: int
    arrived: float
    keys: frozenset[str]


@dataclass(frozen=True)
class LeaseChanges:
    """The leases changed since a generation: their current value, None when removed."""

    leases: dict[str, Lease | None]
    generation: int


Listener = Callable[[], None]
# Generations remembered; a reader further behind gets a full snapshot instead.
_HISTORY = 4096


class LeaseTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._revision = 0
        self._generation = 0
        self._history: deque[_Generation] = deque(maxlen=_HISTORY)
        self._listeners: list[Listener] = []
        self._synced = threading.Event()

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def replace_all(self, leases: Iterable[Lease], revision: int) -> None:
        """Install a full snapshot (initial list, or a re-list after compaction)."""
        fresh = {lease.key: lease for lease in leases}
        with self._lock:
            old = self._leases
            changed = {k for k in old.keys() | fresh.keys() if old.get(k) != fresh.get(k)}
            self._leases = fresh
            self._revision = revision
            self._record(changed)
        self._synced.set()
        if changed:
            self._notify()

    def apply(self, events: Iterable[LeaseEvent], revision: int) -> None:
        changed: set[str] = set()
        with self._lock:
            for event in events:
                key = event.lease.key
                if event.type is EventType.ADDED:
                    if self._leases.get(key) != event.lease:
                        self._leases[key] = event.lease
                        changed.add(key)
                elif self._leases.pop(key, None) is not None:
                    changed.add(key)
            self._revision = max(self._revision, revision)
            self._record(changed)
        if changed:
            self._notify()

    def _record(self, keys: set[str]) -> None:
        if keys:
            self._generation += 1
            self._history.append(_Generation(self._generation, time.monotonic(), frozenset(keys)))

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def snapshot(self) -> tuple[list[Lease], int]:
        """The leases and the generation they belong to."""
        with self._lock:
            return list(self._leases.values()), self._generation

    def changes_since(self, generation: int) -> LeaseChanges | None:
        """What changed after ``generation``; None when that is too far back to know."""
        with self._lock:
            if generation == self._generation:
                return LeaseChanges({}, generation)
            oldest = self._history[0].number if self._history else self._generation + 1
            if generation + 1 < oldest or generation > self._generation:
                return None
            keys: set[str] = set()
            for entry in reversed(self._history):
                if entry.number <= generation:
                    break
                keys |= entry.keys
            return LeaseChanges({k: self._leases.get(k) for k in keys}, self._generation)

    def arrival_times(self, after: int, upto: int) -> list[float]:
        """When the changes of generations in (after, upto] arrived, for latency metrics."""
        times = []
        with self._lock:
            for entry in reversed(self._history):
                if entry.number <= after:
                    break
                if entry.number <= upto:
                    times.append(entry.arrived)
        return times

    def get(self, key: str) -> Lease | None:
        with self._lock:
            return self._leases.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    @property
    def revision(self) -> int:
        with self._lock:
            return self._revision

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

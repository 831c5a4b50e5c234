"""The lease table: every node's current lease, keyed by lease key.

It is the only state the reconciler reads. A lease source fills it with a snapshot and then
with changes; listeners are told after each update, so reconcilers wake up coalesced.
"""

from __future__ import annotations

import enum
import threading
import time
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


Listener = Callable[[], None]
# Arrival times kept for latency metrics; older ones are dropped.
_HISTORY = 4096


class LeaseTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._revision = 0
        self._generation = 0
        # When the oldest change not yet turned into routes arrived, per generation; the
        # reconciler reads it to measure lease-event-to-route latency.
        self._changed_at: dict[int, float] = {}
        self._listeners: list[Listener] = []
        self._synced = threading.Event()

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def replace_all(self, leases: Iterable[Lease], revision: int) -> None:
        """Install a full snapshot (initial list, or a re-list after compaction)."""
        fresh = {lease.key: lease for lease in leases}
        with self._lock:
            changed = fresh != self._leases
            self._leases = fresh
            self._revision = revision
            if changed:
                self._bump()
        self._synced.set()
        if changed:
            self._notify()

    def apply(self, events: Iterable[LeaseEvent], revision: int) -> None:
        changed = False
        with self._lock:
            for event in events:
                key = event.lease.key
                if event.type is EventType.ADDED:
                    if self._leases.get(key) != event.lease:
                        self._leases[key] = event.lease
                        changed = True
                elif self._leases.pop(key, None) is not None:
                    changed = True
            self._revision = max(self._revision, revision)
            if changed:
                self._bump()
        if changed:
            self._notify()

    def _bump(self) -> None:
        self._generation += 1
        self._changed_at[self._generation] = time.monotonic()
        if len(self._changed_at) > _HISTORY:
            del self._changed_at[self._generation - _HISTORY]

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def snapshot(self) -> tuple[list[Lease], int]:
        """The leases and the generation they belong to."""
        with self._lock:
            return list(self._leases.values()), self._generation

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

    def changed_between(self, after: int, upto: int) -> list[float]:
        """Arrival times of the changes of generations in (after, upto]."""
        with self._lock:
            return [
                self._changed_at[g] for g in range(after + 1, upto + 1) if g in self._changed_at
            ]

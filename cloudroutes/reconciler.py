"""The one reconcile loop, for kernel and cloud route tables alike.

Level-triggered: each pass takes the desired entries (from the lease table) and the entries the
table holds, diffs them into a plan and applies it. Lease changes wake it, coalesced; a
periodic resync reads the table again and repairs drift. Between reads the reconciler keeps its
own picture of the table, updated by its writes, so a lease change costs one change, not a
full read.

Each entry's outcome is classified by the error class the table raised:

=================  ==========================================================================
programmed         the entry is in the table
pending            accepted by the table, not in effect yet; read again after the settle time
retry              a transient failure; retried with backoff, after reading the table again
throttled          the API asked us to slow down; every table sharing the gate waits it out
quota-blocked      the table is full; no creates until room appears (a delete, a raised quota)
failed             refused for good (a conflict with an entry we do not own, a bad next hop,
                   a missing permission); retried with a growing backoff, logged once
=================  ==========================================================================

A lease whose entries cannot be computed (refused by vetting, or a backend error) is that
lease's failure alone: every other lease keeps converging.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cloudroutes.errors import (
    LeaseRefused,
    QuotaExceeded,
    RouteError,
    RouteNotFound,
    Throttled,
    Transient,
)
from cloudroutes.lease import Lease
from cloudroutes.lease_table import LeaseTable
from cloudroutes.metrics import Metrics
from cloudroutes.plan import make_plan
from cloudroutes.routes import (
    UNKNOWN,
    Action,
    Change,
    Entry,
    EntryKey,
    EntryState,
    Foreign,
    Observation,
    Observed,
    Outcome,
    Plan,
    RouteTable,
    TableLimits,
)

log = logging.getLogger(__name__)

# Maps one lease to the entries a table should hold for it. Entries depend on that lease alone
# (and on this node), so the reconciler recomputes just the leases that changed. Raising
# LeaseRefused (or anything else) makes it that lease's failure, with the message as reason.
DesiredEntries = Callable[[Lease], Iterable[Entry]]

# How often a reconciler that may not act (it lost an election) looks again.
STANDBY_POLL = 0.5
FULL_TABLE = "route table is full; waiting for room (delete routes or raise the quota)"


class RouteState(enum.Enum):
    PROGRAMMED = "programmed"
    PENDING = "pending"
    RETRY = "retry"
    THROTTLED = "throttled"
    QUOTA_BLOCKED = "quota-blocked"
    FAILED = "failed"


@dataclass(frozen=True)
class RouteStatus:
    entry: Entry
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
    # An entry the table refused for good is tried again on this backoff, not every pass.
    refused: Backoff = Backoff(5.0, 300.0)
    # Each wait is scaled by a random factor in [1 - jitter, 1 + jitter], so agents that failed
    # together do not retry together.
    jitter: float = 0.2


class Gate:
    """A time before which no table behind it may be called. Tables of one cloud account share
    one, so that throttling seen by one table pauses them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._not_before = 0.0

    @property
    def not_before(self) -> float:
        with self._lock:
            return self._not_before

    def hold_until(self, when: float) -> None:
        with self._lock:
            self._not_before = max(self._not_before, when)

    def release(self) -> None:
        with self._lock:
            self._not_before = 0.0


def classify(change: Change, error: Exception | None, pending: bool = False) -> RouteState:
    if error is None:
        return RouteState.PENDING if pending else RouteState.PROGRAMMED
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
        return all(
            classify(o.change, o.error, o.pending) is RouteState.PROGRAMMED for o in self.outcomes
        )


@dataclass(frozen=True)
class Preview:
    """What a pass would do now: the plan, the wanted keys held by others, and the leases
    refused, for `cloudroutes plan`."""

    plan: Plan
    conflicts: dict[EntryKey, Foreign]
    refused: dict[str, str]
    # Creates a full table has no room for (left out of the plan).
    blocked: tuple[Change, ...] = ()


class _DesiredState:
    """The desired entries, kept per lease so one lease change recomputes one lease.

    Claims are keyed by lease: two leases that want the same entry both hold a claim, and
    removing one leaves the other's. Two claims on one key with different entries (a store
    that is not healthy) resolve to the smallest, so every node picks the same one.
    """

    def __init__(self, desired: DesiredEntries) -> None:
        self._desired = desired
        self.by_lease: dict[str, list[Entry]] = {}
        self.claims: dict[EntryKey, dict[str, Entry]] = {}
        self.entries: dict[EntryKey, Entry] = {}
        self.refused: dict[str, str] = {}

    def compute(self, lease: Lease) -> tuple[list[Entry], str | None]:
        """A lease's entries, or why there are none; never raises, changes nothing."""
        try:
            return list(self._desired(lease)), None
        except LeaseRefused as exc:
            return [], str(exc)
        except Exception as exc:
            log.debug("computing the entries of lease %s failed", lease.key, exc_info=True)
            return [], f"cannot compute its routes: {exc or type(exc).__name__}"

    def set(self, lease_key: str, lease: Lease | None) -> set[EntryKey]:
        """Recompute one lease (None: removed); return the keys that may have changed."""
        entries, refusal = self.compute(lease) if lease is not None else ([], None)
        touched: set[EntryKey] = set()
        for entry in self.by_lease.pop(lease_key, ()):
            claims = self.claims.get(entry.key)
            if claims is not None:
                claims.pop(lease_key, None)
            touched.add(entry.key)
        if entries:
            self.by_lease[lease_key] = entries
        for entry in entries:
            self.claims.setdefault(entry.key, {})[lease_key] = entry
            touched.add(entry.key)
        if refusal is None:
            self.refused.pop(lease_key, None)
        else:
            self.refused[lease_key] = refusal
        for key in touched:
            claims = self.claims.get(key)
            if claims:
                self.entries[key] = min(claims.values(), key=lambda e: (e.sort_key(), e.lease_key))
            else:
                self.claims.pop(key, None)
                self.entries.pop(key, None)
        return touched


@dataclass
class _Picture:
    """What the reconciler believes the table holds: the last read, plus its own writes."""

    owned: dict[EntryKey, Observed]
    foreign: dict[EntryKey, Foreign]
    limit: int | None
    used: int

    @classmethod
    def of(cls, observation: Observation) -> _Picture:
        capacity = observation.capacity
        return cls(
            owned=dict(observation.owned),
            foreign=dict(observation.foreign),
            limit=capacity.limit if capacity else None,
            used=capacity.used if capacity else len(observation.owned),
        )


@dataclass
class _Hold:
    """An entry the table refused for good: not tried again before ``until``."""

    until: float
    attempts: int


@dataclass
class _Said:
    """The last state logged per key, so the log says each change of state once."""

    states: dict[object, tuple[str, str]] = field(default_factory=dict)

    def changed(self, key: object, state: str, reason: str) -> bool:
        if self.states.get(key) == (state, reason):
            return False
        self.states[key] = (state, reason)
        return True


class Reconciler:
    def __init__(
        self,
        table: RouteTable,
        leases: LeaseTable,
        desired: DesiredEntries,
        *,
        metrics: Metrics | None = None,
        policy: ReconcilePolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        actions: frozenset[Action] | None = None,
        active: Callable[[], bool] | None = None,
    ) -> None:
        """``actions``: the only actions this reconciler may take (a garbage collector may only
        delete); None: all. ``active``: whether it may act now (it holds the election its
        table needs); while not, it reads and writes nothing, and it reads the whole table
        when it becomes active."""
        self.table = table
        self.leases = leases
        self._desired_fn = desired
        self.metrics = metrics
        self.policy = policy or ReconcilePolicy()
        self.limits: TableLimits = getattr(table, "limits", None) or TableLimits()
        self.gate: Gate = getattr(table, "gate", None) or Gate()
        self._clock = clock
        self._rng = rng or random.Random()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()
        self._want = _DesiredState(desired)
        self._want_generation: int | None = None
        self._picture: _Picture | None = None
        self._status: dict[EntryKey, RouteStatus] = {}
        self._generation_done = 0
        self._retry_attempt = 0
        self._throttle_attempt = 0
        self._not_before = 0.0
        self._settle_at: float | None = None
        self._quota_full = False
        # Keys whose creates were refused for quota, planned again when room appears.
        self._awaiting_room: set[EntryKey] = set()
        # Keys to plan in the next pass though their leases did not change.
        self._replan: set[EntryKey] = set()
        self._holds: dict[EntryKey, _Hold] = {}
        # Our recent writes: (entry or None for a delete, when), for tables whose reads lag.
        self._recent: dict[EntryKey, tuple[Entry | None, float]] = {}
        self._said = _Said()
        self._refused: dict[str, str] = {}
        self._problem: str | None = None
        self._passes = 0
        self._actions = actions
        self._active = active
        self._was_active = False
        leases.subscribe(self.wake)

    # --- triggers -------------------------------------------------------------------------

    def wake(self) -> None:
        """A lease changed: reconcile soon (many wakes coalesce into one pass)."""
        self._wakeup.set()

    def invalidate(self) -> None:
        """The table changed behind our back: read it again in the next pass, which comes now.
        What it refused before may go through now (a link came up), so nothing stays held."""
        with self._lock:
            self._picture = None
            for hold in self._holds.values():
                hold.until = 0.0
        self._wakeup.set()

    # --- one pass ---------------------------------------------------------------------------

    def preview(self) -> Preview:
        """What a pass would change now, changing nothing (always a fresh read)."""
        leases, _ = self.leases.snapshot()
        want = _DesiredState(self._desired_fn)
        for lease in leases:
            want.set(lease.key, lease)
        observation = self.table.observe()
        diff = make_plan(want.entries, observation.owned, observation.foreign)
        plan = diff.plan
        if self._actions is not None:
            plan = Plan(tuple(c for c in plan if c.action in self._actions))
        plan, blocked = self._within_room(plan, _Picture.of(observation), probe=False)
        return Preview(plan, diff.conflicts, dict(want.refused), tuple(blocked))

    def plan(self) -> Plan:
        return self.preview().plan

    def reconcile(self, *, resync: bool = False) -> PassResult:
        """One pass. Between reads it trusts its own picture of the table and plans only the
        keys whose leases changed, so a lease event costs O(changes), not O(leases). A resync,
        a settle time come, or a picture made doubtful by a failure or drift, reads the table
        and plans everything."""
        started = self._clock()
        if not self.is_active():
            return PassResult(plan=Plan(), outcomes=())
        scope = self._update_want(full=resync)
        with self._lock:
            need_read = resync or self._picture is None or self._settle_due(started)
        if need_read:
            observation = self.table.observe()  # no lock held: /status never waits on a cloud
            with self._lock:
                self._picture = _Picture.of(observation)
                self._settle_at = None
                self._overlay_recent(self._picture, started)
                if any(o.state is EntryState.PENDING for o in self._picture.owned.values()):
                    settle = started + self.limits.settle
                    self._settle_at = min(self._settle_at or settle, settle)
            scope = None
        with self._lock:
            picture = self._picture
            assert picture is not None
            if scope is None:
                self._replan.clear()
                self._awaiting_room.clear()
            else:
                # Creates waiting for room are planned again in every pass: a delete in this
                # very pass may free room for them.
                scope |= self._replan | self._awaiting_room | self._due_holds(started)
                self._replan.clear()
            diff = make_plan(self._want.entries, picture.owned, picture.foreign, keys=scope)
            plan = diff.plan
            if self._actions is not None:
                plan = Plan(tuple(c for c in plan if c.action in self._actions))
            plan, held = self._without_held(plan, started)
            plan, blocked = self._within_room(plan, picture, probe=resync)
            plan, deferred = self._within_cap(plan)
        deadline = (
            started + self.limits.pass_deadline if self.limits.pass_deadline is not None else None
        )
        outcomes, unstarted = self._apply(plan, deadline)
        self._record(scope, diff.conflicts, outcomes, blocked, [*deferred, *unstarted], held)
        result = PassResult(plan=plan, outcomes=tuple(outcomes))
        self._schedule(result, bool(deferred or unstarted))
        self._observe_metrics(result, self._clock() - started)
        self._passes += 1
        return result

    def is_active(self) -> bool:
        """Whether this reconciler may act now; on becoming active it forgets its picture, so
        its first pass reads the whole table (another writer may have changed it)."""
        if self._active is None:
            return True
        active = self._active()
        if active and not self._was_active:
            with self._lock:
                self._picture = None
            self._want_generation = None
        elif not active and self._was_active:
            with self._lock:
                self._status = {}
        self._was_active = active
        return active

    def _update_want(self, *, full: bool) -> set[EntryKey] | None:
        """Bring the desired entries up to the lease table; return the keys that may have
        changed, or None when everything was recomputed (a resync, or fallen too far behind)."""
        changes = None
        if not full and self._want_generation is not None:
            changes = self.leases.changes_since(self._want_generation)
        if changes is None:
            leases, generation = self.leases.snapshot()
            want = _DesiredState(self._desired_fn)
            for lease in leases:
                want.set(lease.key, lease)
            for key in [k for k in self._holds if want.entries.get(k) != self._want.entries.get(k)]:
                del self._holds[key]  # its lease changed: try it now
            self._want = want
            self._want_generation = generation
            self._report_refusals()
            return None
        scope: set[EntryKey] = set()
        for key, lease in changes.leases.items():
            touched = self._want.set(key, lease)
            scope |= touched
            for entry_key in touched:
                self._holds.pop(entry_key, None)  # the lease changed: try its entries now
        self._want_generation = changes.generation
        if changes.leases:
            self._report_refusals()
        return scope

    def _settle_due(self, now: float) -> bool:
        return self._settle_at is not None and now >= self._settle_at

    def _overlay_recent(self, picture: _Picture, now: float) -> None:
        """A read that lags our writes would plan them again: take a change we made within the
        table's read lag and not seen yet as pending (a delete as done)."""
        lag = self.limits.read_lag
        for key, (entry, when) in list(self._recent.items()):
            if now - when > lag:
                del self._recent[key]
                continue
            seen = picture.owned.get(key)
            if entry is None:
                if seen is not None:
                    del picture.owned[key]
                    picture.used -= 1
            elif seen is None or seen.entry != entry:
                if seen is None:
                    picture.used += 1
                picture.owned[key] = Observed(entry, EntryState.PENDING)
                if self._settle_at is None:
                    self._settle_at = when + lag

    def _due_holds(self, now: float) -> set[EntryKey]:
        return {key for key, hold in self._holds.items() if hold.until <= now}

    def _without_held(self, plan: Plan, now: float) -> tuple[Plan, list[Change]]:
        if not self._holds:
            return plan, []
        keep, held = [], []
        for change in plan:
            hold = self._holds.get(change.key)
            (held if hold is not None and hold.until > now else keep).append(change)
        return Plan(tuple(keep)), held

    def _within_room(
        self, plan: Plan, picture: _Picture, *, probe: bool
    ) -> tuple[Plan, list[Change]]:
        """Plan only as many creates as there is room for, in plan order; a full table costs
        no doomed calls. After a quota error, a resync tries one create, in case the quota was
        raised."""
        room = math.inf
        if picture.limit is not None:
            frees = sum(1 for c in plan if c.action is Action.DELETE)
            room = max(0, picture.limit - picture.used + frees)
        if self._quota_full:
            room = min(room, 1 if probe else 0)
        adds = [c for c in plan if c.action is Action.ADD]
        if len(adds) <= room:
            return plan, []
        blocked = adds[int(room) :]
        dropped = {id(c) for c in blocked}
        return Plan(tuple(c for c in plan if id(c) not in dropped)), blocked

    def _within_cap(self, plan: Plan) -> tuple[Plan, list[Change]]:
        cap = self.limits.max_changes
        if cap is None or len(plan) <= cap:
            return plan, []
        return Plan(plan.changes[:cap]), list(plan.changes[cap:])

    def _apply(self, plan: Plan, deadline: float | None) -> tuple[list[Outcome], list[Change]]:
        """The outcomes, matched to changes by key, and the changes the table did not start."""
        if not plan:
            return [], []
        try:
            outcomes = list(self.table.apply(plan, deadline))
        except RouteError as exc:
            return [Outcome(c, exc) for c in plan], []
        answered = {o.change.key for o in outcomes}
        missing = [c for c in plan if c.key not in answered]
        if missing and deadline is None:
            log.error(
                "route table %s gave no outcome for %d changes", self.table.name, len(missing)
            )
            return outcomes + [Outcome(c, Transient("no outcome reported")) for c in missing], []
        return outcomes, missing

    def _record(
        self,
        scope: set[EntryKey] | None,
        conflicts: dict[EntryKey, Foreign],
        outcomes: list[Outcome],
        blocked: list[Change],
        deferred: list[Change],
        held: list[Change],
    ) -> None:
        now = self._clock()
        want = self._want.entries
        with self._lock:
            picture = self._picture
            assert picture is not None
            status = {} if scope is None else self._status
            for key in want if scope is None else scope:
                entry = want.get(key)
                if entry is None:
                    status.pop(key, None)
                    self._said.states.pop(key, None)
                    continue
                seen = picture.owned.get(key)
                if seen is not None and seen.entry == entry:
                    if seen.state is EntryState.PENDING:
                        status[key] = RouteStatus(
                            entry, RouteState.PENDING, "accepted, not in effect yet"
                        )
                    elif seen.state is EntryState.ACTIVE:
                        status[key] = RouteStatus(entry, RouteState.PROGRAMMED)
                    else:
                        status[key] = RouteStatus(entry, RouteState.PENDING)
                elif scope is None or key not in status:
                    status[key] = RouteStatus(entry, RouteState.PENDING)
            for key, foreign in conflicts.items():
                status[key] = RouteStatus(want[key], RouteState.FAILED, foreign.conflict(key))
            doubtful = False
            for outcome in outcomes:
                doubtful |= self._record_outcome(outcome, picture, status, now)
            for change in blocked:
                self._awaiting_room.add(change.key)
                status[change.key] = RouteStatus(change.entry, RouteState.QUOTA_BLOCKED, FULL_TABLE)
            for change in deferred:
                self._replan.add(change.key)
            for change in held:
                old = self._status.get(change.key)  # the last pass's, also when rebuilding
                if old is not None and old.state is RouteState.FAILED:
                    status[change.key] = RouteStatus(change.entry, old.state, old.reason)
            if doubtful:
                self._picture = None
            self._status = status
            touched = want.keys() if scope is None else scope
            self._announce(
                (key, status[key])
                for key in {*touched, *conflicts, *(o.change.key for o in outcomes)}
                if key in status
            )

    def _record_outcome(
        self,
        outcome: Outcome,
        picture: _Picture,
        status: dict[EntryKey, RouteStatus],
        now: float,
    ) -> bool:
        """Fold one outcome into the picture and the status; True when the picture is now
        doubtful and the table must be read again."""
        change = outcome.change
        key = change.key
        state = classify(change, outcome.error, outcome.pending)
        if self.metrics:
            self.metrics.route_changes.labels(
                self.table.name, change.action.value, state.value
            ).inc()
        if state in (RouteState.PROGRAMMED, RouteState.PENDING):
            self._holds.pop(key, None)
            self._awaiting_room.discard(key)
            if change.action is Action.DELETE:
                if picture.owned.pop(key, None) is not None:
                    picture.used -= 1
                self._recent[key] = (None, now)
                if self._quota_full:
                    self._quota_full = False
                    self._wakeup.set()
                return False
            if change.action is Action.ADD:
                if key not in picture.owned:
                    picture.used += 1
                if self._quota_full:
                    # A create went through: the quota was raised. Plan the others now.
                    self._quota_full = False
                    self._wakeup.set()
            mark = EntryState.PENDING if outcome.pending else EntryState.ACTIVE
            picture.owned[key] = Observed(change.entry, mark)
            picture.foreign.pop(key, None)
            self._recent[key] = (change.entry, now)
            if outcome.pending:
                status[key] = RouteStatus(change.entry, state, "accepted, not in effect yet")
                settle = now + self.limits.settle
                self._settle_at = (
                    settle if self._settle_at is None else min(self._settle_at, settle)
                )
            else:
                status[key] = RouteStatus(change.entry, state)
            return False
        reason = str(outcome.error)
        if state in (RouteState.THROTTLED, RouteState.RETRY):
            self._replan.add(key)  # nothing changed, or the read decides: plan it again
        if state is RouteState.QUOTA_BLOCKED:
            self._quota_full = True
            self._awaiting_room.add(key)
        elif state is RouteState.FAILED:
            hold = self._holds.get(key)
            attempts = hold.attempts + 1 if hold else 1
            wait = self._jittered(self.policy.refused.delay(attempts))
            self._holds[key] = _Hold(now + wait, attempts)
        if change.action is not Action.DELETE:
            status[key] = RouteStatus(change.entry, state, reason)
        elif state is not RouteState.PROGRAMMED:
            self._announce([(("delete", key), RouteStatus(change.entry, state, reason))])
        if state is RouteState.RETRY:
            present = outcome.present
            if present is UNKNOWN:
                return True  # a transient failure may have left anything: read again
            if present is None:
                if picture.owned.pop(key, None) is not None:
                    picture.used -= 1
            else:
                picture.owned[key] = Observed(present)  # type: ignore[arg-type]
        return False

    def _announce(self, items: Iterable[tuple[object, RouteStatus]]) -> None:
        """Log each key's state when it changes, once per change and not at every pass; keys
        that changed to the same state for the same reason (a throttled table) share a line."""
        news: dict[tuple[RouteState, str], list[str]] = {}
        for key, st in items:
            if not self._said.changed(key, st.state.value, st.reason):
                continue
            if st.state is RouteState.PROGRAMMED or st.state is RouteState.PENDING:
                continue
            action = f"delete {st.entry}" if isinstance(key, tuple) else str(st.entry)
            news.setdefault((st.state, st.reason), []).append(action)
        for (state, reason), actions in news.items():
            what = actions[0] if len(actions) == 1 else f"{len(actions)} routes ({actions[0]}, ...)"
            log.warning("%s: %s: %s: %s", self.table.name, what, state.value, reason)

    def _report_refusals(self) -> None:
        refused = self._want.refused
        for lease_key, reason in refused.items():
            if self._said.changed(("lease", lease_key), "refused", reason):
                log.warning("%s: not routing lease %s: %s", self.table.name, lease_key, reason)
                if self.metrics:
                    self.metrics.lease_refusals.labels(self.table.name).inc()
        for said in [k for k in self._said.states if isinstance(k, tuple) and k[0] == "lease"]:
            if said[1] not in refused:
                del self._said.states[said]
        with self._lock:
            self._refused = dict(refused)
        if self.metrics:
            self.metrics.leases_refused.labels(self.table.name).set(len(refused))

    def _jittered(self, delay: float) -> float:
        spread = self.policy.jitter
        return delay * self._rng.uniform(1 - spread, 1 + spread)

    def _schedule(self, result: PassResult, more: bool) -> None:
        outcomes = result.outcomes
        states = {classify(o.change, o.error, o.pending) for o in outcomes}
        now = self._clock()
        if RouteState.THROTTLED in states:
            self._throttle_attempt += 1
            wait = self.policy.throttle.delay(self._throttle_attempt)
            advice = [o.error.retry_after for o in outcomes if isinstance(o.error, Throttled)]
            wait = max([wait, *[a for a in advice if a]])
            self.gate.hold_until(now + self._jittered(wait))
            self._wakeup.set()
        elif RouteState.RETRY in states:
            self._throttle_attempt = 0
            self._retry_attempt += 1
            self._not_before = now + self._jittered(self.policy.retry.delay(self._retry_attempt))
            self._wakeup.set()
        else:
            self._throttle_attempt = 0
            self._retry_attempt = 0
            self._not_before = 0.0
        if more:
            self._wakeup.set()

    def _observe_metrics(self, result: PassResult, took: float) -> None:
        if self.metrics is None:
            return
        name = self.table.name
        self.metrics.reconcile_duration.labels(name).observe(took)
        counts = Counter(status.state for status in self.status().values())
        self.metrics.routes_desired.labels(name).set(len(self._want.entries))
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

    def _next_due(self, next_resync: float) -> float:
        """When the next pass is due: at once when woken, else the earliest timer; never before
        the backoff (throttling included, resyncs too) lets us call the table."""
        due = next_resync
        if self._wakeup.is_set():
            due = self._clock()
        with self._lock:
            if self._settle_at is not None:
                due = min(due, self._settle_at)
            if self._holds:
                due = min(due, min(h.until for h in self._holds.values()))
        return max(due, self._not_before, self.gate.not_before)

    def run(self, stop: threading.Event) -> None:
        """Reconcile until ``stop`` is set: on wake-ups, retries, settle times and resyncs."""
        next_resync = self._clock()
        while not stop.is_set():
            if not self.is_active():
                stop.wait(STANDBY_POLL)  # until this node wins the election its table needs
                continue
            due = self._next_due(next_resync)
            now = self._clock()
            if now < due:
                gated = max(self._not_before, self.gate.not_before) > now
                if gated or self._wakeup.is_set():
                    stop.wait(min(due - now, 0.5))
                else:
                    self._wait_for_wakeup(stop, due - now)
                continue
            resync = now >= next_resync
            if not resync and self.policy.coalesce and self._wakeup.is_set():
                stop.wait(self.policy.coalesce)
            self._wakeup.clear()
            try:
                self.reconcile(resync=resync)
            except Exception as exc:
                # observe() failed, or a bug: keep the loop alive and read the table next time.
                if isinstance(exc, Throttled):
                    self._throttle_attempt += 1
                    wait = max(
                        self.policy.throttle.delay(self._throttle_attempt), exc.retry_after or 0
                    )
                    self.gate.hold_until(self._clock() + self._jittered(wait))
                else:
                    self._retry_attempt += 1
                    self._not_before = self._clock() + self._jittered(
                        self.policy.retry.delay(self._retry_attempt)
                    )
                self._table_failed(exc)
                with self._lock:
                    self._picture = None
                self._wakeup.set()
                continue
            self._table_answers()
            if resync:
                next_resync = self._clock() + self.table.resync_period

    def _table_failed(self, exc: Exception) -> None:
        """A pass failed as a whole (the table could not be read: bad credentials, a refused
        list, an unreachable API): one status and one log line per distinct reason."""
        reason = str(exc) or type(exc).__name__
        with self._lock:
            self._problem = reason
        if self._said.changed(("table",), "failed", reason):
            log.warning(
                "%s: cannot reconcile the route table (retrying with backoff): %s",
                self.table.name,
                reason,
                exc_info=not isinstance(exc, RouteError),
            )
        if self.metrics:
            self.metrics.route_table_up.labels(self.table.name).set(0)

    def _table_answers(self) -> None:
        with self._lock:
            was, self._problem = self._problem, None
        if was is not None:
            self._said.changed(("table",), "ok", "")
            log.info("%s: the route table answers again", self.table.name)
        if self.metrics:
            self.metrics.route_table_up.labels(self.table.name).set(1)

    def _wait_for_wakeup(self, stop: threading.Event, timeout: float) -> None:
        end = self._clock() + timeout
        while not stop.is_set() and not self._wakeup.is_set():
            left = end - self._clock()
            if left <= 0:
                return
            self._wakeup.wait(min(left, 0.5))

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[EntryKey, RouteStatus]:
        with self._lock:
            return dict(self._status)

    def refused(self) -> dict[str, str]:
        """Leases this table does not serve, with the reason (lease key -> reason)."""
        with self._lock:
            return dict(self._refused)

    @property
    def passes(self) -> int:
        return self._passes

    @property
    def problem(self) -> str | None:
        """Why the last pass failed as a whole (the table could not be read), or None."""
        with self._lock:
            return self._problem

"""The reconciler against an in-memory table that injects every error class."""

from __future__ import annotations

import random
import threading
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from cloudroutes.errors import (
    LeaseRefused,
    QuotaExceeded,
    Rejected,
    RouteNotFound,
    Throttled,
    Transient,
)
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.lease_table import EventType, LeaseEvent, LeaseTable
from cloudroutes.metrics import Metrics
from cloudroutes.reconciler import Backoff, ReconcilePolicy, Reconciler, RouteState
from cloudroutes.routes import Action, Route, TableLimits
from tests.memory_table import MemoryRouteTable
from tests.wait import wait_for


def lease(n: int, host: int | None = None) -> Lease:
    return Lease(
        subnet=IPv4Network(f"10.5.{n}.0/24"),
        attrs=LeaseAttrs(public_ip=IPv4Address(f"198.18.0.{host or n}"), backend_type="test"),
    )


def to_instance(x: Lease) -> list[Route]:
    """Cloud-style desired routes: the subnet to the instance behind its public IP."""
    return [Route(x.subnet, f"i-{x.public_ip.packed[-1]}", lease_key=x.key)] if x.subnet else []


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def leases() -> LeaseTable:
    table = LeaseTable()
    table.replace_all([lease(1), lease(2), lease(3)], revision=1)
    return table


def make(table: MemoryRouteTable, leases: LeaseTable, **kw: object) -> Reconciler:
    return Reconciler(table, leases, to_instance, **kw)  # type: ignore[arg-type]


def net(n: int) -> IPv4Network:
    return IPv4Network(f"10.5.{n}.0/24")


def test_adds_every_lease_route_then_does_nothing() -> None:
    table, leases = MemoryRouteTable(), LeaseTable()
    leases.replace_all([lease(1), lease(2), lease(3)], revision=1)
    rec = make(table, leases)
    first = rec.reconcile()
    assert [c.action for c in first.plan] == [Action.ADD] * 3
    assert table.owned() == {net(n): Route(net(n), f"i-{n}") for n in (1, 2, 3)}
    assert all(s.state is RouteState.PROGRAMMED for s in rec.status().values())
    second = rec.reconcile()
    assert not second.plan
    assert table.calls.count("observe") == 1  # trusts its own writes between resyncs


def test_removed_lease_deletes_its_route_and_moved_lease_is_replaced(leases: LeaseTable) -> None:
    table = MemoryRouteTable()
    rec = make(table, leases)
    rec.reconcile()
    leases.apply([LeaseEvent(EventType.REMOVED, lease(2))], revision=2)
    leases.apply([LeaseEvent(EventType.ADDED, lease(3, host=9))], revision=3)
    result = rec.reconcile()
    assert [(c.action, str(c.key)) for c in result.plan] == [
        (Action.DELETE, "10.5.2.0/24"),
        (Action.REPLACE, "10.5.3.0/24"),
    ]
    assert table.owned() == {net(1): Route(net(1), "i-1"), net(3): Route(net(3), "i-9")}


def test_never_touches_routes_it_does_not_own(leases: LeaseTable) -> None:
    table = MemoryRouteTable()
    other = Route(IPv4Network("10.99.0.0/16"), "i-other")
    table.put_foreign(other, owner="another-cluster")
    table.put_foreign(Route(net(2), "pcx-operator"), owner="operator")
    rec = make(table, leases)
    rec.reconcile(resync=True)
    assert table.routes[other.destination] == (other, "another-cluster")
    status = rec.status()[net(2)]
    assert status.state is RouteState.FAILED
    assert "held by operator" in status.reason
    assert table.routes[net(2)][1] == "operator"


def test_transient_error_is_retried_with_backoff(leases: LeaseTable) -> None:
    clock = FakeClock()
    table = MemoryRouteTable()
    table.fail_next(net(2), Transient("503 from the API"))
    rec = make(
        table, leases, clock=clock, policy=ReconcilePolicy(retry=Backoff(1.0, 8.0), jitter=0)
    )
    rec.reconcile()
    assert rec.status()[net(2)].state is RouteState.RETRY
    assert rec.status()[net(2)].reason == "503 from the API"
    assert rec._not_before == pytest.approx(clock.now + 1.0)
    rec.reconcile()
    assert rec.status()[net(2)].state is RouteState.PROGRAMMED
    assert net(2) in table.owned()


def test_throttling_backs_off_the_whole_table(leases: LeaseTable) -> None:
    clock = FakeClock()
    table = MemoryRouteTable()
    table.fail_next_call(Throttled("RequestLimitExceeded"))
    table.fail_next_call(Throttled("RequestLimitExceeded"))
    rec = make(
        table, leases, clock=clock, policy=ReconcilePolicy(throttle=Backoff(2.0, 60.0), jitter=0)
    )
    rec.reconcile()
    assert {s.state for s in rec.status().values()} == {RouteState.THROTTLED}
    assert rec.gate.not_before == pytest.approx(clock.now + 2.0)
    clock.now += 2.0
    rec.reconcile()
    assert rec.gate.not_before == pytest.approx(clock.now + 4.0)  # doubles while throttled
    clock.now += 4.0
    rec.reconcile()
    assert len(table.owned()) == 3


def test_quota_blocks_creates_until_room_is_freed() -> None:
    table = MemoryRouteTable(limit=2)
    leases = LeaseTable()
    leases.replace_all([lease(1), lease(2), lease(3)], revision=1)
    rec = make(table, leases)
    rec.reconcile()
    assert rec.status()[net(3)].state is RouteState.QUOTA_BLOCKED
    assert rec.status()[net(3)].reason == "route limit 2 reached"
    calls = len(table.calls)
    leases.apply([LeaseEvent(EventType.ADDED, lease(4))], revision=2)
    rec.reconcile()  # blocked: no create attempts against a full table
    assert rec.status()[net(4)].state is RouteState.QUOTA_BLOCKED
    assert "route table is full" in rec.status()[net(4)].reason
    assert table.calls[calls:] == []
    rec.reconcile(resync=True)  # a resync tries again, in case the quota was raised
    assert rec.status()[net(3)].reason == "route limit 2 reached"
    leases.apply([LeaseEvent(EventType.REMOVED, lease(4))], revision=3)
    leases.apply([LeaseEvent(EventType.REMOVED, lease(1))], revision=4)
    rec.reconcile()  # the delete frees room ...
    rec.reconcile()  # ... and the blocked create goes through
    assert set(table.owned()) == {net(2), net(3)}


def test_not_found_on_delete_counts_as_done(leases: LeaseTable) -> None:
    table = MemoryRouteTable()
    rec = make(table, leases)
    rec.reconcile()
    table.fail_next(net(1), RouteNotFound("InvalidRoute.NotFound"))
    leases.apply([LeaseEvent(EventType.REMOVED, lease(1))], revision=2)
    result = rec.reconcile()
    assert result.clean
    assert net(1) not in rec.status()


def test_drift_is_repaired_on_resync_and_on_invalidate(leases: LeaseTable) -> None:
    table = MemoryRouteTable()
    rec = make(table, leases)
    rec.reconcile()
    del table.routes[net(1)]  # deleted by hand
    rec.reconcile(resync=True)
    assert net(1) in table.owned()
    del table.routes[net(2)]
    rec.invalidate()
    rec.reconcile()
    assert net(2) in table.owned()


def test_a_whole_call_failure_counts_against_every_change(leases: LeaseTable) -> None:
    table = MemoryRouteTable()
    table.fail_next_call(QuotaExceeded("RouteLimitExceeded"))
    rec = make(table, leases)
    rec.reconcile()
    assert {s.state for s in rec.status().values()} == {RouteState.QUOTA_BLOCKED}


def test_plan_changes_nothing(leases: LeaseTable) -> None:
    table = MemoryRouteTable()
    rec = make(table, leases)
    plan = rec.plan()
    assert len(plan) == 3
    assert table.owned() == {}


def test_metrics_report_desired_programmed_and_failed(leases: LeaseTable) -> None:
    metrics = Metrics()
    table = MemoryRouteTable(limit=2)
    rec = make(table, leases, metrics=metrics)
    rec.reconcile()
    value = metrics.registry.get_sample_value
    assert value("cloudroutes_routes_desired", {"table": "memory"}) == 3
    assert value("cloudroutes_routes_programmed", {"table": "memory"}) == 2
    assert value("cloudroutes_routes_failed", {"table": "memory", "state": "quota-blocked"}) == 1
    assert value("cloudroutes_reconcile_duration_seconds_count", {"table": "memory"}) == 1


def test_loop_coalesces_a_burst_of_lease_events_and_measures_latency() -> None:
    metrics = Metrics()
    table = MemoryRouteTable()
    leases = LeaseTable()
    rec = make(table, leases, metrics=metrics, policy=ReconcilePolicy(coalesce=0.05))
    stop = threading.Event()
    thread = threading.Thread(target=rec.run, args=(stop,))
    thread.start()
    try:
        for n in range(1, 201):
            leases.apply([LeaseEvent(EventType.ADDED, lease(n % 250 + 1, host=n % 250 + 1))], n)
        deadline = time.monotonic() + 10
        while len(table.owned()) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        rec.wake()
        thread.join(5)
    assert len(table.owned()) == 200
    assert rec.passes < 100  # 200 events did not cost 200 passes
    latency = metrics.registry.get_sample_value(
        "cloudroutes_lease_event_to_route_seconds_count", {"table": "memory"}
    )
    assert latency == 200


def test_a_lease_event_recomputes_only_that_lease() -> None:
    table, leases = MemoryRouteTable(), LeaseTable()
    leases.replace_all([lease(n, host=n) for n in range(1, 201)], revision=1)
    asked: list[int] = []

    def counting(one: Lease) -> list[Route]:
        asked.append(one.key)
        return to_instance(one)

    rec = Reconciler(table, leases, counting)
    rec.reconcile()
    assert len(asked) == 200
    leases.apply([LeaseEvent(EventType.ADDED, lease(7, host=99))], revision=2)
    result = rec.reconcile()
    assert asked[200:] == ["10.5.7.0-24"]
    assert [str(c) for c in result.plan] == ["replace 10.5.7.0/24 via i-7 -> i-99"]
    assert table.owned()[net(7)] == Route(net(7), "i-99")
    assert table.calls.count("observe") == 1


def test_lease_table_reports_changes_since_a_generation() -> None:
    leases = LeaseTable()
    leases.replace_all([lease(1), lease(2)], revision=1)
    _, first = leases.snapshot()
    leases.apply([LeaseEvent(EventType.REMOVED, lease(1))], revision=2)
    leases.apply([LeaseEvent(EventType.ADDED, lease(3))], revision=3)
    leases.apply([LeaseEvent(EventType.ADDED, lease(3))], revision=4)  # no change: no generation
    changes = leases.changes_since(first)
    assert changes is not None
    assert changes.leases == {"10.5.1.0-24": None, "10.5.3.0-24": lease(3)}
    assert changes.generation == first + 2
    leases.replace_all([lease(2), lease(3, host=9)], revision=5)  # a re-list: only the diff
    after = leases.changes_since(changes.generation)
    assert after is not None and after.leases == {"10.5.3.0-24": lease(3, host=9)}
    assert leases.changes_since(-5) is None  # too far back: the reader must take a snapshot


# --- the lease table, desired entries and per-lease failures -------------------------------


def test_falling_behind_the_lease_history_makes_a_full_pass() -> None:
    table, leases = MemoryRouteTable(), LeaseTable()
    leases.replace_all([lease(1)], revision=1)
    rec = make(table, leases)
    rec.reconcile()
    # More generations than the lease table remembers pass before the next pass.
    for n in range(5000):
        leases.apply([LeaseEvent(EventType.ADDED, lease(2 + n % 2, host=10 + n % 7))], n + 2)
    result = rec.reconcile()
    assert result.clean
    assert set(table.owned()) == {net(1), net(2), net(3)}


def test_removing_one_of_two_leases_that_want_a_route_keeps_it() -> None:
    twin = Lease(subnet=net(1), attrs=LeaseAttrs(public_ip=IPv4Address("198.18.0.1")))
    table, leases = MemoryRouteTable(), LeaseTable()

    def shared(one: Lease) -> list[Route]:
        # Two leases (here: by key) that ask for the very same route.
        return [Route(net(1), "i-1", lease_key=one.key)]

    leases.replace_all([lease(1), lease(2)], revision=1)
    rec = Reconciler(table, leases, shared)
    rec.reconcile()
    assert table.owned() == {net(1): Route(net(1), "i-1")}
    leases.apply([LeaseEvent(EventType.REMOVED, lease(2))], revision=2)
    assert not rec.reconcile().plan
    assert table.owned() == {net(1): Route(net(1), "i-1")}
    del twin


def test_a_lease_that_cannot_be_computed_fails_alone(caplog: pytest.LogCaptureFixture) -> None:
    table, leases = MemoryRouteTable(), LeaseTable()

    def picky(one: Lease) -> list[Route]:
        if one.key == "10.5.2.0-24":
            raise LeaseRefused("its next hop 198.18.0.2 is this node's own address")
        return to_instance(one)

    leases.replace_all([lease(1), lease(2), lease(3)], revision=1)
    metrics = Metrics()
    rec = Reconciler(table, leases, picky, metrics=metrics)
    rec.reconcile()
    rec.reconcile(resync=True)
    assert set(table.owned()) == {net(1), net(3)}
    assert rec.refused() == {"10.5.2.0-24": "its next hop 198.18.0.2 is this node's own address"}
    said = [r for r in caplog.records if "not routing lease 10.5.2.0-24" in r.getMessage()]
    assert len(said) == 1  # reported once, not at every resync
    value = metrics.registry.get_sample_value
    assert value("cloudroutes_leases_refused", {"table": "memory"}) == 1
    assert value("cloudroutes_lease_refusals_total", {"table": "memory"}) == 1
    # A broken backend function is that lease's failure too; the others keep converging.
    leases.apply([LeaseEvent(EventType.ADDED, lease(4))], revision=2)
    leases.apply([LeaseEvent(EventType.ADDED, lease(2, host=7))], revision=3)
    rec.reconcile()
    assert net(4) in table.owned()


def test_a_refused_route_is_retried_on_a_backoff_and_logged_once(
    leases: LeaseTable, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    table = MemoryRouteTable()
    table.put_foreign(Route(net(2), "pcx-operator"), owner="operator")
    policy = ReconcilePolicy(refused=Backoff(5.0, 60.0), jitter=0)
    rec = make(table, leases, clock=clock, policy=policy)
    for _ in range(4):
        rec.reconcile(resync=True)
    said = [r for r in caplog.records if "held by operator" in r.getMessage()]
    assert len(said) == 1
    assert rec.status()[net(2)].state is RouteState.FAILED
    # Refused by the kernel (not known beforehand): tried again only when its backoff ends.
    table.routes.pop(net(2))
    table.fail_next(net(2), Rejected("next hop is not on-link"))
    rec.reconcile(resync=True)
    calls = table.writes()
    rec.reconcile(resync=True)
    assert table.writes() == calls  # held
    clock.now += 5.0
    rec.reconcile()
    assert net(2) in table.owned()


# --- cloud-like tables: pending, lagging reads, capacity, caps, deadlines, throttling ----------


def test_a_pending_change_is_not_made_again_and_settles() -> None:
    clock = FakeClock()
    table = MemoryRouteTable(clock=clock, limits=TableLimits(settle=2.0))
    table.pending_for = 3.0
    leases = LeaseTable()
    leases.replace_all([lease(1)], revision=1)
    rec = make(table, leases, clock=clock)
    rec.reconcile()
    assert rec.status()[net(1)].state is RouteState.PENDING
    clock.now += 2.0
    assert not rec.reconcile(resync=True).plan  # observed pending: not planned again
    assert rec.status()[net(1)].state is RouteState.PENDING
    clock.now += 2.0
    rec.reconcile()  # the settle time is up: the table is read again
    assert rec.status()[net(1)].state is RouteState.PROGRAMMED
    assert table.writes() == 1


def test_a_read_that_lags_our_writes_does_not_make_them_twice() -> None:
    clock = FakeClock()
    table = MemoryRouteTable(clock=clock, limits=TableLimits(read_lag=5.0))
    table.read_lag = 5.0
    leases = LeaseTable()
    leases.replace_all([lease(1), lease(2)], revision=1)
    rec = make(table, leases, clock=clock)
    rec.reconcile()
    leases.apply([LeaseEvent(EventType.REMOVED, lease(2))], revision=2)
    rec.reconcile()
    assert table.writes() == 3
    clock.now += 1.0
    assert not rec.reconcile(resync=True).plan  # the read shows neither change yet
    clock.now += 10.0
    assert not rec.reconcile(resync=True).plan
    assert set(table.owned()) == {net(1)}
    assert table.writes() == 3


def test_creates_are_planned_only_for_the_room_the_table_has() -> None:
    table = MemoryRouteTable(limit=4, report_capacity=True)
    table.put_foreign(Route(IPv4Network("0.0.0.0/0"), "igw-1"), owner="vpc")
    table.put_foreign(Route(IPv4Network("198.18.0.0/16"), "local"), owner="vpc")
    leases = LeaseTable()
    leases.replace_all([lease(n) for n in range(1, 6)], revision=1)
    rec = make(table, leases)
    result = rec.reconcile()
    assert [str(c.key) for c in result.plan] == ["10.5.1.0/24", "10.5.2.0/24"]
    assert all(o.ok for o in result.outcomes)  # no doomed call
    blocked = {d for d, s in rec.status().items() if s.state is RouteState.QUOTA_BLOCKED}
    assert blocked == {net(3), net(4), net(5)}
    assert rec.status()[net(5)].reason.startswith("route table is full")
    leases.apply([LeaseEvent(EventType.REMOVED, lease(1))], revision=2)
    result = rec.reconcile()  # the delete frees room for the first blocked create, in order
    assert [(c.action.value, str(c.key)) for c in result.plan] == [
        ("delete", "10.5.1.0/24"),
        ("add", "10.5.3.0/24"),
    ]


def test_quota_learned_from_an_error_recovers_when_raised() -> None:
    table = MemoryRouteTable(limit=2)
    leases = LeaseTable()
    leases.replace_all([lease(n) for n in range(1, 5)], revision=1)
    rec = make(table, leases)
    rec.reconcile()
    calls = table.attempts()
    rec.reconcile(resync=True)
    assert table.attempts() == calls + 1  # a resync probes with one create, not all
    table.limit = 10  # the operator raised the quota
    rec.reconcile(resync=True)
    rec.reconcile()
    assert len(table.owned()) == 4
    assert {s.state for s in rec.status().values()} == {RouteState.PROGRAMMED}


def test_a_pass_makes_at_most_max_changes_and_the_rest_follows_at_once() -> None:
    table = MemoryRouteTable(limits=TableLimits(max_changes=2))
    leases = LeaseTable()
    leases.replace_all([lease(n) for n in range(1, 6)], revision=1)
    rec = make(table, leases)
    stop = threading.Event()
    thread = threading.Thread(target=rec.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: len(table.owned()) == 5, 10, "all five routes")
    finally:
        stop.set()
        thread.join(5)
    assert [c for c in table.calls if c.startswith("apply")] == ["apply:2", "apply:2", "apply:1"]


def test_changes_not_started_before_the_deadline_are_planned_again() -> None:
    clock = FakeClock()
    table = MemoryRouteTable(clock=clock, limits=TableLimits(pass_deadline=0.0))
    leases = LeaseTable()
    leases.replace_all([lease(1), lease(2)], revision=1)
    rec = make(table, leases, clock=clock)
    result = rec.reconcile()
    assert result.outcomes == ()  # the deadline passed before the first change
    assert not table.owned()
    table.limits = TableLimits()
    rec.limits = table.limits
    rec.reconcile()
    assert set(table.owned()) == {net(1), net(2)}


def test_throttling_holds_resyncs_too_and_honours_the_apis_advice(leases: LeaseTable) -> None:
    clock = FakeClock()
    table = MemoryRouteTable()
    table.fail_next_call(Throttled("Throttling", retry_after=30.0))
    policy = ReconcilePolicy(throttle=Backoff(2.0, 60.0), jitter=0)
    rec = make(table, leases, clock=clock, policy=policy)
    rec.reconcile()
    assert rec.gate.not_before == pytest.approx(clock.now + 30.0)  # the API asked for 30 s
    # A resync due now still waits for the gate.
    assert rec._next_due(next_resync=clock.now) == pytest.approx(clock.now + 30.0)
    assert table.calls.count("observe") == 1  # throttling did not force a re-read


def test_jitter_spreads_retries() -> None:
    waits = set()
    for seed in range(5):
        clock = FakeClock()
        table, leases = MemoryRouteTable(), LeaseTable()
        leases.replace_all([lease(1)], revision=1)
        table.fail_next(net(1), Transient("503"))
        rec = make(table, leases, clock=clock, rng=random.Random(seed))
        rec.reconcile()
        waits.add(round(rec._not_before - clock.now, 6))
    assert len(waits) == 5
    assert all(0.16 <= w <= 0.24 for w in waits)


def test_run_converges_under_a_rate_limit_with_no_duplicates() -> None:
    table, leases = MemoryRouteTable(), LeaseTable()
    table.rate = (3, 0.2)  # three calls per 200 ms, then RequestLimitExceeded
    table.limits = TableLimits(max_changes=5)
    leases.replace_all([lease(n) for n in range(1, 41)], revision=1)
    policy = ReconcilePolicy(throttle=Backoff(0.05, 0.4), retry=Backoff(0.01, 0.1))
    rec = Reconciler(table, leases, to_instance, policy=policy)
    stop = threading.Event()
    thread = threading.Thread(target=rec.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: len(table.owned()) == 40, 20, "40 routes under throttling")
        states = wait_for(
            lambda: {s.state for s in rec.status().values()} == {RouteState.PROGRAMMED},
            10,
            "every route programmed",
        )
    finally:
        stop.set()
        thread.join(5)
    assert states
    assert table.writes() == 40  # each route was written exactly once


# --- adoption, conflicts, garbage collectors and elections -----------------------------------


def test_an_identical_unowned_route_is_adopted_and_a_different_one_is_a_conflict() -> None:
    table, leases = MemoryRouteTable(), LeaseTable()
    table.put_foreign(Route(net(1), "i-1"), owner="flanneld")  # exactly what lease 1 wants
    table.put_foreign(Route(net(2), "i-9"), owner="flanneld")  # another target
    leases.replace_all([lease(1), lease(2)], revision=1)
    rec = make(table, leases)
    result = rec.reconcile(resync=True)
    assert [(c.action.value, str(c.key)) for c in result.plan] == [("adopt", "10.5.1.0/24")]
    assert table.owned() == {net(1): Route(net(1), "i-1")}
    assert table.routes[net(2)] == (Route(net(2), "i-9"), "flanneld")
    assert rec.status()[net(2)].reason == "10.5.2.0/24 is held by flanneld"


def test_a_garbage_collector_only_deletes_and_only_while_elected(leases: LeaseTable) -> None:
    table = MemoryRouteTable()
    table.routes[net(9)] = (Route(net(9), "i-9"), "ours")  # a lease that is gone
    elected = False
    rec = Reconciler(
        table,
        leases,
        to_instance,
        actions=frozenset({Action.DELETE}),
        active=lambda: elected,
    )
    assert not rec.reconcile(resync=True).plan
    assert table.calls == []  # not elected: not even a read
    elected = True
    result = rec.reconcile()
    assert [(c.action.value, str(c.key)) for c in result.plan] == [("delete", "10.5.9.0/24")]
    assert table.owned() == {}  # nothing created for the live leases either


def test_a_throttled_table_is_one_log_line_not_one_per_route(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table, leases = MemoryRouteTable(), LeaseTable()
    leases.replace_all([lease(n) for n in range(1, 51)], revision=1)
    table.fail_next_call(Throttled("RequestLimitExceeded"))
    rec = make(table, leases)
    rec.reconcile()
    lines = [r.getMessage() for r in caplog.records if "throttled" in r.getMessage()]
    assert lines == [
        "memory: 50 routes (10.5.1.0/24 via i-1, ...): throttled: RequestLimitExceeded"
    ]


def test_a_held_route_stays_failed_through_a_resync(leases: LeaseTable) -> None:
    clock = FakeClock()
    table = MemoryRouteTable()
    table.fail_next(net(2), Rejected("next hop is not on-link"))
    rec = make(table, leases, clock=clock, policy=ReconcilePolicy(jitter=0))
    rec.reconcile()
    rec.reconcile(resync=True)
    status = rec.status()[net(2)]
    assert (status.state, status.reason) == (RouteState.FAILED, "next hop is not on-link")


class _Unreadable(MemoryRouteTable):
    """A table whose reads fail until ``fixed`` (a wrong key, a refused list)."""

    fixed = False

    def observe(self):  # type: ignore[no-untyped-def]
        if not self.fixed:
            raise Rejected("SignatureDoesNotMatch: check AccessKeyID and AccessKeySecret")
        return super().observe()


def test_a_table_that_cannot_be_read_is_one_status_one_log_line_and_recovers(
    leases: LeaseTable, caplog: pytest.LogCaptureFixture
) -> None:
    table = _Unreadable()
    metrics = Metrics()
    policy = ReconcilePolicy(retry=Backoff(0.01, 0.02))
    rec = make(table, leases, metrics=metrics, policy=policy)
    stop = threading.Event()
    thread = threading.Thread(target=rec.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: table.calls.count("observe") >= 0 and rec.problem, 5, "the failure")
        time.sleep(0.2)  # several retries happen meanwhile: they must not log again
        up = metrics.registry.get_sample_value("cloudroutes_route_table_up", {"table": "memory"})
        assert up == 0
        table.fixed = True
        wait_for(lambda: len(table.owned()) == 3 and rec.problem is None, 5, "recovery")
    finally:
        stop.set()
        thread.join(5)
    said = [r for r in caplog.records if "cannot reconcile the route table" in r.getMessage()]
    assert len(said) == 1
    assert metrics.registry.get_sample_value("cloudroutes_route_table_up", {"table": "memory"}) == 1

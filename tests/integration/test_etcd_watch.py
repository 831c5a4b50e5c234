"""The lease watch: a snapshot, then changes; resumed after a lost stream without missing
events; listed again after compaction, a wiped store, and periodically. Also the config watch
and the store health the agent reports."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import pytest

from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.lease import encode_attrs
from cloudroutes.lease_table import LeaseEvent, LeaseTable
from cloudroutes.subnet.etcd import EtcdLeaseSource
from cloudroutes.subnet.etcd_client import (
    EtcdClient,
    KeyValue,
    WatchBatch,
    WatchEvent,
    WatchStream,
    resume_revision,
)
from tests.integration.test_etcd_source import (
    CONFIG,
    ETCD_LOG,
    FAST,
    FLANNEL_VALUE,
    PREFIX,
    SUBNETS,
    Background,
    background,
    etcdctl,
    joined,
    logged,
    make_source,
    raw,
    wipe,
)
from tests.wait import wait_for

pytestmark = pytest.mark.etcd
__all__ = ["background", "make_source", "raw"]  # fixtures, used by name


def test_flannel_leases_written_by_hand_are_understood(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = make_source(etcd.endpoint)
    etcd_lease = etcdctl(etcd, "lease", "grant", "300").split()[1]
    etcdctl(etcd, "put", f"--lease={etcd_lease}", SUBNETS + "10.5.9.0-24", FLANNEL_VALUE)
    etcdctl(etcd, "put", SUBNETS + "10.5.10.0-24", FLANNEL_VALUE.replace(".9", ".10"))
    etcdctl(etcd, "put", SUBNETS + "not-a-subnet", FLANNEL_VALUE)
    etcdctl(etcd, "put", SUBNETS + "10.5.11.0-24", "{broken")

    table = LeaseTable()
    with caplog.at_level(logging.WARNING):
        background(source.watch, table)
        assert table.wait_synced(10)
    leased, reservation = table.get("10.5.9.0-24"), table.get("10.5.10.0-24")
    assert leased is not None and reservation is not None
    assert len(table) == 2
    assert leased.backend_type == "vxlan"
    assert leased.attrs.backend_data == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
    assert encode_attrs(leased.attrs).decode() == FLANNEL_VALUE  # byte-identical round trip
    assert leased.store_lease_id == int(etcd_lease, 16)
    assert reservation.is_reservation
    # Expiry is looked up when listing for `cloudroutes leases`, not by the watch.
    listed = {lease.key: lease for lease in source.list_leases()}
    expiration = listed["10.5.9.0-24"].expiration
    assert expiration is not None
    assert expiration - dt.datetime.now(dt.UTC) > dt.timedelta(seconds=250)
    assert listed["10.5.10.0-24"].expiration is None
    assert f"{SUBNETS}not-a-subnet" in caplog.text
    assert f"{SUBNETS}10.5.11.0-24" in caplog.text

    # Then changes: a new lease, a deleted one.
    etcdctl(etcd, "put", SUBNETS + "10.5.12.0-24", FLANNEL_VALUE)
    etcdctl(etcd, "del", SUBNETS + "10.5.10.0-24")
    wait_for(lambda: table.get("10.5.12.0-24") and not table.get("10.5.10.0-24"), what="changes")
    assert [lease.key for lease in source.list_leases()] == ["10.5.12.0-24", "10.5.9.0-24"]


def test_the_table_includes_this_nodes_own_lease_and_sees_expiry(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    source, lease = joined(make_source, etcd.endpoint, lease_ttl=2)
    table = LeaseTable()
    background(source.watch, table)
    wait_for(lambda: table.get(lease.key), what="own lease in the table")
    wait_for(lambda: table.get(lease.key) is None, timeout=8, what="the expired lease to go")


def test_the_watch_resumes_after_etcd_restarts(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    source = make_source(etcd.endpoint)
    table = LeaseTable()
    background(source.watch, table)
    assert table.wait_synced(10)
    etcdctl(etcd, "put", SUBNETS + "10.5.1.0-24", FLANNEL_VALUE)
    wait_for(lambda: table.get("10.5.1.0-24"), what="the first lease")
    etcd.restart()
    etcdctl(etcd, "put", SUBNETS + "10.5.2.0-24", FLANNEL_VALUE)
    etcdctl(etcd, "del", SUBNETS + "10.5.1.0-24")
    wait_for(
        lambda: table.get("10.5.2.0-24") and not table.get("10.5.1.0-24"),
        timeout=20,
        what="changes made after the restart",
    )


class GatedTable(LeaseTable):
    """Holds the watch after its first snapshot until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.listed = threading.Event()
        self.gate = threading.Event()
        self.snapshots = 0

    def replace_all(self, leases: Any, revision: int) -> None:
        super().replace_all(leases, revision)
        self.snapshots += 1
        self.listed.set()
        self.gate.wait(10)


def test_the_watch_lists_again_after_compaction(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    source = make_source(etcd.endpoint)
    etcdctl(etcd, "put", SUBNETS + "10.5.1.0-24", FLANNEL_VALUE)
    table = GatedTable()
    background(source.watch, table)
    assert table.listed.wait(10)
    # While the watch is held after its list, the history it would resume from is compacted.
    etcdctl(etcd, "del", SUBNETS + "10.5.1.0-24")
    etcdctl(etcd, "put", SUBNETS + "10.5.2.0-24", FLANNEL_VALUE)
    revision = json.loads(etcdctl(etcd, "get", "x", "-w", "json"))["header"]["revision"]
    etcdctl(etcd, "compact", str(revision))
    table.gate.set()
    wait_for(
        lambda: table.get("10.5.2.0-24") and not table.get("10.5.1.0-24"),
        what="the table to converge after compaction",
    )
    assert table.snapshots >= 2


# Resuming.


def test_a_watch_resumed_during_catch_up_misses_no_event(
    etcd: EtcdCluster, raw: EtcdClient
) -> None:
    # More revisions than etcd sends in one catch-up response (1000).
    start = raw.revision(SUBNETS) + 1
    keys = [f"{SUBNETS}k{n:04}" for n in range(1500)]
    for key in keys:
        raw.put(key, b"v")
    stream = WatchStream(raw, SUBNETS, prefix=True)
    stream.start(start)
    try:
        first = wait_for(lambda: stream.next(0.5), 10, "the first catch-up batch")
        # etcd sends the current revision with each batch of older events...
        assert first.revision > first.events[-1].kv.mod_revision
        stream.advance(first)
        # ...so the connection lost here must resume after the last event, not that revision.
        stream.pause()
        seen = [event.kv.key for event in first.events]
        while len(seen) < len(keys):
            batch = stream.next(5)
            assert batch is not None, f"the resumed watch stopped after {len(seen)} events"
            seen += [event.kv.key for event in batch.events]
            stream.advance(batch)
        assert seen == keys
    finally:
        stream.close()


def test_a_response_without_events_does_not_move_the_resume_point() -> None:
    # A progress notice carries the current revision, and nothing says earlier events were
    # all delivered; an event moves the point to just after it.
    assert resume_revision(41, WatchBatch(revision=900, events=[])) == 41
    put = WatchEvent(deleted=False, kv=KeyValue(SUBNETS + "10.5.1.0-24", b"", 57, 0))
    assert resume_revision(41, WatchBatch(revision=900, events=[put])) == 58


class LossyTable(LeaseTable):
    """Loses the first change the watch applies, as a lost event would."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: list[LeaseEvent] = []

    def apply(self, events: Iterable[LeaseEvent], revision: int) -> None:
        events = list(events)
        if events and not self.lost:
            self.lost += events
            return
        super().apply(events, revision)


def test_a_lost_change_is_repaired_by_the_periodic_relist(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    source = make_source(etcd.endpoint, periods=replace(FAST, relist=1.0))
    table = LossyTable()
    background(source.watch, table)
    assert table.wait_synced(10)
    etcdctl(etcd, "put", SUBNETS + "10.5.1.0-24", FLANNEL_VALUE)
    wait_for(lambda: table.lost, 10, "the change to be lost")
    assert table.get("10.5.1.0-24") is None
    wait_for(lambda: table.get("10.5.1.0-24"), 10, "the re-list to bring the lease")


def test_the_watch_lists_again_after_etcd_is_wiped(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    source = make_source(etcd.endpoint)
    for n in range(1, 21):
        etcdctl(etcd, "put", f"{SUBNETS}10.5.{n}.0-24", FLANNEL_VALUE)
    table = LeaseTable()
    background(source.watch, table)
    wait_for(lambda: len(table) == 20, 10, "the 20 leases")
    assert source.store_problem is None
    etcd.stop()
    problem = wait_for(
        lambda: "cannot reach etcd" in (source.store_problem or "") and source.store_problem,
        10,
        "the watch to report etcd unreachable",
    )
    assert etcd.endpoint in problem and "--etcd-endpoints" in problem and "\n" not in problem
    # Empty again, the store's revision is back near 1: resuming the watch at 22 would show
    # nothing until the store got there.
    wipe(etcd)
    etcdctl(etcd, "put", SUBNETS + "10.5.100.0-24", FLANNEL_VALUE)
    wait_for(
        lambda: len(table) == 1 and table.get("10.5.100.0-24"), 20, "the table to match the store"
    )
    wait_for(lambda: source.store_problem is None, 10, "the problem to clear")


# The config watch.


def test_watch_config_reports_each_change_and_a_config_lost_with_etcd(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=ETCD_LOG)
    source = make_source(etcd.endpoint)
    source.put_config(CONFIG)
    seen: list[str | None] = []
    background(lambda stop: source.watch_config(stop, seen.append))
    wait_for(lambda: logged(caplog, "watching the network config"), 10, "the config watch")
    assert seen == []  # the config found at the start is no change
    changed = CONFIG.replace("10.5.0.0/16", "10.6.0.0/16")
    etcdctl(etcd, "put", f"{PREFIX}/config", changed)
    etcdctl(etcd, "put", f"{PREFIX}/config", changed)  # the same text again: no change
    etcdctl(etcd, "del", f"{PREFIX}/config")
    etcdctl(etcd, "put", f"{PREFIX}/config", CONFIG)
    wait_for(lambda: len(seen) == 3, 10, "three changes")
    assert seen == [changed, None, CONFIG]
    # Wiped, the config is gone: noticed when the watch reconnects.
    etcd.stop()
    wait_for(lambda: source.store_problem, 10, "the config watch to report etcd gone")
    wipe(etcd)
    wait_for(lambda: len(seen) == 4, 20, "the config's loss")
    assert seen[-1] is None
    wait_for(lambda: source.store_problem is None, 10, "the problem to clear")

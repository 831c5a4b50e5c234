"""The route ledger against a real etcd: its keys, batches, unreadable entries and fencing."""

from __future__ import annotations

import base64
import json
import logging
from ipaddress import IPv4Network, IPv6Network

import pytest

from cloudroutes.election import Deposed, Election
from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.ledger import Ledger, LedgerEntry
from cloudroutes.subnet.etcd_client import EtcdClient

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CLUSTER = "prod"
TABLE = "rtb-0a1"
PATH = f"{PREFIX}/cloudroutes/routes/{CLUSTER}/{TABLE}/"
NETWORKS = (IPv4Network("10.5.0.0/16"), IPv6Network("fc00::/48"))
LEADER_KEY = f"{PREFIX}/cloudroutes/leader/{CLUSTER}/cluster"


@pytest.fixture
def client(etcd_client: EtcdClient) -> EtcdClient:
    return etcd_client


def net(i: int) -> IPv4Network:
    return IPv4Network(f"10.5.{i}.0/24")


def entry(i: int, target: str = "") -> LedgerEntry:
    return LedgerEntry(
        net(i), target or f"eni-{i}", lease=f"10.5.{i}.0-24", by="node-1", written=1.7e9 + i
    )


def stored(etcd: EtcdCluster) -> dict[str, dict[str, object]]:
    """The ledger as etcdctl sees it: key suffix → JSON value."""
    out = etcd.etcdctl("get", "--prefix", PATH, "-w", "json")
    kvs = json.loads(out).get("kvs", [])
    return {
        base64.b64decode(kv["key"]).decode().removeprefix(PATH): json.loads(
            base64.b64decode(kv["value"])
        )
        for kv in kvs
    }


def test_recorded_entries_are_in_etcd_under_the_documented_keys(
    etcd: EtcdCluster, client: EtcdClient
) -> None:
    ledger = Ledger(client, PREFIX, CLUSTER, TABLE)
    six = LedgerEntry(IPv6Network("fc00:0:0:3::/64"), "eni-6", lease="10.5.3.0-24", by="n1")
    ledger.record([entry(3), six])
    assert set(stored(etcd)) == {"10.5.3.0-24", "fc00:0:0:3::-64"}
    assert stored(etcd)["10.5.3.0-24"]["target"] == "eni-3"
    assert stored(etcd)["fc00:0:0:3::-64"]["destination"] == "fc00:0:0:3::/64"
    # Another process reads the same entries back; another table's ledger is separate.
    assert Ledger(client, PREFIX, CLUSTER, TABLE).entries() == {
        net(3): entry(3),
        six.destination: six,
    }
    assert Ledger(client, PREFIX, CLUSTER, "rtb-other").entries() == {}
    assert ledger.owns(net(3), "eni-3", NETWORKS)
    assert ledger.owns(six.destination, "eni-6", NETWORKS)
    assert not ledger.owns(net(3), "eni-someone-else", NETWORKS)
    assert not ledger.owns(net(4), "eni-4", NETWORKS)
    # A recorded route outside the Network (it was changed since) is not ours either.
    assert not ledger.owns(net(3), "eni-3", [IPv4Network("10.6.0.0/16")])


def test_a_batch_larger_than_one_etcd_transaction_is_written_whole(
    etcd: EtcdCluster, client: EtcdClient
) -> None:
    ledger = Ledger(client, PREFIX, CLUSTER, TABLE)
    ledger.record(entry(i) for i in range(250))  # etcd allows 128 operations per transaction
    assert len(Ledger(client, PREFIX, CLUSTER, TABLE).entries()) == 250
    assert ledger.forget(net(i) for i in range(250)) == set()
    assert stored(etcd) == {}


def test_unreadable_entries_are_skipped_with_one_warning_and_count_as_not_ours(
    etcd: EtcdCluster, client: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(client, PREFIX, CLUSTER, TABLE)
    ledger.record([entry(1)])
    etcd.etcdctl("put", PATH + "10.5.2.0-24", "{not json")
    etcd.etcdctl("put", PATH + "10.5.3.0-24", '{"destination":"10.5.9.0/24","target":"eni-3"}')
    etcd.etcdctl("put", PATH + "garbage", "{}")
    with caplog.at_level(logging.WARNING, logger="cloudroutes.ledger"):
        assert ledger.entries() == {net(1): entry(1)}
        ledger.entries()  # the same bad entries again: not reported twice
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "skipped 3 unreadable entries" in warnings[0]
    assert "'10.5.2.0-24': value is not JSON" in warnings[0]
    assert not ledger.owns(net(2), "eni-2", NETWORKS)
    # Adopting the route at that destination writes a good entry over the bad one.
    ledger.record([entry(2)])
    assert Ledger(client, PREFIX, CLUSTER, TABLE).entries()[net(2)] == entry(2)


def test_forget_leaves_an_entry_rewritten_since_it_was_read(
    etcd: EtcdCluster, client: EtcdClient
) -> None:
    gc = Ledger(client, PREFIX, CLUSTER, TABLE)
    gc.record([entry(1), entry(2)])
    gc.entries()
    # Meanwhile a new node took 10.5.2.0/24 and recorded its own route.
    Ledger(client, PREFIX, CLUSTER, TABLE).record([entry(2, "eni-new-node")])
    assert gc.forget([net(1), net(2)]) == {net(2)}
    assert set(stored(etcd)) == {"10.5.2.0-24"}
    assert stored(etcd)["10.5.2.0-24"]["target"] == "eni-new-node"


def test_a_stale_fence_is_refused_by_etcd_and_nothing_is_written(
    etcd: EtcdCluster, client: EtcdClient
) -> None:
    old = Election(client, LEADER_KEY, "controller-a", ttl=30)
    old.step()
    fence = old.fence()
    assert fence is not None and fence.valid()
    ledger = Ledger(client, PREFIX, CLUSTER, TABLE)
    ledger.record([entry(1)], fence=fence)
    # The key is taken over behind the old leader's back; its fence still looks valid locally
    # (no pass of its election ran), so only etcd's compare can stop the write.
    etcd.etcdctl("del", LEADER_KEY)
    new = Election(client, LEADER_KEY, "controller-b", ttl=30)
    new.step()
    assert new.is_leader() and fence.valid()
    with pytest.raises(Deposed, match="no longer the one this leader created"):
        ledger.record([entry(2)], fence=fence)
    with pytest.raises(Deposed):
        ledger.forget([net(1)], fence=fence)
    assert set(stored(etcd)) == {"10.5.1.0-24"}
    assert not fence.valid()  # the refused write ended that term
    old.step()
    assert not old.is_leader() and old.leader() is None
    new_fence = new.fence()
    assert new_fence is not None
    ledger.record([entry(2)], fence=new_fence)
    assert set(stored(etcd)) == {"10.5.1.0-24", "10.5.2.0-24"}
    new.resign()
    old.resign()

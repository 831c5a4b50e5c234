"""Anyone can write under the prefix: keys that are not exactly lease keys and values that do
not decode are skipped with one warning each, never crash a reader, never shadow a real lease,
and a subnet whose value is unreadable still counts as taken."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from cloudroutes.config import parse_config
from cloudroutes.errors import OutOfSubnets
from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.lease import encode_attrs
from cloudroutes.lease_table import LeaseTable
from cloudroutes.subnet.etcd import EtcdLeaseSource
from cloudroutes.subnet.etcd_client import EtcdClient
from tests.integration.test_etcd_source import (
    ETCD_LOG,
    FAST,
    FLANNEL_VALUE,
    SUBNETS,
    Background,
    background,
    etcdctl,
    logged,
    make_source,
    node,
    raw,
)
from tests.wait import wait_for

pytestmark = pytest.mark.etcd
__all__ = ["background", "make_source", "raw"]  # fixtures, used by name

RELISTING = replace(FAST, relist=0.3)
# Each would read as 10.5.1.0-24 to an unanchored or lenient parser.
BAD_KEYS = ["foo", "x10.5.1.0-24", "10.5.1.0-24/extra", "10.5.1.7-24", "10.5.1.0-024"]
OTHER_NODE = encode_attrs(node(7)).decode()


def relisted(caplog: pytest.LogCaptureFixture, times: int) -> None:
    """Wait until the watch listed everything ``times`` more times."""
    before = logged(caplog, "listed ")
    wait_for(lambda: logged(caplog, "listed ") >= before + times, 10, f"{times} re-lists")


def test_only_exact_lease_keys_are_leases_and_none_shadows_a_real_one(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ETCD_LOG)
    source = make_source(etcd.endpoint, periods=RELISTING)
    etcdctl(etcd, "put", SUBNETS + "10.5.1.0-24", FLANNEL_VALUE)
    for key in BAD_KEYS:
        etcdctl(etcd, "put", SUBNETS + key, OTHER_NODE)
    table = LeaseTable()
    background(source.watch, table)
    assert table.wait_synced(10)
    real = table.get("10.5.1.0-24")
    assert real is not None and real.public_ip == IPv4Address("198.18.0.9")
    assert len(table) == 1

    # The watch sees those keys deleted and written again: the real lease stays as it is.
    for key in BAD_KEYS:
        etcdctl(etcd, "del", SUBNETS + key)
        etcdctl(etcd, "put", SUBNETS + key, OTHER_NODE)
    etcdctl(etcd, "put", SUBNETS + "10.5.2.0-24", FLANNEL_VALUE)  # after all of them
    wait_for(lambda: table.get("10.5.2.0-24"), 10, "the lease written last")
    assert table.get("10.5.1.0-24") == real
    relisted(caplog, 2)
    assert table.get("10.5.1.0-24") == real and len(table) == 2
    assert sorted(lease.key for lease in source.list_leases()) == ["10.5.1.0-24", "10.5.2.0-24"]
    # One warning per key and revision written, however often it was listed.
    for key in BAD_KEYS:
        assert logged(caplog, f"ignoring {SUBNETS}{key}: not a lease key") == 2, key


BAD_VALUES = {
    "10.5.11.0-24": b"{broken",
    "10.5.12.0-24": b'{"PublicIP": 167772161}',
    "10.5.13.0-24": b'{"PublicIP": true, "BackendType": "vxlan"}',
    "10.5.14.0-24": b"[" * 100_000 + b"]" * 100_000,
    "10.5.15.0-24": b'{"PublicIP": "198.18.0.15", "PublicIPv6": 6}',
    "10.5.16.0-24": b'{"PublicIP": "198.18.0.16", "BackendType": ["vxlan"]}',
    "10.5.17.0-24": b'{"PublicIP": "198.18.0.17", "BackendType": "\xff"}',
    "10.5.18.0-24": b"42",
    "10.5.19.0-24": b'{"PublicIP": "' + b"1" * 1_000_000 + b'"}',
}


def test_bad_values_are_skipped_with_one_warning_by_watch_acquire_and_listing(
    etcd: EtcdCluster,
    raw: EtcdClient,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ETCD_LOG)
    # Eleven subnets: one a peer's, nine unreadable, one free.
    config = parse_config(
        json.dumps({"Network": "10.5.0.0/16", "SubnetMin": "10.5.10.0", "SubnetMax": "10.5.20.0"})
    )
    raw.put(SUBNETS + "10.5.10.0-24", FLANNEL_VALUE.encode())
    for key, value in BAD_VALUES.items():
        raw.put(SUBNETS + key, value)
    source = make_source(etcd.endpoint, periods=RELISTING, lease_ttl=600)
    table = LeaseTable()
    watcher = background(source.watch, table)
    assert table.wait_synced(10)
    assert [lease.key for lease in table.snapshot()[0]] == ["10.5.10.0-24"]

    # acquire takes the one free subnet: the unreadable ones are taken, not free.
    lease = source.acquire(config, node(1))
    assert lease.key == "10.5.20.0-24"
    assert sorted(found.key for found in source.list_leases()) == ["10.5.10.0-24", lease.key]
    # A peer's value gone bad while watched takes its lease out of the table.
    raw.put(SUBNETS + "10.5.10.0-24", b'{"PublicIP": false}')
    wait_for(lambda: table.get("10.5.10.0-24") is None, 10, "the garbled lease to leave")
    relisted(caplog, 2)
    assert not watcher.done()
    for key in [*BAD_VALUES, "10.5.10.0-24"]:
        warnings = [
            r.getMessage() for r in caplog.records if f"lease {SUBNETS}{key}:" in r.getMessage()
        ]
        assert len(warnings) == 1, key
        assert warnings[0].startswith("skipping lease") and len(warnings[0]) < 300

    # A restart over the same data: the node gets its subnet back.
    again = make_source(etcd.endpoint, lease_ttl=600).acquire(config, node(1))
    assert again.key == lease.key


def test_a_subnet_whose_value_is_unreadable_is_not_free(
    etcd: EtcdCluster, raw: EtcdClient, make_source: Callable[..., EtcdLeaseSource]
) -> None:
    config = parse_config(
        json.dumps({"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.0", "SubnetMax": "10.5.1.0"})
    )
    raw.put(SUBNETS + "10.5.1.0-24", b"{broken")
    # Not "taken by other nodes" after ten failed creates: there is no free subnet at all.
    with pytest.raises(OutOfSubnets, match="all 1 /24 subnets"):
        make_source(etcd.endpoint).acquire(config, node(1))

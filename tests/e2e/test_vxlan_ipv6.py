"""A dual-stack vxlan cluster: three nodes in namespaces with real agents, IPv4 peers through
flannel.1 and IPv6 peers through flannel-v6.1, what an operator would see.

The nodes' IPv6 underlay is 2001:db8::<i>/64 (the lab's ``ipv6=True``), the pods' IPv6 network
fc00::/48.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudroutes.lab.cluster import LabCluster, LabNode
from tests.conftest import needs_root
from tests.wait import wait_for

pytestmark = [needs_root, pytest.mark.slow]

PREFIX = "/coreos.com/network"
HEALTH = 9303
DEVICE = "flannel.1"
DEVICE6 = "flannel-v6.1"
PROBE = "fc00:0:ffff::"  # a neighbour entry the restart test adds and deletes itself
STRANGER_KEY = "10.5.200.0-24&fc00:0:0:c8::-64"  # a dual-stack lease written as flanneld would
STRANGER_MAC, STRANGER_MAC6 = "be:ef:00:00:00:01", "be:ef:00:00:06:01"
STRANGER6 = "fc00:0:0:c8::"


def lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def neighbours6(node: LabNode) -> list[str]:
    return lines(node.ns.ip("-6", "neigh", "show", "dev", DEVICE6, check=False))


def fdb6(node: LabNode) -> list[str]:
    return lines(node.ns.run("bridge", "fdb", "show", "dev", DEVICE6, check=False).stdout)


def route6(node: LabNode, subnet: str) -> str:
    return " ".join(node.ns.ip("-6", "route", "show", subnet).split())


def mac_of(node: LabNode, device: str) -> str:
    match = re.search(r"link/ether (\S+)", node.ns.ip("link", "show", device))
    assert match, f"{device} on {node.name}"
    return match[1]


def v6_entries(node: LabNode, peer: LabNode) -> tuple[bool, bool, bool]:
    """Whether ``node`` holds each of the three IPv6 entries for ``peer``."""
    vtep, mac = peer.subnet6.split("/")[0], mac_of(peer, DEVICE6)
    return (
        f"{vtep} lladdr {mac} PERMANENT" in neighbours6(node),
        f"{mac} dst {peer.address6} self permanent" in fdb6(node),
        route6(node, peer.subnet6)
        == f"{peer.subnet6} via {vtep} dev {DEVICE6} proto 157 metric 1024 onlink pref medium",
    )


def lease_key(node: LabNode) -> str:
    v4, v6 = node.subnet.replace("/", "-"), node.subnet6.replace("/", "-")
    return f"{PREFIX}/subnets/{v4}&{v6}"


def passes(node: LabNode, table: str) -> int:
    return int(node.status(HEALTH).get("passes", {}).get(table, 0))


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    lab = LabCluster(3, backend="vxlan", ipv6=True).build()
    try:
        lab.start("--subnet-lease-ttl=60", f"--healthz-port={HEALTH}")
        yield lab
    finally:
        lab.close()


def test_gateways_reach_each_other_over_ipv6_and_ipv4(cluster: LabCluster) -> None:
    for src in cluster.nodes:
        for dst in cluster.nodes:
            if src is not dst:
                assert cluster.ping6(src, dst), f"{src.name} -> {dst.name} over IPv6"
                assert cluster.ping(src, dst), f"{src.name} -> {dst.name} over IPv4"
    node1, node2, node3 = cluster.nodes
    assert v6_entries(node1, node2) == (True, True, True)
    assert v6_entries(node1, node3) == (True, True, True)
    detail = " ".join(node1.ns.ip("-d", "link", "show", DEVICE6).split())
    assert "mtu 1430 " in detail
    assert f"vxlan id 1 local {node1.address6} dev eth0" in detail
    assert "dstport 8472 nolearning" in detail
    assert f"inet6 {node1.subnet6.split('/')[0]}/128" in node1.ns.ip("addr", "show", DEVICE6)
    # One MTU for a pod's interface that carries both families: the IPv6 device's.
    assert node1.subnet_env()["FLANNEL_MTU"] == "1430"
    # Both families' peers have their own route table in the agent.
    wait_for(lambda: passes(node1, "kernel") and passes(node1, "kernel-v6"), 30, "both tables")


def test_lease_carries_both_vtep_macs_as_flanneld_writes_them(cluster: LabCluster) -> None:
    assert cluster.etcd is not None
    node = cluster.nodes[0]
    mac, mac6 = mac_of(node, DEVICE), mac_of(node, DEVICE6)
    raw = cluster.etcd.etcdctl("get", "--print-value-only", lease_key(node)).strip()
    assert raw == (
        f'{{"PublicIP":"{node.address}","PublicIPv6":"{node.address6}","BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}},'
        f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}'
    )
    assert mac != mac6
    assert (node.run_dir / f"vxlan-v6-1-{node.address6}.mac").read_text().strip() == mac6


def test_pods_reach_each_other_over_ipv6_and_ipv4(cluster: LabCluster) -> None:
    node1, node2, _ = cluster.nodes
    a, b = cluster.add_pod(node1, "node1-pod6"), cluster.add_pod(node2, "node2-pod6")
    try:
        assert a.address6 and b.address6, (a, b)
        assert cluster.ping_pod6(a, b) and cluster.ping_pod6(b, a)
        assert cluster.ping_pod(a, b) and cluster.ping_pod(b, a)
    finally:
        cluster.remove_pod(b)
        cluster.remove_pod(a)


@pytest.mark.parametrize("what", ["neighbour", "FDB entry"])
def test_a_v6_entry_deleted_by_hand_comes_back(cluster: LabCluster, what: str) -> None:
    node1, node2, _ = cluster.nodes
    if what == "neighbour":
        node1.ns.ip("-6", "neigh", "del", node2.subnet6.split("/")[0], "dev", DEVICE6)
    else:
        mac = mac_of(node2, DEVICE6)
        node1.ns.run("bridge", "fdb", "del", mac, "dev", DEVICE6, "dst", node2.address6)
    wait_for(lambda: v6_entries(node1, node2) == (True, True, True), 15, f"{what} repair")
    assert cluster.ping6(node1, node2)


def test_an_agent_restart_changes_no_entry(cluster: LabCluster, tmp_path: Path) -> None:
    node1, node2, _ = cluster.nodes
    assert cluster.ping6(node1, node2)
    mac6 = mac_of(node2, DEVICE6)
    index = node2.ns.ip("-o", "link", "show", DEVICE6).split(":")[0]
    before = (neighbours6(node2), fdb6(node2), node2.ns.ip("-6", "route", "show"))
    events = tmp_path / "events"
    with events.open("w") as out:
        monitors = [
            node2.ns.popen(["ip", "monitor", "neigh", "route", "link"], stdout=out),
            node2.ns.popen(["bridge", "monitor", "fdb"], stdout=out),
        ]
    try:
        # The monitors see deletions: one made here, on the device, before the test proper.
        node2.ns.ip("-6", "neigh", "add", PROBE, "lladdr", STRANGER_MAC6, "dev", DEVICE6,
                    "nud", "permanent")  # fmt: skip
        node2.ns.ip("-6", "neigh", "del", PROBE, "dev", DEVICE6)
        wait_for(lambda: f"Deleted {PROBE}" in events.read_text(), 10, "the monitor's probe")
        cluster.stop_agent(node2, kill=True)
        cluster.start_agent(node2, *node2.agent_args)
        cluster.wait_ready(node2)
        wait_for(lambda: passes(node2, "kernel-v6") >= 2, 30, "the restarted agent's passes")
    finally:
        for process in monitors:
            process.kill()
            process.wait()
    changed = [
        line
        for line in events.read_text().splitlines()
        if PROBE not in line and ("Deleted" in line or DEVICE6 in line)
    ]
    assert changed == []
    assert (neighbours6(node2), fdb6(node2), node2.ns.ip("-6", "route", "show")) == before
    assert node2.ns.ip("-o", "link", "show", DEVICE6).split(":")[0] == index
    assert mac_of(node2, DEVICE6) == mac6
    assert cluster.ping6(node1, node2)


def test_a_peer_that_leaves_has_its_v6_entries_removed(cluster: LabCluster) -> None:
    assert cluster.etcd is not None
    value = json.dumps(
        {
            "PublicIP": "198.18.0.77",
            "PublicIPv6": "2001:db8::77",
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": STRANGER_MAC},
            "BackendV6Data": {"VNI": 1, "VtepMAC": STRANGER_MAC6},
        },
        separators=(",", ":"),
    )
    cluster.etcd.etcdctl("put", f"{PREFIX}/subnets/{STRANGER_KEY}", value)
    subnet6 = f"{STRANGER6}/64"
    try:
        for node in cluster.nodes:
            wait_for(
                lambda n=node: (
                    route6(n, subnet6)
                    == f"{subnet6} via {STRANGER6} dev {DEVICE6} proto 157 metric 1024 onlink pref "
                    "medium"
                ),
                what=f"the IPv6 route on {node.name}",
            )
            assert f"{STRANGER6} lladdr {STRANGER_MAC6} PERMANENT" in neighbours6(node)
            assert f"{STRANGER_MAC6} dst 2001:db8::77 self permanent" in fdb6(node)
    finally:
        cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/{STRANGER_KEY}")
    for node in cluster.nodes:
        wait_for(lambda n=node: route6(n, subnet6) == "", what=f"route removal on {node.name}")
        wait_for(
            lambda n=node: not any(STRANGER_MAC6 in line for line in neighbours6(n) + fdb6(n)),
            what=f"neighbour and FDB removal on {node.name}",
        )
        assert " ".join(node.ns.ip("route", "show", "10.5.200.0/24").split()) == ""


def test_an_ipv6_only_cluster_has_only_flannel_v6() -> None:
    lab = LabCluster(2, backend="vxlan", ipv6=True, ipv4=False).build()
    try:
        lab.start()
        node1, node2 = lab.nodes
        assert lab.ping6(node1, node2) and lab.ping6(node2, node1)
        a, b = lab.add_pod(node1, "node1-pod"), lab.add_pod(node2, "node2-pod")
        assert (a.address, b.address) == ("", "")
        assert lab.ping_pod6(a, b) and lab.ping_pod6(b, a)
        assert node1.ns.ip("link", "show", DEVICE, check=False) == ""
        assert v6_entries(node1, node2) == (True, True, True)
        assert node1.subnet_env()["FLANNEL_MTU"] == "1430"
        key = f"{PREFIX}/subnets/0.0.0.0-0&{node1.subnet6.replace('/', '-')}"
        assert lab.etcd is not None
        assert lab.etcd.etcdctl("get", "--print-value-only", key).strip() == (
            f'{{"PublicIP":"0.0.0.0","PublicIPv6":"{node1.address6}","BackendType":"vxlan",'
            f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac_of(node1, DEVICE6)}"}}}}'
        )
    finally:
        lab.close()


def test_a_lease_without_its_v6_vtep_mac_keeps_its_ipv4_peer_and_says_why(
    cluster: LabCluster,
) -> None:
    assert cluster.etcd is not None
    key = "10.5.201.0-24&fc00:0:0:c9::-64"
    value = json.dumps(
        {
            "PublicIP": "198.18.0.78",
            "PublicIPv6": "2001:db8::78",
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": STRANGER_MAC},
        },
        separators=(",", ":"),
    )
    node = cluster.nodes[0]
    cluster.etcd.etcdctl("put", f"{PREFIX}/subnets/{key}", value)
    try:
        refused = wait_for(
            lambda: node.status(HEALTH).get("refused_leases", {}).get(key),
            30,
            "the refusal in /status",
        )
        assert refused == (
            f"lease {key}: BackendV6Data.VtepMAC None is not a unicast MAC address (flanneld "
            'writes BackendV6Data as {"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"})'
        )
        assert f"kernel-v6: not routing lease {key}: " in node.log()
        wait_for(
            lambda: (
                " ".join(node.ns.ip("route", "show", "10.5.201.0/24").split())
                == f"10.5.201.0/24 via 10.5.201.0 dev {DEVICE} proto 157 onlink"
            ),
            what="its IPv4 peer",
        )
        assert route6(node, "fc00:0:0:c9::/64") == ""
    finally:
        cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/{key}")
    wait_for(lambda: key not in node.status(HEALTH).get("refused_leases", {}), 30, "no refusal")


def test_a_node_that_leaves_has_its_entries_removed(cluster: LabCluster) -> None:
    assert cluster.etcd is not None
    node1, _, node3 = cluster.nodes
    assert v6_entries(node1, node3) == (True, True, True)
    mac6, subnet, subnet6 = mac_of(node3, DEVICE6), node3.subnet, node3.subnet6
    cluster.stop_agent(node3)
    cluster.etcd.etcdctl("del", lease_key(node3))
    try:
        for node in cluster.nodes[:2]:
            wait_for(lambda n=node: route6(n, subnet6) == "", what=f"route removal on {node.name}")
            wait_for(
                lambda n=node: not any(mac6 in line for line in neighbours6(n) + fdb6(n)),
                what=f"neighbour and FDB removal on {node.name}",
            )
            assert node.ns.ip("route", "show", subnet).strip() == ""
    finally:
        # The node joins again (with a new lease), for the tests that follow.
        node3.subnet_file.unlink()
        cluster.start_agent(node3, *node3.agent_args)
        cluster.wait_ready(node3)
        cluster.attach_gateway(node3)
    assert cluster.ping6(node1, node3)

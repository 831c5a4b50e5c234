"""Three nodes in namespaces with real agents on the vxlan backend: what an operator would see.

Each node's VtepMAC is kept in its own run directory (the lab's --state-dir), as each machine
keeps it in its own /var/lib/cloudroutes.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudroutes.lab.cluster import LabCluster, LabNode
from tests.conftest import needs_root
from tests.wait import wait_for

pytestmark = [needs_root, pytest.mark.slow]

PREFIX = "/coreos.com/network"
HEALTH = 9302
DEVICE = "flannel.1"
STRANGER = "10.5.200.0"  # a lease written by hand, as flanneld would
STRANGER_MAC = "be:ef:00:00:00:01"
PROBE = "10.5.254.254"  # a neighbour entry the restart test adds and deletes itself


def lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def route_to(node: LabNode, subnet: str) -> str:
    return " ".join(node.ns.ip("route", "show", subnet).split())


def neighbours(node: LabNode) -> list[str]:
    return lines(node.ns.ip("neigh", "show", "dev", DEVICE, check=False))


def fdb(node: LabNode) -> list[str]:
    return lines(node.ns.run("bridge", "fdb", "show", "dev", DEVICE, check=False).stdout)


def device_mac(node: LabNode) -> str:
    match = re.search(r"link/ether (\S+)", node.ns.ip("link", "show", DEVICE))
    assert match, f"{DEVICE} on {node.name}"
    return match[1]


def lease_value(cluster: LabCluster, node: LabNode) -> dict[str, object]:
    assert cluster.etcd is not None
    key = f"{PREFIX}/subnets/{node.subnet.replace('/', '-')}"
    return json.loads(cluster.etcd.etcdctl("get", "--print-value-only", key))


def peer_entries(node: LabNode, peer: LabNode, mac: str) -> tuple[bool, bool, bool]:
    """Whether ``node`` holds each of the three entries for ``peer``."""
    vtep = peer.subnet.split("/")[0]
    return (
        f"{vtep} lladdr {mac} PERMANENT" in neighbours(node),
        f"{mac} dst {peer.address} self permanent" in fdb(node),
        route_to(node, peer.subnet) == f"{peer.subnet} via {vtep} dev {DEVICE} proto 157 onlink",
    )


def passes(node: LabNode) -> int:
    return int(node.status(HEALTH).get("passes", {}).get("kernel", 0))


def wait_for_two_passes(node: LabNode) -> None:
    start = passes(node)
    wait_for(lambda: passes(node) >= start + 2, 30, f"two reconcile passes on {node.name}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    lab = LabCluster(3, backend="vxlan").build()
    try:
        lab.start("--subnet-lease-ttl=60", f"--healthz-port={HEALTH}")
        yield lab
    finally:
        lab.close()


def test_gateways_reach_each_other_over_vxlan(cluster: LabCluster) -> None:
    for src in cluster.nodes:
        for dst in cluster.nodes:
            if src is not dst:
                assert cluster.ping(src, dst), f"{src.name} -> {dst.name}\n{cluster.routes(src)}"
    node1, node2, _ = cluster.nodes
    assert peer_entries(node1, node2, device_mac(node2)) == (True, True, True)
    # The traffic really goes through the overlay: UDP 8472 between the nodes.
    detail = node1.ns.ip("-d", "link", "show", DEVICE)
    assert f"vxlan id 1 local {node1.address} dev eth0" in " ".join(detail.split())
    assert "dstport 8472 nolearning" in detail
    assert node1.subnet_env()["FLANNEL_MTU"] == "1450"
    # The device holds the network address of its lease, as a /32.
    assert f"inet {node1.subnet.split('/')[0]}/32" in node1.ns.ip("addr", "show", DEVICE)


def test_lease_is_flanneld_s_json_with_the_device_mac(cluster: LabCluster) -> None:
    node = cluster.nodes[0]
    mac = device_mac(node)
    assert lease_value(cluster, node) == {
        "PublicIP": node.address,
        "PublicIPv6": None,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": mac},
    }
    assert cluster.etcd is not None
    raw = cluster.etcd.etcdctl(
        "get", "--print-value-only", f"{PREFIX}/subnets/{node.subnet.replace('/', '-')}"
    ).strip()
    assert raw.endswith(f'"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}')
    assert (node.run_dir / f"vxlan-1-{node.address}.mac").read_text().strip() == mac


def test_full_size_packets_with_df_pass(cluster: LabCluster) -> None:
    node1, node2, _ = cluster.nodes
    assert cluster.ping(node1, node2)
    fits = node1.ns.run(
        "ping", "-c", "2", "-W", "2", "-M", "do", "-s", "1372", "-I", node1.gateway,
        node2.gateway, check=False,
    )  # fmt: skip
    assert fits.returncode == 0, fits.stdout + fits.stderr


def test_fdb_entry_deleted_by_hand_comes_back(cluster: LabCluster) -> None:
    node1, node2, _ = cluster.nodes
    mac = device_mac(node2)
    # check=True: the entry was there and is gone (the drift watch may put it back at once).
    node1.ns.run("bridge", "fdb", "del", mac, "dev", DEVICE, "dst", node2.address)
    wait_for(lambda: peer_entries(node1, node2, mac) == (True, True, True), 15, "FDB repair")
    assert cluster.ping(node1, node2)


def test_neighbour_deleted_by_hand_comes_back(cluster: LabCluster) -> None:
    node1, node2, _ = cluster.nodes
    mac = device_mac(node2)
    node1.ns.ip("neigh", "del", node2.subnet.split("/")[0], "dev", DEVICE)
    wait_for(lambda: peer_entries(node1, node2, mac) == (True, True, True), 15, "neighbour repair")
    assert cluster.ping(node1, node2)


def test_deleted_device_comes_back_with_every_peer(cluster: LabCluster) -> None:
    node1, node2, node3 = cluster.nodes
    mac = device_mac(node1)
    node1.ns.ip("link", "del", DEVICE)

    def whole() -> bool:
        return all(
            peer_entries(node1, peer, device_mac(peer)) == (True, True, True)
            for peer in (node2, node3)
        )

    wait_for(lambda: node1.ns.ip("link", "show", DEVICE, check=False) and whole(), 20,
             "the device and its peers back")  # fmt: skip
    assert device_mac(node1) == mac  # peers' entries for it stay right
    assert cluster.ping(node1, node2) and cluster.ping(node3, node1)


def test_flanneld_lease_written_by_hand_is_programmed_as_flanneld_would(
    cluster: LabCluster,
) -> None:
    assert cluster.etcd is not None
    value = json.dumps(
        {
            "PublicIP": "198.18.0.77",
            "PublicIPv6": None,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": STRANGER_MAC},
        },
        separators=(",", ":"),
    )
    cluster.etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.200.0-24", value)
    try:
        for node in cluster.nodes:
            wait_for(
                lambda n=node: (
                    route_to(n, "10.5.200.0/24")
                    == f"10.5.200.0/24 via {STRANGER} dev {DEVICE} proto 157 onlink"
                ),
                what=f"the route on {node.name}",
            )
            assert f"{STRANGER} lladdr {STRANGER_MAC} PERMANENT" in neighbours(node)
            assert f"{STRANGER_MAC} dst 198.18.0.77 self permanent" in fdb(node)
    finally:
        cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/10.5.200.0-24")
    for node in cluster.nodes:
        wait_for(lambda n=node: route_to(n, "10.5.200.0/24") == "", what="route removal")
        wait_for(
            lambda n=node: not any(STRANGER_MAC in line for line in neighbours(n) + fdb(n)),
            what=f"neighbour and FDB removal on {node.name}",
        )


def test_kill_and_restart_under_traffic_loses_nothing(cluster: LabCluster, tmp_path: Path) -> None:
    node1, node2, _ = cluster.nodes
    assert cluster.ping(node1, node2)
    mac = device_mac(node2)
    index = node2.ns.ip("-o", "link", "show", DEVICE).split(":")[0]
    events = tmp_path / "events"
    with events.open("w") as out:
        monitors = [
            node2.ns.popen(["ip", "monitor", "neigh", "route", "link"], stdout=out),
            node2.ns.popen(["bridge", "monitor", "fdb"], stdout=out),
        ]
    # The monitors see deletions: one made here, on the device, before the test proper.
    node2.ns.ip("neigh", "add", PROBE, "lladdr", STRANGER_MAC, "dev", DEVICE, "nud", "permanent")
    node2.ns.ip("neigh", "del", PROBE, "dev", DEVICE)
    wait_for(lambda: f"Deleted {PROBE}" in events.read_text(), 10, "the monitor's probe")
    flood = node1.ns.popen(
        ["ping", "-q", "-i", "0.01", "-c", "1500", "-I", node1.gateway, node2.gateway],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        cluster.stop_agent(node2, kill=True)
        cluster.start_agent(node2, *node2.agent_args)
        cluster.wait_ready(node2)
        wait_for(lambda: passes(node2) >= 2, 30, "the restarted agent's passes")
        assert flood.poll() is None, "the restart outlasted the traffic: make the flood longer"
        output, _ = flood.communicate(timeout=60)
    finally:
        for process in (flood, *monitors):
            process.kill()
            process.wait()
    assert " 0% packet loss" in output, output
    deleted = [
        line
        for line in events.read_text().splitlines()
        if line.startswith("Deleted") and PROBE not in line
    ]
    assert deleted == []
    # The same device (not recreated) with the same MAC, and the same lease.
    assert node2.ns.ip("-o", "link", "show", DEVICE).split(":")[0] == index
    assert device_mac(node2) == mac
    assert lease_value(cluster, node2)["BackendData"] == {"VNI": 1, "VtepMAC": mac}


def test_changed_port_recreates_the_device_and_says_so() -> None:
    lab = LabCluster(1, backend="vxlan").build()
    try:
        lab.start()
        node = lab.nodes[0]
        mac = device_mac(node)
        lab.stop_agent(node)
        lab.backend_options["Port"] = 4789
        lab.set_config()
        lab.start_agent(node)
        wait_for(lambda: "recreating it" in node.log(), 30, "the recreation's log line")
        assert "already exists with incompatible configuration (port: 8472 vs 4789)" in node.log()
        wait_for(lambda: "dstport 4789" in node.ns.ip("-d", "link", "show", DEVICE, check=False),
                 what="the new device")  # fmt: skip
        assert device_mac(node) == mac  # still the node's VtepMAC
    finally:
        lab.close()


def test_direct_routing_uses_host_gw_routes_on_one_link() -> None:
    lab = LabCluster(2, backend="vxlan", backend_options={"DirectRouting": True}).build()
    try:
        lab.start()
        node1, node2 = lab.nodes
        wait_for(
            lambda: (
                route_to(node1, node2.subnet)
                == f"{node2.subnet} via {node2.address} dev eth0 proto 157"
            ),
            what="a host-gw route to the peer on the same link",
        )
        assert lab.ping(node1, node2) and lab.ping(node2, node1)
        assert neighbours(node1) == [] and fdb(node1) == []
        # The lease still carries the VtepMAC, for peers that are not on the link.
        assert lease_value(lab, node1)["BackendData"] == {"VNI": 1, "VtepMAC": device_mac(node1)}
    finally:
        lab.close()


def flanneld_node(lab: LabCluster, node: LabNode, mac: str) -> None:
    """What flanneld leaves on a node: its device, lease (with a TTL) and subnet.env."""
    assert lab.etcd is not None
    n = int(node.address.rsplit(".", 1)[1])
    node.ns.ip("link", "add", DEVICE, "address", mac, "type", "vxlan", "id", "1", "local",
               node.address, "dev", "eth0", "dstport", "8472", "nolearning")  # fmt: skip
    node.ns.ip("link", "set", DEVICE, "mtu", "1450", "up")
    node.ns.ip("addr", "add", f"10.5.{n}.0/32", "dev", DEVICE)
    granted = lab.etcd.etcdctl("lease", "grant", "600")
    lease_id = re.search(r"lease ([0-9a-f]+) granted", granted)
    assert lease_id, granted
    value = json.dumps(
        {
            "PublicIP": node.address,
            "PublicIPv6": None,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": mac},
        },
        separators=(",", ":"),
    )
    lab.etcd.etcdctl("put", f"--lease={lease_id[1]}", f"{PREFIX}/subnets/10.5.{n}.0-24", value)
    node.subnet_file.write_text(
        f"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.{n}.1/24\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    )
    lab.attach_gateway(node)


def flanneld_peer(node: LabNode, peer: LabNode, mac: str) -> None:
    """flanneld's three entries for a peer; its route has protocol boot."""
    p = int(peer.address.rsplit(".", 1)[1])
    vtep = f"10.5.{p}.0"
    node.ns.ip("neigh", "add", vtep, "lladdr", mac, "dev", DEVICE, "nud", "permanent")
    node.ns.run("bridge", "fdb", "add", mac, "dev", DEVICE, "dst", peer.address, "self",
                "permanent")  # fmt: skip
    node.ns.ip("route", "add", f"{vtep}/24", "via", vtep, "dev", DEVICE, "onlink")


def test_a_node_switches_from_flanneld_without_losing_an_entry(tmp_path: Path) -> None:
    lab = LabCluster(2, backend="vxlan").build()
    try:
        lab.set_config()
        node1, node2 = lab.nodes
        macs = {node1.name: "0a:f1:00:00:00:01", node2.name: "0a:f1:00:00:00:02"}
        for node in lab.nodes:
            flanneld_node(lab, node, macs[node.name])
        flanneld_peer(node1, node2, macs[node2.name])
        flanneld_peer(node2, node1, macs[node1.name])
        assert lab.ping(node1, node2)
        events = tmp_path / "events"
        with events.open("w") as out:
            monitor = node1.ns.popen(["ip", "monitor", "neigh", "route", "link"], stdout=out)
        try:
            lab.start_agent(node1, f"--healthz-port={HEALTH}")
            lab.wait_ready(node1)
            wait_for(
                lambda: (
                    route_to(node1, "10.5.2.0/24")
                    == f"10.5.2.0/24 via 10.5.2.0 dev {DEVICE} proto 157 onlink"
                ),
                what="cloudroutes to take over flanneld's peer",
            )
        finally:
            monitor.kill()
            monitor.wait()
        assert [line for line in events.read_text().splitlines() if "Deleted" in line] == []
        # flanneld's device and VtepMAC are kept, so the peer's entries for this node stay right.
        assert device_mac(node1) == macs[node1.name]
        assert lease_value(lab, node1)["BackendData"] == {"VNI": 1, "VtepMAC": macs[node1.name]}
        assert node1.subnet_env()["FLANNEL_SUBNET"] == "10.5.1.1/24"
        assert peer_entries(node1, node2, macs[node2.name]) == (True, True, True)
        assert lab.ping(node1, node2)
    finally:
        lab.close()

"""A host-gw node that ran flanneld switches to cloudroutes without a moment without routes.

flanneld leaves its peer routes with rt protocol ``boot`` (it never sets one), its lease in
etcd and its subnet.env. The node here is set up exactly so, by hand, then cloudroutes starts
on it: it must keep the subnet and the one lease, take over the routes its leases want in place,
leave every other route alone, and from then on manage the routes it took over.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest

from cloudroutes.lab.cluster import LabCluster, LabNode
from tests.conftest import needs_root
from tests.wait import wait_for

pytestmark = [needs_root, pytest.mark.slow]

PREFIX = "/coreos.com/network"
NETWORK = "10.5.0.0/16"
UNCLAIMED = "10.5.99.0/24"  # inside the Network, claimed by no lease: an operator's route


def flanneld_lease(cluster: LabCluster, n: int, public_ip: str) -> None:
    """The lease flanneld writes for node n, byte for byte, with a TTL."""
    assert cluster.etcd is not None
    granted = cluster.etcd.etcdctl("lease", "grant", "600")
    lease_id = re.search(r"lease ([0-9a-f]+) granted", granted)
    assert lease_id, granted
    value = json.dumps(
        {"PublicIP": public_ip, "PublicIPv6": None, "BackendType": "host-gw"},
        separators=(",", ":"),
    )
    cluster.etcd.etcdctl("put", f"--lease={lease_id[1]}", f"{PREFIX}/subnets/10.5.{n}.0-24", value)


def leases(cluster: LabCluster) -> list[str]:
    assert cluster.etcd is not None
    return cluster.etcd.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").split()


def route(node: LabNode, subnet: str) -> str:
    return " ".join(node.ns.ip("route", "show", subnet).split())


@pytest.fixture
def flanneld_cluster() -> Iterator[LabCluster]:
    """Three nodes as flanneld left them: leases, subnet.env, proto boot peer routes."""
    lab = LabCluster(3).build()
    try:
        lab.set_config()
        for node in lab.nodes:
            n = int(node.address.rsplit(".", 1)[1])
            flanneld_lease(lab, n, node.address)
            node.subnet_file.write_text(
                f"FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET=10.5.{n}.1/24\n"
                "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n"
            )
            lab.attach_gateway(node)
            for peer in lab.nodes:
                if peer is not node:
                    p = int(peer.address.rsplit(".", 1)[1])
                    node.ns.ip("route", "add", f"10.5.{p}.0/24", "via", peer.address, "dev", "eth0")
        lab.nodes[0].ns.ip("route", "add", UNCLAIMED, "via", "198.18.0.3", "dev", "eth0")
        yield lab
    finally:
        lab.close()


def test_a_node_switches_from_flanneld_without_losing_a_route(
    flanneld_cluster: LabCluster,
) -> None:
    cluster = flanneld_cluster
    node1, node2, node3 = cluster.nodes
    assert route(node1, "10.5.2.0/24") == "10.5.2.0/24 via 198.18.0.2 dev eth0"  # proto boot
    # Every route change on node1 from now on, to prove no peer route is ever removed.
    monitor = node1.ns.popen(
        ["ip", "monitor", "route"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        cluster.start_agent(node1)
        cluster.wait_ready(node1)
        for subnet, via in (("10.5.2.0/24", "198.18.0.2"), ("10.5.3.0/24", "198.18.0.3")):
            wait_for(
                lambda s=subnet, v=via: route(node1, s) == f"{s} via {v} dev eth0 proto 157",
                what=f"cloudroutes to take over the route to {subnet}",
            )
    finally:
        monitor.terminate()
        events, _ = monitor.communicate(timeout=10)
    assert not [line for line in events.splitlines() if line.startswith("Deleted")], events

    # The same subnet, and still one lease per node.
    assert node1.subnet_env()["FLANNEL_SUBNET"] == "10.5.1.1/24"
    assert sorted(leases(cluster)) == [f"{PREFIX}/subnets/10.5.{n}.0-24" for n in (1, 2, 3)]
    # A route at a destination no lease claims is not ours, and stays.
    assert route(node1, UNCLAIMED) == f"{UNCLAIMED} via 198.18.0.3 dev eth0"
    assert cluster.ping(node1, node2) and cluster.ping(node1, node3)

    # What it took over, it now manages: a peer that moves is retargeted ...
    flanneld_lease(cluster, 3, "198.18.0.2")
    wait_for(
        lambda: route(node1, "10.5.3.0/24") == "10.5.3.0/24 via 198.18.0.2 dev eth0 proto 157",
        what="the moved peer's route to be retargeted",
    )
    # ... and a peer that leaves is removed; the unclaimed route stays.
    assert cluster.etcd is not None
    cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/10.5.2.0-24")
    wait_for(lambda: route(node1, "10.5.2.0/24") == "", what="the departed peer's route to go")
    assert route(node1, UNCLAIMED) == f"{UNCLAIMED} via 198.18.0.3 dev eth0"

    # All of it holds after a restart of the agent.
    cluster.stop_agent(node1)
    node1.subnet_file.unlink()
    cluster.start_agent(node1)
    cluster.wait_ready(node1)
    assert node1.subnet_env()["FLANNEL_SUBNET"] == "10.5.1.1/24"
    assert route(node1, "10.5.3.0/24") == "10.5.3.0/24 via 198.18.0.2 dev eth0 proto 157"
    assert route(node1, "10.5.2.0/24") == ""
    assert route(node1, UNCLAIMED) == f"{UNCLAIMED} via 198.18.0.3 dev eth0"

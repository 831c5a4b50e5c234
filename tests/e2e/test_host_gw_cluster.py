"""Three nodes in namespaces, real agents, real etcd: what an operator of host-gw would see."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator

import pytest

from cloudroutes.lab.cluster import LabCluster, LabNode
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.slow]

PREFIX = "/coreos.com/network"


def wait_for(check: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def route_to(node: LabNode, subnet: str) -> str:
    return node.ns.ip("route", "show", subnet).strip()


def lease_key(node: LabNode) -> str:
    return f"{PREFIX}/subnets/{node.subnet.replace('/', '-')}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    lab = LabCluster(3).build()
    try:
        lab.start("--subnet-lease-ttl=30", "--healthz-port=9301", "--ip-masq")
        yield lab
    finally:
        lab.close()


def test_every_node_reaches_every_other_nodes_subnet(cluster: LabCluster) -> None:
    for src in cluster.nodes:
        for dst in cluster.nodes:
            if src is not dst:
                assert cluster.ping(src, dst), f"{src.name} -> {dst.name}\n{cluster.routes(src)}"
    subnets = {node.subnet for node in cluster.nodes}
    assert len(subnets) == 3
    node1, node2 = cluster.nodes[:2]
    assert route_to(node1, node2.subnet).startswith(f"{node2.subnet} via {node2.address} dev eth0")


def test_leases_are_flannel_format_in_etcd(cluster: LabCluster) -> None:
    node = cluster.nodes[0]
    value = cluster.etcd.etcdctl("get", "--print-value-only", lease_key(node)).strip()
    assert value == f'{{"PublicIP":"{node.address}","PublicIPv6":null,"BackendType":"host-gw"}}'


def test_masquerade_rules_and_subnet_env(cluster: LabCluster) -> None:
    node = cluster.nodes[0]
    env = node.subnet_env()
    assert env["FLANNEL_NETWORK"] == "10.5.0.0/16"
    assert env["FLANNEL_IPMASQ"] == "true"
    assert env["FLANNEL_MTU"] == "1500"
    rules = node.ns.run("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout.splitlines()
    subnet = node.subnet
    assert [r.replace(' -m comment --comment "flanneld masq"', "") for r in rules[1:]] == [
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -j RETURN",
        f"-A FLANNEL-POSTRTG -s {subnet} -d 10.5.0.0/16 -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d {subnet} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d {subnet} -j RETURN",
        "-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully",
        "-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -j MASQUERADE --random-fully",
    ]
    forward = node.ns.run("iptables", "-S", "FLANNEL-FWD").stdout
    assert "-A FLANNEL-FWD -s 10.5.0.0/16" in forward and "-A FLANNEL-FWD -d 10.5.0.0/16" in forward


def test_health_ready_and_metrics(cluster: LabCluster) -> None:
    node = cluster.nodes[0]
    probe = node.ns.run(
        "python3", "-c",
        "import urllib.request as u;"
        "print(u.urlopen('http://127.0.0.1:9301/readyz').status);"
        "print(u.urlopen('http://127.0.0.1:9301/metrics').read().decode())",
    )  # fmt: skip
    status, _, metrics = probe.stdout.partition("\n")
    assert status == "200"
    assert re.search(r'^cloudroutes_routes_programmed\{table="[^"]+"\} 2\.0$', metrics, re.M)
    assert re.search(r"^cloudroutes_leases 3\.0$", metrics, re.M)
    assert "cloudroutes_lease_event_to_route_seconds_bucket" in metrics
    assert "cloudroutes_reconcile_duration_seconds_count" in metrics


def test_off_link_peer_gets_a_clear_status_not_a_crash(cluster: LabCluster) -> None:
    node1, node2, _ = cluster.nodes
    value = '{"PublicIP":"198.19.5.5","PublicIPv6":null,"BackendType":"host-gw"}'
    cluster.etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.203.0-24", value)
    try:

        def status() -> dict[str, dict[str, str]]:
            probe = node1.ns.run(
                "python3", "-c",
                "import urllib.request as u;"
                "print(u.urlopen('http://127.0.0.1:9301/status').read().decode())",
            )  # fmt: skip
            return json.loads(probe.stdout)["routes"]

        wait_for(lambda: status().get("kernel 10.5.203.0/24", {}).get("state") == "failed",
                 what="failed status for the off-link peer")  # fmt: skip
        entry = status()["kernel 10.5.203.0/24"]
        assert "next hop 198.19.5.5 is not on-link on eth0" in entry["reason"]
        assert entry["lease"] == "10.5.203.0-24"
        assert node1.agent is not None and node1.agent.poll() is None
        assert cluster.ping(node1, node2)
    finally:
        cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/10.5.203.0-24")


def test_route_deleted_by_hand_comes_back(cluster: LabCluster) -> None:
    node1, node2 = cluster.nodes[:2]
    node1.ns.ip("route", "del", node2.subnet)
    wait_for(lambda: route_to(node1, node2.subnet) != "", timeout=15, what="route repair")
    assert cluster.ping(node1, node2)


def test_operator_routes_are_never_touched(cluster: LabCluster) -> None:
    node1 = cluster.nodes[0]
    node1.ns.ip("route", "add", "10.5.250.0/24", "via", "198.18.0.200", "dev", "eth0")
    time.sleep(1.5)  # several reconcile chances; the route must survive all of them
    assert route_to(node1, "10.5.250.0/24").startswith("10.5.250.0/24 via 198.18.0.200")
    node1.ns.ip("route", "del", "10.5.250.0/24")


def test_agent_restart_keeps_subnet_and_routes(cluster: LabCluster) -> None:
    node1, node2, node3 = cluster.nodes
    subnet = node2.subnet
    before = {n.name: route_to(n, subnet) for n in (node1, node3)}
    own_routes = cluster.routes(node2)
    cluster.stop_agent(node2, kill=True)
    # While it is down, nothing moves: peers keep their route to it, it keeps its own.
    assert {n.name: route_to(n, subnet) for n in (node1, node3)} == before
    assert cluster.routes(node2) == own_routes
    assert cluster.ping(node1, node2)
    node2.subnet_file.unlink()  # the lease is found again by public IP, not only by subnet.env
    cluster.start_agent(node2, *node2.agent_args)
    cluster.wait_ready(node2)
    assert node2.subnet == subnet
    assert cluster.routes(node2) == own_routes
    assert cluster.ping(node2, node3)


def test_flannel_lease_written_by_hand_gets_routes(cluster: LabCluster) -> None:
    value = '{"PublicIP":"198.18.0.77","PublicIPv6":null,"BackendType":"host-gw"}'
    cluster.etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.200.0-24", value)
    for node in cluster.nodes:
        wait_for(lambda n=node: "via 198.18.0.77" in route_to(n, "10.5.200.0/24"), what="route")
    cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/10.5.200.0-24")
    for node in cluster.nodes:
        wait_for(lambda n=node: route_to(n, "10.5.200.0/24") == "", what="route removal")


def test_etcd_outage_keeps_routes_and_agents_recover(cluster: LabCluster) -> None:
    node1, node2, _ = cluster.nodes
    routes = {n.name: cluster.routes(n) for n in cluster.nodes}
    cluster.etcd.stop()
    try:
        time.sleep(30)
        assert {n.name: cluster.routes(n) for n in cluster.nodes} == routes
        assert cluster.ping(node1, node2)
        assert all(n.agent is not None and n.agent.poll() is None for n in cluster.nodes)
    finally:
        cluster.etcd.start()
    value = '{"PublicIP":"198.18.0.78","PublicIPv6":null,"BackendType":"host-gw"}'
    cluster.etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.201.0-24", value)
    for node in cluster.nodes:
        wait_for(lambda n=node: "via 198.18.0.78" in route_to(n, "10.5.201.0/24"), timeout=30,
                 what="route after etcd came back")  # fmt: skip
    cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/10.5.201.0-24")


def test_deleted_lease_stops_its_agent_and_leaves_every_peer(cluster: LabCluster) -> None:
    node3 = cluster.nodes[2]
    subnet = node3.subnet
    cluster.etcd.etcdctl("del", lease_key(node3))
    assert node3.agent is not None
    assert node3.agent.wait(15) == 0, node3.log_tail()
    assert "Lease has been revoked" in node3.log_file.read_text()
    for node in cluster.nodes[:2]:
        wait_for(lambda n=node: route_to(n, subnet) == "", what=f"{subnet} to leave {node.name}")


def test_expired_lease_of_a_dead_node_leaves_every_peer() -> None:
    lab = LabCluster(2).build()
    try:
        lab.start("--subnet-lease-ttl=4")
        node1, node2 = lab.nodes
        subnet = node2.subnet
        wait_for(lambda: route_to(node1, subnet) != "", what="route to node2")
        lab.stop_agent(node2, kill=True)  # dead: nobody renews its lease
        wait_for(lambda: route_to(node1, subnet) == "", timeout=20, what="expiry")
        assert lab.etcd.etcdctl("get", "--print-value-only", lease_key(node2)).strip() == ""
    finally:
        lab.close()


def test_bad_config_is_rejected_before_anything_is_programmed() -> None:
    lab = LabCluster(1).build()
    try:
        lab.set_config(
            '{"Network": "10.5.0.0/16", "SubnetLen": 31, "Backend": {"Type": "host-gw"}}'
        )
    except Exception as exc:  # config set validates too: write it raw, as an old tool might
        assert "SubnetLen must be less than /31" in str(exc)
        lab.etcd.etcdctl(
            "put", f"{PREFIX}/config",
            '{"Network": "10.5.0.0/16", "SubnetLen": 31, "Backend": {"Type": "host-gw"}}',
        )  # fmt: skip
    try:
        node = lab.nodes[0]
        routes_before = lab.routes(node)
        lab.start_agent(node)
        assert node.agent is not None
        assert node.agent.wait(20) == 1
        log = node.log_file.read_text().strip().splitlines()
        assert log[-1] == (
            "cloudroutes: error: invalid network config (etcd /coreos.com/network/config): "
            "SubnetLen must be less than /31"
        )
        assert not node.subnet_file.exists()
        assert lab.routes(node) == routes_before
        assert (
            lab.etcd.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").strip() == ""
        )
    finally:
        lab.close()


def test_agents_survive_losing_their_etcd_member() -> None:
    lab = LabCluster(2, etcd_members=3).build()
    try:
        lab.start()
        node1, node2 = lab.nodes
        assert lab.ping(node1, node2)
        # Take each member down in turn: whichever one an agent talks to, it loses it once.
        for i, member in enumerate(lab.etcd.members):
            lab.etcd.stop_member(member)
            healthy = lab.etcd.endpoints[(i + 1) % 3]
            subnet = f"10.5.{210 + i}.0"
            value = f'{{"PublicIP":"198.18.0.{80 + i}","PublicIPv6":null,"BackendType":"host-gw"}}'
            lab.etcd_hosts[0].run(
                "etcdctl", f"--endpoints={healthy}", "put", f"{PREFIX}/subnets/{subnet}-24", value
            )
            for node in lab.nodes:
                wait_for(lambda n=node, s=subnet: route_to(n, f"{s}/24") != "",
                         timeout=30, what=f"route to {subnet} with member {i} down")  # fmt: skip
            lab.etcd.start_member(member)
        assert all(n.agent is not None and n.agent.poll() is None for n in lab.nodes)
    finally:
        lab.close()

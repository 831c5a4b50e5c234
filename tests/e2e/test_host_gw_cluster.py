"""Three nodes in namespaces, real agents, real etcd: what an operator of host-gw would see."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from cloudroutes.lab.cluster import LabCluster, LabNode
from tests.conftest import needs_root
from tests.wait import wait_for

pytestmark = [needs_root, pytest.mark.slow]

PREFIX = "/coreos.com/network"
HEALTH = 9301


def route_to(node: LabNode, subnet: str) -> str:
    return node.ns.ip("route", "show", subnet).strip()


def lease_key(node: LabNode) -> str:
    return f"{PREFIX}/subnets/{node.subnet.replace('/', '-')}"


def passes(node: LabNode) -> int:
    """How many reconcile passes the node's agent has finished on its kernel table."""
    return int(node.status(HEALTH).get("passes", {}).get("kernel", 0))


def wait_for_two_passes(node: LabNode, timeout: float = 30) -> None:
    """Wait until a whole pass ran after now (the one under way may have read the table before)."""
    start = passes(node)
    wait_for(lambda: passes(node) >= start + 2, timeout, f"two reconcile passes on {node.name}")


def wait_for_lease_count(cluster: LabCluster, count: int) -> None:
    for node in cluster.nodes:
        wait_for(lambda n=node: n.status(HEALTH).get("leases") == count,
                 what=f"{count} leases on {node.name}")  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    lab = LabCluster(3).build()
    try:
        lab.start("--subnet-lease-ttl=30", f"--healthz-port={HEALTH}", "--ip-masq")
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
    assert node.http_get(HEALTH, "/readyz") == (200, "ok\n")
    assert node.http_get(HEALTH, "/healthz") == (200, "ok\n")

    def metrics() -> str:
        return node.http_get(HEALTH, "/metrics")[1]

    # Another test's lease may still be leaving: wait for the cluster's own three.
    wait_for(lambda: re.search(r"^cloudroutes_leases 3\.0$", metrics(), re.M), what="3 leases")
    wait_for(lambda: re.search(r'^cloudroutes_routes_programmed\{table="kernel"\} 2\.0$',
                               metrics(), re.M), what="2 programmed routes")  # fmt: skip
    text = metrics()
    assert "cloudroutes_lease_event_to_route_seconds_bucket" in text
    assert "cloudroutes_reconcile_duration_seconds_count" in text
    assert re.search(r"^cloudroutes_ready 1\.0$", text, re.M)
    assert re.search(r"^cloudroutes_config_differs 0\.0$", text, re.M)
    status = node.status(HEALTH)
    assert (status["etcd"], status["waiting_for"], status["config"]) == ("ok", None, "as started")


def test_off_link_peer_gets_a_clear_status_not_a_crash(cluster: LabCluster) -> None:
    node1, node2, _ = cluster.nodes
    value = '{"PublicIP":"198.19.5.5","PublicIPv6":null,"BackendType":"host-gw"}'
    cluster.etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.203.0-24", value)
    try:

        def entry() -> dict[str, str]:
            return node1.status(HEALTH)["routes"].get("kernel 10.5.203.0/24", {})

        wait_for(lambda: entry().get("state") == "failed",
                 what="failed status for the off-link peer")  # fmt: skip
        assert "next hop 198.19.5.5 is not on-link on eth0" in entry()["reason"]
        assert entry()["lease"] == "10.5.203.0-24"
        assert node1.agent_running
        assert cluster.ping(node1, node2)
    finally:
        cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/10.5.203.0-24")
        wait_for_lease_count(cluster, 3)


def test_route_deleted_by_hand_comes_back(cluster: LabCluster) -> None:
    node1, node2 = cluster.nodes[:2]
    node1.ns.ip("route", "del", node2.subnet)
    wait_for(lambda: route_to(node1, node2.subnet) != "", timeout=15, what="route repair")
    assert cluster.ping(node1, node2)


def test_operator_routes_are_never_touched(cluster: LabCluster) -> None:
    node1 = cluster.nodes[0]
    node1.ns.ip("route", "add", "10.5.250.0/24", "via", "198.18.0.200", "dev", "eth0")
    try:
        wait_for_two_passes(node1)  # the table was read and reconciled with the route in it
        assert route_to(node1, "10.5.250.0/24").startswith("10.5.250.0/24 via 198.18.0.200")
    finally:
        node1.ns.ip("route", "del", "10.5.250.0/24")


def test_agent_restart_keeps_subnet_and_routes(cluster: LabCluster) -> None:
    node1, node2, node3 = cluster.nodes
    subnet = node2.subnet
    before = {n.name: route_to(n, subnet) for n in (node1, node3)}
    own_routes = cluster.routes(node2)
    cluster.stop_agent(node2, kill=True)
    # While it is down, nothing moves: peers keep their route to it, it keeps its own. (Not
    # waited on: its lease has a 30 s TTL here, and the point is the restart below.)
    assert {n.name: route_to(n, subnet) for n in (node1, node3)} == before
    assert cluster.routes(node2) == own_routes
    assert cluster.ping(node1, node2)
    node2.subnet_file.unlink()  # the lease is found again by public IP, not only by subnet.env
    cluster.start_agent(node2, *node2.agent_args)
    cluster.wait_ready(node2)
    assert node2.subnet == subnet
    wait_for_two_passes(node2)  # the new agent has read the table and adopted what it found
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
        for node in cluster.nodes:
            wait_for(lambda n=node: n.status(HEALTH).get("etcd", "ok") != "ok", timeout=30,
                     what=f"{node.name} to notice etcd is down")  # fmt: skip
            assert node.http_get(HEALTH, "/readyz")[0] == 503
            assert node.http_get(HEALTH, "/healthz")[0] == 200
            wait_for_two_passes(node)
        assert {n.name: cluster.routes(n) for n in cluster.nodes} == routes
        assert cluster.ping(node1, node2)
        assert all(n.agent_running for n in cluster.nodes)
    finally:
        cluster.etcd.start()
    value = '{"PublicIP":"198.18.0.78","PublicIPv6":null,"BackendType":"host-gw"}'
    cluster.etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.201.0-24", value)
    try:
        for node in cluster.nodes:
            wait_for(lambda n=node: "via 198.18.0.78" in route_to(n, "10.5.201.0/24"),
                     timeout=30, what="route after etcd came back")  # fmt: skip
            wait_for(lambda n=node: n.http_get(HEALTH, "/readyz")[0] == 200, what="ready again")
    finally:
        cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/10.5.201.0-24")
        wait_for_lease_count(cluster, 3)


def test_deleted_lease_stops_its_agent_and_leaves_every_peer(cluster: LabCluster) -> None:
    node3 = cluster.nodes[2]
    subnet = node3.subnet
    cluster.etcd.etcdctl("del", lease_key(node3))
    assert node3.agent is not None
    try:
        assert node3.agent.wait(15) == 0, node3.log_tail()
        assert "Lease has been revoked" in node3.log()
        for node in cluster.nodes[:2]:
            wait_for(
                lambda n=node: route_to(n, subnet) == "", what=f"{subnet} to leave {node.name}"
            )
    finally:
        # Back as it was for the other tests: the node rejoins with its old subnet.
        cluster.stop_agent(node3)
        cluster.start_agent(node3, *node3.agent_args)
        cluster.wait_ready(node3)
        cluster.attach_gateway(node3)
        for node in cluster.nodes[:2]:
            wait_for(lambda n=node: route_to(n, node3.subnet) != "", what="node3 back")


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
        log = node.log().strip().splitlines()
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
        assert all(n.agent_running for n in lab.nodes)
    finally:
        lab.close()

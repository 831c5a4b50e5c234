"""Three nodes in namespaces with real agents on the udp backend: what an operator would see."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudroutes.lab.cluster import LabCluster, LabNode
from tests.conftest import needs_root
from tests.wait import wait_for

pytestmark = [needs_root, pytest.mark.slow]

PREFIX = "/coreos.com/network"
HEALTH = 9303
STRANGER = "10.5.200"  # a subnet leased by hand, as flanneld's udp backend writes a lease
UNLEASED = "10.5.222.1"  # inside the Network, leased by nobody

# A TCP connect from the node's gateway address: its error and how long it took.
_CONNECT = """
import socket, sys, time
s = socket.socket()
s.settimeout(10)
s.bind((sys.argv[1], 0))
start = time.monotonic()
try:
    s.connect((sys.argv[2], 80))
    print("connected", 0)
except OSError as exc:
    print(exc.strerror, time.monotonic() - start)
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    lab = LabCluster(3, backend="udp").build()
    try:
        lab.start(f"--healthz-port={HEALTH}", "--subnet-lease-ttl=60")
        # Every node's workers run with every peer before a test looks.
        for src in lab.nodes:
            for dst in lab.nodes:
                assert src is dst or lab.ping(src, dst), f"{src.name} -> {dst.name}"
        yield lab
    finally:
        lab.close()


def lease_key(node: LabNode) -> str:
    return f"{PREFIX}/subnets/{node.subnet.replace('/', '-')}"


def counters(node: LabNode) -> dict[str, int]:
    """flannel0's packet counters."""
    stats = json.loads(node.ns.ip("-s", "-j", "link", "show", "flannel0"))[0]["stats64"]
    return {"rx": stats["rx"]["packets"], "tx": stats["tx"]["packets"]}


def test_gateways_ping_each_other_through_flannel0(cluster: LabCluster) -> None:
    for src in cluster.nodes:
        for dst in cluster.nodes:
            if src is not dst:
                before = counters(dst)
                assert cluster.ping(src, dst), f"{src.name} -> {dst.name}\n{src.log_tail()}"
                assert counters(dst)["rx"] > before["rx"], "the ping came in through flannel0"
    node = cluster.nodes[0]
    assert node.ns.ip("route", "show", "10.5.0.0/16").split() == [
        "10.5.0.0/16", "dev", "flannel0", "proto", "157", "scope", "link",
    ]  # fmt: skip
    link = node.ns.ip("addr", "show", "flannel0")
    assert "mtu 1472" in link
    assert f"inet {node.subnet.split('/')[0]}/32" in link
    assert node.subnet_env()["FLANNEL_MTU"] == "1472"


def test_leases_are_flanneld_udp_format(cluster: LabCluster) -> None:
    for node in cluster.nodes:
        value = cluster.etcd.etcdctl("get", "--print-value-only", lease_key(node)).strip()
        assert value == f'{{"PublicIP":"{node.address}","PublicIPv6":null}}'


def test_an_unleased_destination_fails_at_once_with_network_unreachable(
    cluster: LabCluster,
) -> None:
    node = cluster.nodes[0]
    result = node.ns.run("python3", "-c", _CONNECT, node.gateway, UNLEASED)
    error, _, seconds = result.stdout.strip().rpartition(" ")
    assert error == "Network is unreachable"
    assert float(seconds) < 1.0, "the ICMP error reached the socket; no timeout"
    ping = node.ns.run("ping", "-c", "1", "-W", "2", "-I", node.gateway, UNLEASED, check=False)
    # flanneld answers no ICMP packet with an ICMP error, and neither do we.
    assert "0 received" in ping.stdout and "Unreachable" not in ping.stdout


def test_a_lease_written_by_hand_in_flanneld_format_is_routed(cluster: LabCluster) -> None:
    """node3 plays a flanneld node holding a second subnet; node1 learns it from the lease."""
    node1, _, node3 = cluster.nodes
    key = f"{PREFIX}/subnets/{STRANGER}.0-24"
    node3.ns.ip("link", "add", "stranger", "type", "bridge")
    node3.ns.ip("addr", "add", f"{STRANGER}.1/24", "dev", "stranger")
    node3.ns.ip("link", "set", "stranger", "up")
    cluster.etcd.etcdctl("put", key, f'{{"PublicIP":"{node3.address}","PublicIPv6":null}}')
    try:
        ping = ["ping", "-c", "1", "-W", "1", "-I", node1.gateway, f"{STRANGER}.1"]
        wait_for(lambda: node1.ns.run(*ping, check=False).returncode == 0, 20,
                 f"a ping from node1 to {STRANGER}.1 on node3")  # fmt: skip
        routes = node1.status(HEALTH)["routes"]
        assert routes[f"udp {STRANGER}.0/24"]["state"] == "programmed"
        assert routes[f"udp {STRANGER}.0/24"]["route"].startswith(
            f"{STRANGER}.0/24 via {node3.address}"
        )
    finally:
        cluster.etcd.etcdctl("del", key)
        node3.ns.ip("link", "del", "stranger")
    wait_for(
        lambda: node1.ns.run("python3", "-c", _CONNECT, node1.gateway, f"{STRANGER}.1")
        .stdout.startswith("Network is unreachable"),
        20, "the lease's removal to reach node1's forwarder",
    )  # fmt: skip


def test_a_1400_byte_df_ping_passes_and_a_bigger_one_is_told_the_mtu(cluster: LabCluster) -> None:
    node1, node2 = cluster.nodes[:2]
    base = ["ping", "-c", "1", "-W", "2", "-M", "do", "-I", node1.gateway]
    fits = node1.ns.run(*base, "-s", "1400", node2.gateway, check=False)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "1408 bytes from" in fits.stdout
    # 1444 bytes of ICMP payload + 28 bytes of headers = flannel0's MTU of 1472.
    edge = node1.ns.run(*base, "-s", "1444", node2.gateway, check=False)
    assert edge.returncode == 0, edge.stdout + edge.stderr
    too_big = node1.ns.run(*base, "-s", "1445", node2.gateway, check=False)
    assert too_big.returncode != 0
    assert re.search(r"message too long, mtu=1472", too_big.stdout + too_big.stderr)


def test_the_forwarder_goes_with_the_agent(cluster: LabCluster) -> None:
    node = cluster.nodes[1]
    assert node.ns.ip("link", "show", "flannel0", check=False)
    cluster.stop_agent(node, kill=True)
    try:
        wait_for(lambda: not node.ns.ip("link", "show", "flannel0", check=False), 10,
                 "flannel0 to go when its agent is killed")  # fmt: skip
        # The device lives while any process holds it open: its workers are gone too.
    finally:
        node.subnet_file.unlink()
        cluster.start_agent(node, *node.agent_args)
        cluster.wait_ready(node)
    started = time.monotonic()
    assert cluster.ping(cluster.nodes[0], node), node.log_tail()
    assert time.monotonic() - started < 20


def workers_of(node: LabNode) -> dict[str, int]:
    """The forwarder workers the node's agent runs: direction -> pid."""
    assert node.agent is not None
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if b"providers.udp_forwarder" in cmdline and parent in agent_pids(node):
            found[cmdline[cmdline.index(b"providers.udp_forwarder") + 1].decode()] = int(entry.name)
    return found


def agent_pids(node: LabNode) -> set[int]:
    """The agent's pid and its parents' up to `ip netns exec` (which may exec or fork)."""
    assert node.agent is not None
    pids = {node.agent.pid}
    for entry in Path(f"/proc/{node.agent.pid}/task").iterdir():
        children = (entry / "children").read_text().split()
        pids.update(int(p) for p in children)
    return pids


def test_a_worker_that_dies_is_restarted(cluster: LabCluster) -> None:
    node1, node2 = cluster.nodes[:2]
    before = wait_for(lambda: len(workers_of(node2)) == 2 and workers_of(node2), 10,
                      "node2's two workers")  # fmt: skip
    os.kill(before["udp-to-tun"], signal.SIGKILL)
    after = wait_for(lambda: (w := workers_of(node2)).get("udp-to-tun", before["udp-to-tun"])
                     != before["udp-to-tun"] and w, 10, "a new udp-to-tun worker")  # fmt: skip
    assert after["tun-to-udp"] == before["tun-to-udp"], "the other direction kept running"
    assert cluster.ping(node1, node2)
    assert "udp forwarder: worker udp-to-tun exited with status -9; restarted it" in node2.log()

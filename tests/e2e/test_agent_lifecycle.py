"""The agent as an operator runs it: one per node, probes while it waits, signals, config
changes, and an etcd that loses everything while the agents run."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator

import pytest

from cloudroutes.lab.cluster import LabCluster, LabNode
from tests.conftest import needs_root
from tests.wait import wait_for

pytestmark = [needs_root, pytest.mark.slow]

PREFIX = "/coreos.com/network"
CONFIG_KEY = f"{PREFIX}/config"
HEALTH = 9311
RUNS_ON = "this agent runs on with the config it started with"


def route_to(node: LabNode, subnet: str) -> str:
    return node.ns.ip("route", "show", subnet).strip()


def lease_value(lab: LabCluster, node: LabNode) -> str:
    key = f"{PREFIX}/subnets/{node.subnet.replace('/', '-')}"
    return lab.etcd.etcdctl("get", "--print-value-only", key).strip()


def fingerprint(lab: LabCluster, node: LabNode) -> tuple[str, str, int | None]:
    """What must not change when etcd loses its data: subnet, lease value, agent process."""
    return node.subnet, lease_value(lab, node), node.agent.pid if node.agent else None


def log_lines_with(node: LabNode, text: str) -> list[str]:
    return [line for line in node.log().splitlines() if text in line]


@pytest.fixture(scope="module")
def pair() -> Iterator[LabCluster]:
    lab = LabCluster(2).build()
    try:
        lab.start(f"--healthz-port={HEALTH}")
        yield lab
    finally:
        lab.close()


@pytest.fixture
def lab1() -> Iterator[LabCluster]:
    lab = LabCluster(1).build()
    try:
        yield lab
    finally:
        lab.close()


# --- one agent per node -----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [PREFIX, "/other/network"])
def test_second_agent_in_a_node_refuses_naming_the_first(pair: LabCluster, prefix: str) -> None:
    node = pair.nodes[0]
    assert node.agent is not None
    second_env = node.run_dir / "second.env"
    result = node.ns.run(
        pair.cli, "agent", f"--etcd-endpoints={pair.endpoints}", f"--etcd-prefix={prefix}",
        "--iface=eth0", f"--subnet-file={second_env}", check=False, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        f"cloudroutes: error: another cloudroutes agent (pid {node.agent.pid}, network config "
        f"at etcd {CONFIG_KEY}) already manages the routes of protocol 157 in this network "
        "namespace; stop it before starting this one\n"
    )
    assert not second_env.exists()
    assert pair.etcd.etcdctl("get", "--prefix", "--keys-only", "/other/").strip() == ""
    assert node.agent_running
    assert pair.ping(node, pair.nodes[1])


# --- signals and config changes ---------------------------------------------------------------


def test_sighup_rereads_the_config_and_keeps_running(pair: LabCluster) -> None:
    node = pair.nodes[0]
    assert node.agent is not None
    node.agent.send_signal(signal.SIGHUP)
    wait_for(lambda: log_lines_with(node, "SIGHUP: network config unchanged"), what="SIGHUP line")
    assert node.agent_running

    original = pair.etcd.etcdctl("get", "--print-value-only", CONFIG_KEY).strip()
    pair.set_config('{"Network": "10.6.0.0/16", "Backend": {"Type": "host-gw"}}')
    try:
        node.agent.send_signal(signal.SIGHUP)
        changed = wait_for(
            lambda: log_lines_with(node, "SIGHUP: network config etcd"), what="SIGHUP change"
        )
        assert changed[-1].endswith(
            f"SIGHUP: network config etcd {CONFIG_KEY} changed (Network 10.5.0.0/16 -> "
            "10.6.0.0/16, SubnetMin 10.5.1.0 -> 10.6.1.0, SubnetMax 10.5.255.0 -> 10.6.255.0); "
            f"{RUNS_ON}, keeping its lease and backend; restart the agent to "
            "apply the new config"
        )
        assert node.agent_running
        assert node.subnet_env()["FLANNEL_NETWORK"] == "10.5.0.0/16"
    finally:
        pair.set_config(original)
        node.agent.send_signal(signal.SIGHUP)
        wait_for(lambda: node.status(HEALTH).get("config") == "as started", what="config back")


def test_config_changed_or_deleted_while_running_is_said_once(pair: LabCluster) -> None:
    node1, node2 = pair.nodes
    original = pair.etcd.etcdctl("get", "--print-value-only", CONFIG_KEY).strip()
    routes = pair.routes(node1)
    try:
        # Raw, as a newer cloudroutes elsewhere would write it (this build has only host-gw).
        pair.etcd.etcdctl("put", CONFIG_KEY, '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
        change = (
            f"network config etcd {CONFIG_KEY} changed (Backend.Type host-gw -> vxlan); "
            f"{RUNS_ON}, keeping its lease and backend; restart the agent to apply the new config"
        )
        for node in pair.nodes:
            wait_for(lambda n=node: n.status(HEALTH).get("config") == change,
                     what=f"{node.name} to see the change")  # fmt: skip
            assert len(log_lines_with(node, change)) == 1
            metrics = node.http_get(HEALTH, "/metrics")[1]
            assert re.search(r"^cloudroutes_config_differs 1\.0$", metrics, re.M)

        pair.etcd.etcdctl("del", CONFIG_KEY)
        gone = f"network config etcd {CONFIG_KEY} was deleted; {RUNS_ON}"
        for node in pair.nodes:
            wait_for(lambda n=node: str(n.status(HEALTH).get("config")).startswith(gone),
                     what=f"{node.name} to see the deletion")  # fmt: skip
            assert len(log_lines_with(node, gone)) == 1
            assert node.agent_running
            assert node.http_get(HEALTH, "/readyz") == (200, "ok\n")
        assert pair.routes(node1) == routes
        assert pair.ping(node1, node2)
    finally:
        pair.set_config(original)
    for node in pair.nodes:
        wait_for(lambda n=node: n.status(HEALTH).get("config") == "as started",
                 what=f"{node.name} to see the config back")  # fmt: skip
        assert log_lines_with(node, "is the one this agent runs with again")


# --- probes while waiting ---------------------------------------------------------------------


def test_a_waiting_agent_is_alive_and_says_what_it_waits_for(lab1: LabCluster) -> None:
    node = lab1.nodes[0]
    lab1.start_agent(node, f"--healthz-port={HEALTH}")
    waiting = f"a network config at etcd {CONFIG_KEY}"
    wait_for(lambda: node.http_get(HEALTH, "/healthz") == (200, f"ok, waiting for {waiting}\n"),
             what="/healthz while waiting for a config")  # fmt: skip
    assert node.http_get(HEALTH, "/readyz") == (503, f"not ready: waiting for {waiting}\n")
    status = node.status(HEALTH)
    assert (status["waiting_for"], status["etcd"], status["lease"]) == (waiting, "ok", None)
    assert node.agent is not None
    node.agent.send_signal(signal.SIGHUP)
    wait_for(lambda: log_lines_with(node, f"SIGHUP: waiting for {waiting}; nothing to re-read"),
             what="the SIGHUP line of a waiting agent")  # fmt: skip
    assert node.agent_running

    lab1.set_config()
    lab1.wait_ready(node)
    wait_for(lambda: node.http_get(HEALTH, "/readyz") == (200, "ok\n"), what="ready")
    assert node.http_get(HEALTH, "/healthz") == (200, "ok\n")
    status = node.status(HEALTH)
    assert status["waiting_for"] is None
    assert status["lease"] == node.subnet.replace("/", "-")


def start_with_etcd_down(lab: LabCluster) -> LabNode:
    node = lab.nodes[0]
    lab.set_config()
    lab.etcd.stop()
    lab.start_agent(node, f"--healthz-port={HEALTH}")
    return node


def test_an_agent_waiting_for_etcd_is_alive_and_not_ready(lab1: LabCluster) -> None:
    node = start_with_etcd_down(lab1)
    waiting = f"a network config at etcd {CONFIG_KEY}"
    try:
        wait_for(lambda: node.http_get(HEALTH, "/healthz") == (200, f"ok, waiting for {waiting}\n"),
                 what="/healthz while etcd is down")  # fmt: skip
        assert node.http_get(HEALTH, "/readyz") == (503, f"not ready: waiting for {waiting}\n")
    finally:
        lab1.etcd.start()
    lab1.wait_ready(node)
    wait_for(lambda: node.http_get(HEALTH, "/readyz") == (200, "ok\n"), what="ready")
    assert node.status(HEALTH)["etcd"] == "ok"


def test_status_says_etcd_is_unreachable_while_waiting_for_the_config(lab1: LabCluster) -> None:
    node = start_with_etcd_down(lab1)
    try:
        wait_for(lambda: "cannot reach etcd" in node.status(HEALTH).get("etcd", ""), timeout=10,
                 what="/status to say etcd is unreachable")  # fmt: skip
    finally:
        lab1.etcd.start()


def test_a_ready_agent_is_unready_while_etcd_is_down(lab1: LabCluster) -> None:
    node = lab1.nodes[0]
    lab1.start(f"--healthz-port={HEALTH}")
    lab1.etcd.stop()
    try:

        def unready() -> str | None:
            code, body = node.http_get(HEALTH, "/readyz")
            return body if code == 503 else None

        body = wait_for(unready, timeout=30, what="/readyz to fail with etcd down")
        assert body.startswith("not ready: ") and "198.18.0.254" in body
        assert node.http_get(HEALTH, "/healthz") == (200, "ok\n")
        assert "cannot reach etcd at http://198.18.0.254" in node.status(HEALTH)["etcd"]
    finally:
        lab1.etcd.start()
    wait_for(lambda: node.http_get(HEALTH, "/readyz") == (200, "ok\n"), timeout=30,
             what="ready again once etcd is back")  # fmt: skip
    assert node.agent_running


# --- flanneld's interface and masquerade options -----------------------------------------------


@pytest.mark.parametrize(
    "choice",
    [
        [r"--iface-regex=^nomatch$", r"--iface-regex=^198\.18\.0\.1$"],
        ["--iface-can-reach=198.18.0.254"],
    ],
    ids=["iface-regex-twice", "iface-can-reach"],
)
def test_interface_chosen_without_iface_and_masquerade_not_fully_random(
    lab1: LabCluster, choice: list[str]
) -> None:
    node = lab1.nodes[0]
    lab1.set_config()
    lab1.start_agent(node, *choice, "--ip-masq", "--ip-masq-fully-random-disable", iface=None)
    lab1.wait_ready(node)
    assert log_lines_with(node, "using interface eth0 (198.18.0.1), public IP 198.18.0.1")
    rules = node.ns.run("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout
    assert rules.count("-j MASQUERADE") == 2, rules
    assert "--random-fully" not in rules


def test_ip_blackhole_route_reaches_the_backend(lab1: LabCluster) -> None:
    node = lab1.nodes[0]
    lab1.start("--ip-blackhole-route")
    wait_for(lambda: node.ns.ip("route", "show", "type", "blackhole", node.subnet).strip(),
             what="a blackhole route for the node's own subnet")  # fmt: skip


# --- losing etcd's data -----------------------------------------------------------------------


def test_etcd_wiped_while_agents_run_gets_every_lease_back() -> None:
    lab = LabCluster(3).build()
    try:
        lab.start("--subnet-lease-ttl=30", f"--healthz-port={HEALTH}")
        before = {n.name: fingerprint(lab, n) for n in lab.nodes}
        lab.wipe_etcd()
        assert lab.etcd.etcdctl("get", "--prefix", "--keys-only", PREFIX).strip() == ""
        lab.set_config()
        for node in lab.nodes:
            wait_for(lambda n=node: lease_value(lab, n) == before[n.name][1], timeout=60,
                     what=f"{node.name}'s lease to be back in etcd")  # fmt: skip
        assert {n.name: fingerprint(lab, n) for n in lab.nodes} == before
        assert all(n.agent_running for n in lab.nodes)
        for src in lab.nodes:
            for dst in lab.nodes:
                if src is not dst:
                    wait_for(lambda s=src, d=dst: route_to(s, d.subnet) != "", timeout=30,
                             what=f"route {src.name} -> {dst.name}")  # fmt: skip
                    assert lab.ping(src, dst), f"{src.name} -> {dst.name}\n{lab.routes(src)}"
        for node in lab.nodes:
            wait_for(lambda n=node: n.http_get(HEALTH, "/readyz") == (200, "ok\n"), what="ready")
    finally:
        lab.close()


def test_a_lease_taken_by_another_node_meanwhile_exits_1_for_a_restart() -> None:
    lab = LabCluster(2).build()
    try:
        lab.start()
        node, peer = lab.nodes
        assert node.agent is not None
        key = f"{PREFIX}/subnets/{node.subnet.replace('/', '-')}"
        route_to_peer = route_to(node, peer.subnet)
        assert route_to_peer
        # Cut the node off etcd, so that its subnet is taken before it can ask for it back.
        cut = ["OUTPUT", "-d", "198.18.0.254", "-p", "tcp", "-j", "REJECT",
               "--reject-with", "tcp-reset"]  # fmt: skip
        node.ns.run("iptables", "-I", *cut)
        lab.wipe_etcd()
        lab.set_config()
        thief = '{"PublicIP":"198.18.0.99","PublicIPv6":null,"BackendType":"host-gw"}'
        lab.etcd.etcdctl("put", key, thief)
        node.ns.run("iptables", "-D", *cut)
        assert node.agent.wait(60) == 1, node.log_tail()
        last = node.log().strip().splitlines()[-1]
        assert last.startswith(f"cloudroutes: error: cannot keep lease {key.rsplit('/', 1)[1]}: ")
        assert last.endswith("; exiting to start over")
        assert lab.etcd.etcdctl("get", "--print-value-only", key).strip() == thief
        assert route_to(node, peer.subnet) == route_to_peer  # left for the next agent to adopt
    finally:
        lab.close()


def test_status_reports_waiting_for_and_etcd_as_json(pair: LabCluster) -> None:
    code, body = pair.nodes[1].http_get(HEALTH, "/status")
    status = json.loads(body)
    assert code == 200
    assert {"etcd", "waiting_for", "passes", "config", "lease", "leases", "routes"} <= set(status)
    assert status["passes"]["kernel"] >= 1

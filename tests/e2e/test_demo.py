"""`cloudroutes demo` as `make demo` runs it: a subprocess whose output a user reads.

vxlan (the default), udp, host-gw: two pods per node, attached by the flannel CNI plugin with
addresses from their node's subnet, every pod reaches one pod on each other node, and an iperf3
figure is printed. aws-vpc, ali-vpc, gce: each node's route appears in the cloud's
route table targeting its instance (its ENI on AWS), owned by cloudroutes per its ledger (and
its marker, where the cloud has them), the cloud's own routes are shown and never claimed, and
after a node leaves, its route is gone and the others stay. Either way it exits 0 and leaves
no namespace or lab directory behind, also when interrupted.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import needs_root
from tests.wait import wait_for

pytestmark = [needs_root, pytest.mark.root, pytest.mark.etcd, pytest.mark.slow]

CLI = str(Path(sys.executable).with_name("cloudroutes"))
CLI_IN_MAKE = ".venv/bin/cloudroutes"
NODE = re.compile(
    r"^==> (node\d+) \(198\.18\.0\.\d+\): instance ([-\w]+)(?:, ENI (eni-\w+))?, "
    r"FLANNEL_SUBNET=(10\.5\.\d+)\.1/24$"
)
ROW = re.compile(r"^    (\S+)\s+(\S+)\s+(\S+)(?: \((node\d+)\))?\s+(\S+)\s+(.+)$")
LOGS = re.compile(r"\(logs: (\S+)\)")
LEAVES = re.compile(r"^==> (node\d+) leaves the cluster")
SUBNET = re.compile(r"^==> (node\d+) \(198\.18\.0\.\d+\): FLANNEL_SUBNET=(10\.5\.\d+)\.1/24 ")
POD = re.compile(r"^==>   ((node\d+)-pod\d) (10\.5\.\d+)\.(\d+) \(netns (\S+)\)$")
PING = re.compile(r"^==>   (ok  |FAIL) (node\d+-pod\d) \S+ -> (node\d+-pod\d) \S+$")
IPERF = re.compile(r"^==> iperf3 TCP node1-pod1 \S+ -> node2-pod1 \S+: (\d+\.\d+) Gbit/s over 2 s$")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Row:
    name: str
    destination: str
    target: str
    node: str | None
    state: str
    owner: str


class Demo:
    """A running `cloudroutes demo`, its output read as it comes."""

    def __init__(self, *args: str, argv: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv or [CLI, "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)
            pytest.fail(f"the demo ran longer than {timeout} s:\n{self.output}")
        self._reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def tables(self, lines: list[str]) -> list[list[Row]]:
        """Every route table the demo printed in ``lines``, in order."""
        tables: list[list[Row]] = []
        current: list[Row] | None = None
        for line in lines:
            if line.startswith("==> route table "):
                current = []
                tables.append(current)
                continue
            match = ROW.match(line) if current is not None else None
            if match is None:
                current = None
            elif match[1] != "NAME":
                assert current is not None
                current.append(Row(*match.groups()))
        return tables


def leftovers(demo: Demo) -> tuple[list[str], bool]:
    """Namespaces of this demo still there, and whether its lab directory is."""
    tag = f"{demo.proc.pid % 10000}x"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    ours = [n.split()[0] for n in names.splitlines() if n.startswith("cr") and tag in n]
    logs = LOGS.search(demo.output)
    return ours, bool(logs and Path(logs[1]).exists())


def test_make_demo_runs_the_vxlan_demo_by_default() -> None:
    result = subprocess.run(
        ["make", "-s", "-n", "-C", str(REPO), "demo"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert f"{CLI_IN_MAKE} demo --backend vxlan" in result.stdout.splitlines(), result.stdout


def test_vxlan_demo_pods_ping_across_nodes_and_measure_throughput() -> None:
    demo = Demo("--backend", "vxlan")
    assert demo.wait(120) == 0, demo.output
    subnets = dict(m.groups() for m in map(SUBNET.match, demo.lines) if m)
    assert sorted(subnets) == ["node1", "node2", "node3"], demo.output
    pods = [m.groups() for m in map(POD.match, demo.lines) if m]
    assert len(pods) == 6 and len({p[4] for p in pods}) == 6, demo.output
    for _, node, prefix, host, _ in pods:
        # Addresses from the node's own subnet, never its gateway (.1: cni0's).
        assert prefix == subnets[node] and int(host) > 1, demo.output
    pings = [m.groups() for m in map(PING.match, demo.lines) if m]
    node_of = {p[0]: p[1] for p in pods}
    assert {mark for mark, _, _ in pings} == {"ok  "}, demo.output
    for pod, node in node_of.items():
        reached = sorted(node_of[dst] for _, src, dst in pings if src == pod)
        assert reached == sorted(set(subnets) - {node}), f"{pod}:\n{demo.output}"
    rate = next((float(m[1]) for m in map(IPERF.match, demo.lines) if m), None)
    assert rate is not None and rate > 0, demo.output
    assert "flannel.1 proto 157 onlink" in demo.output
    assert "==> all pings passed" in demo.lines, demo.output
    assert leftovers(demo) == ([], False)


@pytest.mark.parametrize("backend", ["udp", "host-gw"])
def test_udp_and_host_gw_demos_pods_ping_across_nodes(backend: str) -> None:
    demo = Demo("--backend", backend)
    assert demo.wait(120) == 0, demo.output
    pings = [m[1] for m in map(PING.match, demo.lines) if m]
    assert pings == ["ok  "] * 12, demo.output
    assert any(IPERF.match(line) for line in demo.lines), demo.output
    assert "==> all pings passed" in demo.lines, demo.output
    assert leftovers(demo) == ([], False)


def test_an_interrupted_vxlan_demo_removes_its_pods() -> None:
    demo = Demo("--backend", "vxlan")
    wait_for(lambda: any(POD.match(line) for line in demo.lines), 60, "the demo's first pod")
    demo.proc.send_signal(signal.SIGINT)
    assert demo.wait(60) == 130, demo.output
    assert "==> interrupted" in demo.lines and "==> cleaning up" in demo.lines, demo.output
    assert leftovers(demo) == ([], False)


@dataclass(frozen=True)
class Cloud:
    """What a cloud's demo shows that differs from the others'."""

    backend: str
    active: str  # the state of a route that works
    cloud_owner: str  # how the owner column names a route the cloud made itself
    marked: bool  # cloudroutes' routes carry its marker (a name or a description)


AWS = Cloud("aws-vpc", "active", "AWS (", marked=False)
ALIBABA = Cloud("ali-vpc", "Available", "Alibaba (", marked=True)
GCE = Cloud("gce", "active", "GCE (", marked=True)


@pytest.mark.parametrize(
    ("cloud", "mode"),
    [(AWS, "node"), (AWS, "cluster"), (ALIBABA, "node"), (GCE, "node"), (GCE, "cluster")],
    ids=["aws-vpc-node", "aws-vpc-cluster", "ali-vpc-node", "gce-node", "gce-cluster"],
)
def test_cloud_demo_routes_each_node_to_its_instance_and_removes_a_leaving_nodes_route(
    cloud: Cloud, mode: str
) -> None:
    demo = Demo("--backend", cloud.backend, "--mode", mode)
    assert demo.wait(300) == 0, demo.output
    nodes = {m[1]: m.groups()[1:] for m in map(NODE.match, demo.lines) if m}
    assert sorted(nodes) == ["node1", "node2", "node3"], demo.output
    left = next(m[1] for m in map(LEAVES.match, demo.lines) if m)
    split = next(i for i, line in enumerate(demo.lines) if LEAVES.match(line))
    before = demo.tables(demo.lines[:split])[-1]
    after = demo.tables(demo.lines[split:])[-1]

    def routed(table: list[Row], name: str) -> Row | None:
        subnet = f"{nodes[name][2]}.0/24"
        return next((r for r in table if r.destination == subnet), None)

    for name, (instance, eni, _) in nodes.items():
        row = routed(before, name)
        assert row is not None, f"{name}'s route is missing:\n{demo.output}"
        assert (row.target, row.node, row.state) == (eni or instance, name, cloud.active)
        assert row.owner.startswith("cloudroutes (ledger"), row
        assert row.owner.endswith(", marked)") == cloud.marked, row
        if name != left:
            assert routed(after, name) == row, f"{name}'s route changed:\n{demo.output}"
    assert routed(after, left) is None, f"{left}'s route stayed:\n{demo.output}"
    # The cloud's own routes (the VPC's local route, GCE's subnet route) are shown and never
    # claimed.
    own = [r for r in after if r.owner.startswith(cloud.cloud_owner)]
    assert own and not any(r.node for r in own), demo.output
    assert "no pings here" in demo.output
    assert leftovers(demo) == ([], False)


@pytest.mark.parametrize("backend", ["aws-vpc", "ali-vpc", "gce"])
def test_an_interrupted_cloud_demo_cleans_up(backend: str) -> None:
    demo = Demo("--backend", backend)
    wait_for(
        lambda: any(line.startswith("==> route table ") for line in demo.lines),
        120,
        "the demo's first route table",
    )
    demo.proc.send_signal(signal.SIGINT)
    assert demo.wait(60) == 130, demo.output
    assert "==> interrupted" in demo.lines and "==> cleaning up" in demo.lines, demo.output
    assert leftovers(demo) == ([], False)


def test_mode_is_refused_for_a_backend_without_cloud_routes() -> None:
    result = subprocess.run(
        [CLI, "demo", "--backend", "host-gw", "--mode", "cluster"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "cloudroutes: error: --mode is an option of the cloud backends (aws-vpc, ali-vpc, gce); "
        "leave it out for host-gw"
    ], result.stderr
    assert "==> building" not in result.stdout

"""`cloudroutes demo` as `make demo` runs it: a subprocess whose output a user reads.

host-gw: every ping passes. aws-vpc: each node's route appears in the VPC route table
targeting its ENI, and after a node leaves, its route is gone and the others stay. Either way
it exits 0 and leaves no namespace or lab directory behind, also when interrupted.
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
NODE = re.compile(
    r"^==> (node\d+) \(198\.18\.0\.\d+\): instance (i-\w+), ENI (eni-\w+), "
    r"FLANNEL_SUBNET=(10\.5\.\d+)\.1/24$"
)
ROW = re.compile(r"^    (\S+)\s+(\S+)(?: \((node\d+)\))?\s+(\S+)\s+(.+)$")
LOGS = re.compile(r"\(logs: (\S+)\)")
LEAVES = re.compile(r"^==> (node\d+) leaves the cluster")


@dataclass(frozen=True)
class Row:
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
            elif match[1] != "DESTINATION":
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


def test_host_gw_demo_pings_every_node_and_cleans_up() -> None:
    demo = Demo()
    assert demo.wait(180) == 0, demo.output
    assert "==> all pings passed" in demo.lines, demo.output
    assert not any("FAIL" in line for line in demo.lines), demo.output
    assert leftovers(demo) == ([], False)


CLUSTER_MODE = [CLI, "demo", "--backend", "aws-vpc", "--mode", "cluster"]


@pytest.mark.parametrize(
    "argv", [[CLI, "demo", "--backend", "aws-vpc"], CLUSTER_MODE], ids=["node-mode", "cluster-mode"]
)
def test_aws_vpc_demo_routes_each_node_to_its_eni_and_removes_a_leaving_nodes_route(
    argv: list[str],
) -> None:
    demo = Demo(argv=argv)
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

    for name, (_, eni, _) in nodes.items():
        row = routed(before, name)
        assert row is not None, f"{name}'s route is missing:\n{demo.output}"
        assert (row.target, row.node, row.state) == (eni, name, "active")
        assert row.owner.startswith("cloudroutes (ledger"), row
        if name != left:
            assert routed(after, name) == row, f"{name}'s route changed:\n{demo.output}"
    assert routed(after, left) is None, f"{left}'s route stayed:\n{demo.output}"
    # The VPC's own route is shown and never claimed.
    local = next(r for r in after if r.target == "local")
    assert not local.owner.startswith("cloudroutes")
    assert "no pings here" in demo.output
    assert leftovers(demo) == ([], False)


def test_an_interrupted_aws_vpc_demo_cleans_up() -> None:
    demo = Demo("--backend", "aws-vpc")
    wait_for(
        lambda: any(line.startswith("==> route table ") for line in demo.lines),
        120,
        "the demo's first route table",
    )
    demo.proc.send_signal(signal.SIGINT)
    assert demo.wait(60) == 130, demo.output
    assert "==> interrupted" in demo.lines and "==> cleaning up" in demo.lines, demo.output
    assert leftovers(demo) == ([], False)

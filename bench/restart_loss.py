"""Packets lost while the agents restart: a 1 ms ping flood from node1's gateway to node2's,
over a vxlan and a host-gw cluster of real agents (cloudroutes.lab), while both agents are killed
with SIGKILL and started again; against the same flood with no restart, in the same run.

A restart is over when each new agent has finished its first reconcile pass (its /status), a
whole resync of its table; the flood must outlast that and runs on after it (in full mode past
the agents' next periodic pass too). The flood is a fixed count of packets, so that ping waits
for the last replies and an unanswered packet is a lost one; when the restart outlasts the
flood, the round is run again with a longer flood. Target: 0.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

from bench import Figure
from cloudroutes.lab.cluster import LabCluster, LabNode
from tests.wait import wait_for

HEALTH = 9303
INTERVAL = 0.001  # seconds between echo requests (below 0.2 needs root)
SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


def passes(node: LabNode) -> int:
    return int(node.status(HEALTH).get("passes", {}).get("kernel", 0))


def flood(src: LabNode, dst: LabNode, count: int) -> subprocess.Popen[str]:
    return src.ns.popen(
        ["ping", "-q", "-i", str(INTERVAL), "-c", str(count), "-W", "1",
         "-I", src.gateway, dst.gateway],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # type: ignore[return-value]  # fmt: skip


def lost(ping: subprocess.Popen[str]) -> int:
    output, _ = ping.communicate(timeout=120)
    match = SUMMARY.search(output)
    if match is None:
        raise RuntimeError(f"ping gave no summary: {output.strip()[-300:]}")
    return int(match[1]) - int(match[2])


def restart_agents(lab: LabCluster) -> None:
    for node in lab.nodes:
        lab.stop_agent(node, kill=True)
    for node in lab.nodes:
        lab.start_agent(node, *node.agent_args)
    for node in lab.nodes:
        wait_for(lambda n=node: passes(n) >= 1, 60, f"the first pass of {node.name}'s new agent")


def measure(lab: LabCluster, count: int) -> tuple[int, int]:
    """(lost with a restart, lost without one) for floods of ``count`` packets."""
    node1, node2 = lab.nodes
    while True:
        ping = flood(node1, node2, count)
        try:
            restart_agents(lab)
            outlasted = ping.poll() is not None
            with_restart = lost(ping)
        finally:
            if ping.poll() is None:
                ping.kill()
                ping.wait()
        if not outlasted:
            break
        count *= 2  # the flood was over before the agents were: not a measurement
    return with_restart, lost(flood(node1, node2, count))


def run(short: bool = False) -> Iterator[Figure]:
    count = 3000 if short else 25000
    for backend in ("vxlan", "host-gw"):
        lab = LabCluster(2, backend=backend).build()
        try:
            lab.start(f"--healthz-port={HEALTH}")
            if not lab.ping(*lab.nodes):
                raise RuntimeError(f"{backend}: the nodes do not reach each other")
            for node in lab.nodes:
                wait_for(lambda n=node: passes(n) >= 1, 30, f"{node.name}'s first pass")
            with_restart, without = measure(lab, count)
        finally:
            lab.close()
        # The baseline is in the name too: a Figure shows its baseline only when it is not 0.
        yield Figure(
            f"packets lost in a 1 ms ping flood while both agents restart (kill -9), {backend}"
            f" (target 0; {without} lost with no restart)",
            with_restart,
            "packets",
            without,
            "the same flood, no restart",
        )

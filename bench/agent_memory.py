"""Agent memory: the peak resident set of the agent holding N peer leases and their routes,
against the same agent with no peer lease, in the same run.

A real agent runs in a node namespace against a real etcd (bench/_agent_lab.py); the peak is
VmHWM in /proc/<pid>/status of the agent's own process (``ip netns exec`` execs it, so the
pid we started is the agent's). N leases are reached two ways: arriving through the watch of a
running agent, and listed by an agent cold-started with them already in etcd. In the full run
each reading also waits for the periodic resync pass (every 10 s), which reads the whole table
back, so its allocations are in the peak too.
"""

from __future__ import annotations

from collections.abc import Iterator

from bench import Figure
from bench._agent_lab import PASSES, AgentLab, passes, peers, proc_status, programmed

BASELINE = "same agent, 0 peer leases"


def peak_mib(lab: AgentLab, resync: bool) -> float:
    if resync:
        done = lab.metrics()[PASSES]
        lab.metrics_when(passes(done + 1), timeout=20)
    return proc_status(lab.agent_pid)["VmHWM"] / 1024


def measure(n: int, resync: bool) -> Iterator[Figure]:
    with AgentLab() as lab:
        lab.start_agent()
        lab.wait_ready()
        lab.metrics_when(passes(1))
        idle = peak_mib(lab, resync)

        lab.etcd.put_leases(peers(0, n))
        lab.routes.wait_count(n)
        lab.metrics_when(programmed(n))
        watched = peak_mib(lab, resync)

        lab.stop_agent()
        lab.flush_routes()
        lab.start_agent()
        lab.routes.wait_count(n)
        lab.metrics_when(programmed(n))
        cold = peak_mib(lab, resync)

    for how, peak in (("arriving by watch", watched), ("listed at a cold start", cold)):
        per_lease = (peak - idle) * 1024 / n
        yield Figure(
            f"agent peak RSS, {n} leases {how} (+{per_lease:.1f} KiB a lease)",
            peak,
            "MiB",
            baseline=idle,
            baseline_name=BASELINE,
        )


def run(short: bool = False) -> Iterator[Figure]:
    yield from measure(1000 if short else 10000, resync=not short)

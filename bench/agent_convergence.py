"""Agent convergence: peer leases in etcd → host-gw routes in the node's kernel.

A real agent runs in a node namespace against a real etcd (bench/_agent_lab.py). Every figure
is set against ``ip -batch`` adding the same routes into a fresh namespace in the same run
(best of 3):

(a) watching: the agent is up and watching; the leases are written to etcd in transactions of
    128 puts. Timed from the first write to the last route in the kernel. Shown with it: the
    writing alone, and the time the agent spent in reconcile passes meanwhile.
(b) cold start: the leases are in etcd and the node has none of their routes. Timed from the
    agent's process being made to the last route in the kernel: interpreter start, imports,
    config, acquiring its own lease, listing the leases and the first pass.
(c) the reconcile stage alone: the agent's own ``cloudroutes_reconcile_duration_seconds`` of
    the cold start's first pass, which programs every route at once (the agent lists the
    leases before its reconciler starts).

The issue's target is at most 2x ip -batch at 10,000 leases.
"""

from __future__ import annotations

from collections.abc import Iterator

from bench import Figure
from bench._agent_lab import PASS_SECONDS, PASSES, AgentLab, passes, peers, programmed

IP_BATCH = "ip -batch"


def measure(n: int) -> Iterator[Figure]:
    leases = peers(0, n)
    with AgentLab() as lab:
        ip_batch = lab.ip_batch(leases)

        def figure(name: str, value: float) -> Figure:
            return Figure(f"{n} leases, {name}", value, baseline=ip_batch, baseline_name=IP_BATCH)

        lab.start_agent()
        lab.wait_ready()
        # After the agent's first pass (no peers yet), so the passes counted below are the
        # ones that programmed the routes.
        before = lab.metrics_when(passes(1))
        started, written = lab.etcd.put_leases(leases)
        converged = lab.routes.wait_count(n)
        after = lab.metrics_when(programmed(n))
        yield figure(
            "(a) written to etcd -> all routes in kernel, agent watching", converged - started
        )
        yield figure("    writing them to etcd alone (txns of 128 puts)", written - started)
        yield figure(
            f"    time in reconcile passes meanwhile ({after[PASSES] - before[PASSES]:.0f} passes)",
            after[PASS_SECONDS] - before[PASS_SECONDS],
        )

        lab.stop_agent()
        lab.flush_routes()
        started = lab.start_agent()
        converged = lab.routes.wait_count(n)
        cold = lab.metrics_when(programmed(n))
        yield figure(
            "(b) cold start: agent process made -> all routes in kernel", converged - started
        )
        acquired = lab.logged_after_start("acquired lease")
        listed = lab.logged_after_start("listed")
        yield figure("    start -> own lease acquired (agent log)", acquired)
        yield figure("    acquired -> leases listed (agent log)", listed - acquired)
        # The first pass programs everything; a later one (a wake-up with nothing to do) would
        # only add a little, and is named in the figure when there is one.
        count = cold[PASSES]
        yield figure(
            "(c) reconcile pass that programmed them (agent's own metric)"
            + ("" if count == 1 else f", summed over {count:.0f} passes"),
            cold[PASS_SECONDS],
        )


def run(short: bool = False) -> Iterator[Figure]:
    for n in (1000,) if short else (1000, 10000):
        yield from measure(n)

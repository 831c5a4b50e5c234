"""Agent latency: one lease put in etcd → its host-gw route in the node's kernel, and one lease
deleted → its route gone; p50 and p99 over changes made one at a time.

A real agent runs in a node namespace against a real etcd (bench/_agent_lab.py). Each change
waits for its route (seen through rtnetlink events, not by polling) and then a short gap, so
the pass that made it has finished before the next change. The changes are made on top of a
background of leases already routed, because a per-change cost that grows with the number of
leases shows up only there.

Baselines, in the same run: a bare pyetcd watcher in the node's namespace seeing the same kind
of put or delete (etcd and its watch alone: the floor the agent cannot beat), and ``ip route
add`` of one route as a process, into a spare namespace. The target is p99 under 100 ms.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Sequence

from bench import Figure
from bench._agent_lab import (
    LEASE_TTL,
    PASS_SECONDS,
    PASSES,
    AgentLab,
    PeerLease,
    peers,
    percentile,
    programmed,
)
from providers.kernel import RTPROT_CLOUDROUTES

FLOOR_PREFIX = "/bench/floor/"
# After each change: time for the pass that made it to finish (it records status and metrics
# after writing the route), so every sample starts with an idle agent.
GAP = 0.05
IP_ROUTE_ADD = "`ip route add` as a process, p50"


def timed_changes(
    count: int, change: Callable[[int], float], seen: Callable[[int], float], gap: float = GAP
) -> list[float]:
    """``count`` changes, one at a time: ``change(i)`` returns when it started, ``seen(i)``
    blocks until it took effect and returns when it did."""
    samples = []
    for i in range(count):
        started = change(i)
        samples.append(seen(i) - started)
        time.sleep(gap)
    return samples


def floor(lab: AgentLab, count: int) -> tuple[list[float], list[float]]:
    """Put then delete ``count`` keys, seen by a bare watcher in the node's namespace."""
    watcher = lab.watcher(FLOOR_PREFIX)
    ids = lab.etcd.call("grant", count=count, ttl=LEASE_TTL)["ids"]
    value = PeerLease(0).value
    puts = timed_changes(
        count,
        lambda i: lab.etcd.call("put", key=f"{FLOOR_PREFIX}{i}", value=value, lease=ids[i])[
            "start"
        ],
        lambda i: watcher.wait(f"{FLOOR_PREFIX}{i}"),
        gap=0,
    )
    watcher.close()
    # A second watcher, so each key's first event seen is its delete.
    watcher = lab.watcher(FLOOR_PREFIX)
    deletes = timed_changes(
        count,
        lambda i: lab.etcd.call("delete", key=f"{FLOOR_PREFIX}{i}")["start"],
        lambda i: watcher.wait(f"{FLOOR_PREFIX}{i}"),
        gap=0,
    )
    watcher.close()
    return puts, deletes


def ip_route_add(lab: AgentLab, leases: Sequence[PeerLease]) -> list[float]:
    """``ip route add`` of each lease's route as a process, into a spare namespace (not the
    agent's: it would take routes of its protocol there for its own)."""
    spare = lab.add_node().ns.name
    samples = []
    for p in leases:
        route = p.route
        cmd = ["ip", "-n", spare, "route", "add", str(route.destination), "via", route.next_hop]
        cmd += ["dev", "eth0", "proto", str(RTPROT_CLOUDROUTES)]
        started = time.monotonic()
        subprocess.run(cmd, check=True)
        samples.append(time.monotonic() - started)
    return samples


def measure(background: int, count: int) -> Iterator[Figure]:
    with AgentLab() as lab:
        lab.start_agent()
        lab.wait_ready()
        if background:
            lab.etcd.put_leases(peers(0, background))
            lab.routes.wait_count(background)
        floor_puts, floor_deletes = floor(lab, count)
        changes = peers(background, count)
        ip_add = ip_route_add(lab, changes)
        ids = lab.etcd.call("grant", count=count, ttl=LEASE_TTL)["ids"]
        before = lab.metrics_when(programmed(background))
        adds = timed_changes(
            count,
            lambda i: lab.etcd.call(
                "put", key=changes[i].key, value=changes[i].value, lease=ids[i]
            )["start"],
            lambda i: lab.routes.wait_present(changes[i].dest),
        )
        deletes = timed_changes(
            count,
            lambda i: lab.etcd.call("delete", key=changes[i].key)["start"],
            lambda i: lab.routes.wait_absent(changes[i].dest),
        )
        time.sleep(GAP)
        after = lab.metrics()

    where = f"{count} changes over {background} leases"

    def figure(name: str, value: float, baseline: float, baseline_name: str) -> Figure:
        return Figure(f"{name} ({where})", value, baseline=baseline, baseline_name=baseline_name)

    for verb, effect, samples, floor_samples in (
        ("put", "route in kernel", adds, floor_puts),
        ("delete", "route gone", deletes, floor_deletes),
    ):
        for p in (50, 99):
            yield figure(
                f"lease {verb} -> {effect}, p{p}",
                percentile(samples, p),
                percentile(floor_samples, p),
                f"bare etcd watcher sees a {verb}, p{p}",
            )
    ip_p50 = percentile(ip_add, 50)
    yield figure("lease put -> route in kernel, p50", percentile(adds, 50), ip_p50, IP_ROUTE_ADD)
    passes = after[PASSES] - before[PASSES]
    yield figure(
        f"agent's mean reconcile pass meanwhile ({passes:.0f} passes)",
        (after[PASS_SECONDS] - before[PASS_SECONDS]) / passes,
        ip_p50,
        IP_ROUTE_ADD,
    )


def run(short: bool = False) -> Iterator[Figure]:
    if short:
        yield from measure(1000, 50)
        return
    for background in (0, 1000, 10000):
        yield from measure(background, 200)

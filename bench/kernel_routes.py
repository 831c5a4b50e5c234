"""Kernel route convergence: KernelRouteTable against iproute2, in the same run.

Each round gets a fresh namespace with a veth to a peer on 198.18.0.0/24. Timed: converging N
routes into it (a new table object and its first apply, against ``ip -batch`` adding the same
routes), reading them back (observe(), against ``ip route show proto 157`` and pyroute2's dump)
and deleting them (against ``ip -batch``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Network

from pyroute2 import IPRoute

from bench import Figure, Rounds, best_of
from cloudroutes.lab.netns import Netns, link_veth, unique_name
from cloudroutes.routes import Action, Change, Plan, Route
from providers.kernel import RTPROT_CLOUDROUTES, KernelRouteTable

PROTO = str(RTPROT_CLOUDROUTES)
REPEAT = 3


class Node:
    """A namespace with eth0 on 198.18.0.1/24, cabled to a peer namespace."""

    def __init__(self) -> None:
        self.ns = Netns(unique_name("bk"))
        self.peer = Netns(unique_name("bp"))
        link_veth(self.ns, "eth0", self.peer, "eth0")
        self.ns.ip("addr", "add", "198.18.0.1/24", "dev", "eth0")
        self.peer.ip("addr", "add", "198.18.0.2/24", "dev", "eth0")

    def ip_batch(self, commands: str) -> None:
        # `ip -n` joins the namespace itself, without the extra process of `ip netns exec`.
        subprocess.run(
            ["ip", "-n", self.ns.name, "-batch", "-"], input=commands, text=True, check=True
        )

    def ip_show(self) -> None:
        subprocess.run(
            ["ip", "-n", self.ns.name, "route", "show", "proto", PROTO],
            check=True,
            capture_output=True,
        )

    def delete(self) -> None:
        self.ns.delete()
        self.peer.delete()


def routes(n: int) -> list[Route]:
    return [Route(IPv4Network(((10 << 24) + (i << 8), 24)), "198.18.0.2", "eth0") for i in range(n)]


def plan(action: Action, rs: list[Route]) -> Plan:
    return Plan(tuple(Change(action, r, r if action is Action.DELETE else None) for r in rs))


def script(verb: str, rs: list[Route]) -> str:
    return "".join(
        f"route {verb} {r.destination} via {r.next_hop} dev eth0 proto {PROTO}\n" for r in rs
    )


def measure(n: int) -> Iterator[Figure]:
    rs = routes(n)
    adds, deletes = plan(Action.ADD, rs), plan(Action.DELETE, rs)
    add_script, del_script = script("add", rs), script("del", rs)
    refill_script = script("replace", rs)
    rounds = Rounds(Node)
    try:

        def ours_converge() -> None:
            assert rounds.node is not None
            outcomes = KernelRouteTable(netns=rounds.node.ns.name).apply(adds)
            assert all(o.ok for o in outcomes), "bench routes were refused"

        ip_add = best_of(REPEAT, lambda: rounds.node.ip_batch(add_script), rounds.fresh)  # type: ignore[union-attr]
        ours_add = best_of(REPEAT, ours_converge, rounds.fresh)
        yield Figure(
            f"converge {n} routes (new table, apply)",
            ours_add,
            baseline=ip_add,
            baseline_name="ip -batch",
        )

        # The last node holds the routes now.
        node = rounds.node
        assert node is not None
        table = KernelRouteTable(netns=node.ns.name)
        observed = best_of(REPEAT, table.observe)
        assert len(table.observe().owned) == n
        yield Figure(
            f"observe {n} routes",
            observed,
            baseline=best_of(REPEAT, node.ip_show),
            baseline_name=f"ip route show proto {PROTO}",
        )

        with IPRoute(netns=node.ns.name) as ipr:
            full_parse = best_of(REPEAT, lambda: list(ipr.route("dump", proto=RTPROT_CLOUDROUTES)))
        yield Figure(
            f"observe {n} routes",
            observed,
            baseline=full_parse,
            baseline_name="pyroute2 IPRoute.route('dump')",
        )

        def refill() -> None:
            node.ip_batch(refill_script)

        ip_del = best_of(REPEAT, lambda: node.ip_batch(del_script), refill)
        ours_del = best_of(REPEAT, lambda: table.apply(deletes), refill)
        yield Figure(
            f"delete {n} routes (apply)", ours_del, baseline=ip_del, baseline_name="ip -batch"
        )
    finally:
        rounds.close()


def run(short: bool = False) -> Iterator[Figure]:
    for n in (200, 1000) if short else (1000, 10000):
        yield from measure(n)

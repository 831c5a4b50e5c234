"""KernelRouteTable against the real kernel, in namespaces this test makes.

The node under test is a namespace whose eth0 (198.18.0.1/24, 2001:2::1/64) is a veth to a
peer namespace (198.18.0.2, 2001:2::2). What the tests check is what an operator would see:
the routes in ``ip route`` and the error messages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import pytest

from cloudroutes.errors import Rejected, RouteConflict, RouteNotFound
from cloudroutes.lab.netns import Netns, link_veth
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.lease_table import LeaseTable
from cloudroutes.plan import make_plan
from cloudroutes.reconciler import Reconciler, RouteState
from cloudroutes.routes import Action, Change, Outcome, Plan, Route
from providers.host_gw import OFFLINK_HINT, peer_routes
from providers.kernel import RTPROT_CLOUDROUTES, KernelRouteTable
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]

PROTO = str(RTPROT_CLOUDROUTES)


@dataclass
class Node:
    ns: Netns
    peer: Netns

    def routes(self, *selector: str, family: str = "-4") -> list[str]:
        """``ip route show`` lines, whitespace normalised."""
        text = self.ns.ip(family, "route", "show", *selector)
        return [" ".join(line.split()) for line in text.splitlines() if line.strip()]

    def ours(self, family: str = "-4") -> list[str]:
        """Our routes as ``ip route`` prints them: the protocol number shows who owns them."""
        return [line for line in self.routes(family=family) if f" proto {PROTO}" in line]

    def table(self, **kwargs: object) -> KernelRouteTable:
        return KernelRouteTable(netns=self.ns.name, offlink_hint=OFFLINK_HINT, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def node(netns: Callable[[str], Netns]) -> Node:
    ns, peer = netns("kt"), netns("kp")
    link_veth(ns, "eth0", peer, "eth0")
    ns.ip("addr", "add", "198.18.0.1/24", "dev", "eth0")
    peer.ip("addr", "add", "198.18.0.2/24", "dev", "eth0")
    ns.ip("-6", "addr", "add", "2001:2::1/64", "dev", "eth0", "nodad")
    peer.ip("-6", "addr", "add", "2001:2::2/64", "dev", "eth0", "nodad")
    return Node(ns, peer)


def route(destination: str, next_hop: str = "198.18.0.2", **kwargs: object) -> Route:
    return Route(ip_network(destination), next_hop, device="eth0", **kwargs)  # type: ignore[arg-type]


def adds(*routes: Route) -> Plan:
    return Plan(tuple(Change(Action.ADD, r) for r in routes))


def diff(want: list[Route], table: KernelRouteTable) -> Plan:
    """The plan from what the table holds now to ``want``."""
    seen = table.observe()
    return make_plan({r.key: r for r in want}, seen.owned, seen.foreign).plan


def errors(outcomes: list[Outcome]) -> dict[str, Exception | None]:
    return {str(o.change.key): o.error for o in outcomes}


def test_added_routes_carry_our_protocol(node: Node) -> None:
    table = node.table()
    outcomes = table.apply(adds(route("10.5.1.0/24"), route("10.5.2.0/24", "198.18.0.3")))

    assert all(o.ok for o in outcomes)
    assert node.ours() == [
        f"10.5.1.0/24 via 198.18.0.2 dev eth0 proto {PROTO}",
        f"10.5.2.0/24 via 198.18.0.3 dev eth0 proto {PROTO}",
    ]
    assert table.observe().entries() == {route("10.5.1.0/24"), route("10.5.2.0/24", "198.18.0.3")}


def test_foreign_routes_are_never_touched(node: Node) -> None:
    node.ns.ip("route", "add", "10.99.0.0/24", "via", "198.18.0.9", "proto", "static")
    node.ns.ip("route", "add", "10.5.2.0/24", "via", "198.18.0.7")  # proto boot, where we want one
    table = node.table()
    assert table.observe().entries() == set()

    want = [route("10.5.1.0/24"), route("10.5.2.0/24")]
    seen = table.observe()
    planned = make_plan({r.key: r for r in want}, seen.owned, seen.foreign)
    # The plan leaves the foreign destination alone and reports who holds it.
    assert [str(c) for c in planned.plan] == ["add 10.5.1.0/24 via 198.18.0.2 dev eth0"]
    assert planned.conflicts[ip_network("10.5.2.0/24")].holder == (
        "a route cloudroutes does not own (10.5.2.0/24 via 198.18.0.7 dev eth0 proto boot)"
    )
    # A table that did not know (an incremental pass) is refused by the kernel, and says so.
    outcomes = table.apply(adds(*want))

    conflict = errors(outcomes)["10.5.2.0/24"]
    assert isinstance(conflict, RouteConflict)
    assert str(conflict) == (
        "10.5.2.0/24 is held by a route cloudroutes does not own "
        "(10.5.2.0/24 via 198.18.0.7 dev eth0 proto boot); if this subnet belongs to the pod "
        "network, delete it: ip route del 10.5.2.0/24"
    )
    assert errors(outcomes)["10.5.1.0/24"] is None
    assert table.observe().entries() == {route("10.5.1.0/24")}

    # Converging to "nothing" removes only ours.
    outcomes = table.apply(diff([], table))
    assert all(o.ok for o in outcomes)
    assert node.ours() == []
    assert "10.99.0.0/24 via 198.18.0.9 dev eth0 proto static" in node.routes()
    assert "10.5.2.0/24 via 198.18.0.7 dev eth0" in node.routes()


def test_delete_never_reaches_a_foreign_route_at_the_same_destination(node: Node) -> None:
    node.ns.ip("route", "add", "10.5.3.0/24", "via", "198.18.0.7", "proto", "static")
    table = node.table()

    mine = route("10.5.3.0/24", "198.18.0.7")
    outcomes = table.apply(Plan((Change(Action.DELETE, mine, current=mine),)))

    assert isinstance(outcomes[0].error, RouteNotFound)
    assert node.routes("10.5.3.0/24") == ["10.5.3.0/24 via 198.18.0.7 dev eth0 proto static"]


def test_replace_changes_the_gateway(node: Node) -> None:
    table = node.table()
    old = route("10.5.1.0/24")
    table.apply(adds(old))

    new = route("10.5.1.0/24", "198.18.0.3")
    outcomes = table.apply(diff([new], table))

    assert [(o.change.action, o.ok) for o in outcomes] == [(Action.REPLACE, True)]
    assert node.ours() == [f"10.5.1.0/24 via 198.18.0.3 dev eth0 proto {PROTO}"]


def test_add_over_a_stale_route_of_ours_replaces_it(node: Node) -> None:
    table = node.table()
    table.apply(adds(route("10.5.1.0/24")))

    # A plan made from an out-of-date picture: the reconciler thinks nothing is there.
    outcomes = table.apply(adds(route("10.5.1.0/24", "198.18.0.3")))

    assert outcomes[0].ok
    assert node.ours() == [f"10.5.1.0/24 via 198.18.0.3 dev eth0 proto {PROTO}"]


def test_delete_of_a_missing_route_is_not_found(node: Node) -> None:
    gone = route("10.5.9.0/24")
    outcomes = node.table().apply(Plan((Change(Action.DELETE, gone, current=gone),)))

    assert isinstance(outcomes[0].error, RouteNotFound)


def test_off_link_next_hop_is_rejected_and_the_rest_still_lands(node: Node) -> None:
    table = node.table()
    plan = adds(route("10.5.1.0/24"), route("10.5.5.0/24", "198.18.5.9"), route("10.5.6.0/24"))

    outcomes = table.apply(plan)

    rejected = errors(outcomes)["10.5.5.0/24"]
    assert isinstance(rejected, Rejected)
    assert str(rejected).startswith(
        "10.5.5.0/24: next hop 198.18.5.9 is not on-link on eth0: "
        "host-gw needs every node in one L2 segment (or use vxlan)"
    )
    assert [str(o.change.key) for o in outcomes if o.ok] == [
        "10.5.1.0/24",
        "10.5.6.0/24",
    ]
    assert node.ours() == [
        f"10.5.1.0/24 via 198.18.0.2 dev eth0 proto {PROTO}",
        f"10.5.6.0/24 via 198.18.0.2 dev eth0 proto {PROTO}",
    ]


def test_onlink_and_device_routes(node: Node) -> None:
    table = node.table()
    onlink = route("10.5.7.0/24", "198.18.5.9", onlink=True)
    on_device = route("10.5.8.0/24", "")

    outcomes = table.apply(adds(onlink, on_device))

    assert all(o.ok for o in outcomes)
    assert node.ours() == [
        f"10.5.7.0/24 via 198.18.5.9 dev eth0 proto {PROTO} onlink",
        f"10.5.8.0/24 dev eth0 proto {PROTO} scope link",
    ]
    assert table.observe().entries() == {onlink, on_device}


def test_a_new_table_object_adopts_what_is_there(node: Node) -> None:
    want = [route("10.5.1.0/24"), route("10.5.2.0/24"), route("2001:2:0:5::/64", "2001:2::2")]
    first = node.table()
    first.apply(diff(want, first))
    first.close()

    restarted = node.table()

    assert restarted.observe().entries() == set(want)
    assert not diff(want, restarted)


def test_ipv6_routes(node: Node) -> None:
    node.ns.ip("-6", "route", "add", "2001:2:0:9::/64", "via", "2001:2::9", "proto", "static")
    table = node.table()
    want = [
        route("2001:2:0:5::/64", "2001:2::2"),
        route("2001:2:0:6::/64", "2001:2:7::1"),  # off-link
        route("2001:2:0:9::/64", "2001:2::2"),  # held by the operator
    ]

    outcomes = errors(table.apply(diff(want, table)))

    assert outcomes["2001:2:0:5::/64"] is None
    assert isinstance(outcomes["2001:2:0:6::/64"], Rejected)
    assert "next hop 2001:2:7::1 is not on-link on eth0" in str(outcomes["2001:2:0:6::/64"])
    assert isinstance(outcomes["2001:2:0:9::/64"], RouteConflict)
    assert "ip -6 route del 2001:2:0:9::/64" in str(outcomes["2001:2:0:9::/64"])
    assert table.observe().entries() == {want[0]}
    assert node.ours("-6") == [
        f"2001:2:0:5::/64 via 2001:2::2 dev eth0 proto {PROTO} metric 1024 pref medium"
    ]

    table.apply(diff([route("2001:2:0:5::/64", "2001:2::3")], table))
    assert table.observe().entries() == {route("2001:2:0:5::/64", "2001:2::3")}

    assert all(o.ok for o in table.apply(diff([], table)))
    assert node.ours("-6") == []
    assert node.routes("2001:2:0:9::/64", family="-6") == [
        "2001:2:0:9::/64 via 2001:2::9 dev eth0 proto static metric 1024 pref medium"
    ]


def test_five_thousand_routes_in_one_plan(node: Node) -> None:
    table = node.table()
    want = [route(f"10.{20 + i // 256}.{i % 256}.0/24") for i in range(5000)]

    outcomes = table.apply(diff(want, table))

    assert all(o.ok for o in outcomes)
    assert len(node.ours()) == 5000
    assert table.observe().entries() == set(want)

    outcomes = table.apply(diff([], table))

    assert len(outcomes) == 5000
    assert all(o.ok for o in outcomes)
    assert node.ours() == []


def lease(subnet: str, public_ip: str, ipv6: tuple[str, str] | None = None) -> Lease:
    return Lease(
        IPv4Network(subnet),
        LeaseAttrs(
            IPv4Address(public_ip),
            IPv6Address(ipv6[1]) if ipv6 else None,
            backend_type="host-gw",
        ),
        ipv6_subnet=IPv6Network(ipv6[0]) if ipv6 else None,
    )


OWN = lease("10.5.1.0/24", "198.18.0.1", ("2001:2:0:1::/64", "2001:2::1"))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def running(node: Node) -> Iterator[tuple[LeaseTable, Reconciler]]:
    """A reconciler and the drift monitor driving the node's table, in threads."""
    # No periodic resync within the test: only the drift monitor can bring a route back.
    table = node.table(resync_period=3600.0)
    leases = LeaseTable()
    leases.replace_all([OWN], revision=1)
    reconciler = Reconciler(
        table, leases, lambda one: peer_routes(one, "eth0") if one.key != OWN.key else []
    )
    stop = threading.Event()
    threads = [
        threading.Thread(target=reconciler.run, args=(stop,), daemon=True),
        threading.Thread(target=table.watch_drift, args=(reconciler.invalidate, stop), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        yield leases, reconciler
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        assert not any(t.is_alive() for t in threads), "the reconciler or the monitor hung"
        table.close()


def test_drift_monitor_brings_back_a_route_deleted_by_hand(
    node: Node, running: tuple[LeaseTable, Reconciler]
) -> None:
    leases, reconciler = running
    peer = lease("10.5.2.0/24", "198.18.0.2", ("2001:2:0:2::/64", "2001:2::2"))
    leases.replace_all([OWN, peer], revision=2)
    v4 = f"10.5.2.0/24 via 198.18.0.2 dev eth0 proto {PROTO}"
    v6 = f"2001:2:0:2::/64 via 2001:2::2 dev eth0 proto {PROTO} metric 1024 pref medium"
    wait_for(lambda: node.ours() == [v4], "the peer's route")
    wait_for(lambda: node.ours("-6") == [v6], "the peer's IPv6 route")

    node.ns.ip("route", "del", "10.5.2.0/24")
    wait_for(lambda: node.ours() == [v4], "the route to come back")

    node.ns.ip(
        "route", "replace", "10.5.2.0/24", "via", "198.18.0.9", "dev", "eth0", "proto", PROTO
    )
    wait_for(lambda: node.ours() == [v4], "our route to be put right")

    # An operator's own route there is theirs: left alone, until they delete it.
    node.ns.ip("route", "replace", "10.5.2.0/24", "via", "198.18.0.9", "dev", "eth0")
    wait_for(
        lambda: reconciler.status()[IPv4Network("10.5.2.0/24")].state is RouteState.FAILED,
        "the reconciler to report the conflict",
    )
    assert "is held by a route cloudroutes does not own" in (
        reconciler.status()[IPv4Network("10.5.2.0/24")].reason
    )
    assert node.routes("10.5.2.0/24") == ["10.5.2.0/24 via 198.18.0.9 dev eth0"]
    node.ns.ip("route", "del", "10.5.2.0/24")
    wait_for(lambda: node.ours() == [v4], "our route to take the freed destination")

    node.ns.ip("-6", "route", "del", "2001:2:0:2::/64")
    wait_for(lambda: node.ours("-6") == [v6], "the IPv6 route to come back")


def test_drift_monitor_repairs_after_the_link_comes_back(
    node: Node, running: tuple[LeaseTable, Reconciler]
) -> None:
    leases, _reconciler = running
    leases.replace_all([OWN, lease("10.5.2.0/24", "198.18.0.2")], revision=2)
    v4 = f"10.5.2.0/24 via 198.18.0.2 dev eth0 proto {PROTO}"
    wait_for(lambda: node.ours() == [v4], "the peer's route")

    # Taking the link down flushes its IPv4 routes without any route event.
    node.ns.ip("link", "set", "eth0", "down")
    wait_for(lambda: node.ours() == [], "the kernel to flush the route")
    node.ns.ip("link", "set", "eth0", "up")

    wait_for(lambda: node.ours() == [v4], "the route to come back")


def test_watch_drift_returns_when_stopped(node: Node) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=node.table().watch_drift, args=(lambda: None, stop))
    thread.start()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()

"""The vxlan backend's device and route table against the real kernel, in namespaces.

The node under test is a namespace whose eth0 (198.18.0.1/24) is a veth to a peer namespace.
What the tests check is what an operator would see: ``ip neigh``, ``bridge fdb``, ``ip route``,
``ip -d link`` and the log.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from cloudroutes.backend import BackendContext, ExternalInterface
from cloudroutes.config import parse_config
from cloudroutes.errors import RouteConflict
from cloudroutes.lab.netns import Netns, link_veth
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.plan import make_plan
from cloudroutes.routes import Action, Change, EntryState, Outcome, Plan
from providers.netlink import RTM_NEWROUTE, RTMGRP_IPV4_ROUTE, Netlink, messages
from providers.vxlan import VxlanBackend
from providers.vxlan_table import (
    AF_BRIDGE,
    RTM_NEWNEIGH,
    RTMGRP_NEIGH,
    VxlanPeer,
    VxlanRouteTable,
)
from tests.conftest import needs_root
from tests.wait import wait_for

pytestmark = [needs_root, pytest.mark.root]

DEVICE = "flannel.1"
OWN = Lease(IPv4Network("10.5.1.0/24"))


def peer(n: int, public_ip: str = "198.18.0.2") -> VxlanPeer:
    return VxlanPeer(
        IPv4Network(f"10.5.{n}.0/24"), f"10.5.{n}.0", f"0a:00:00:00:00:{n:02x}", public_ip, DEVICE
    )


def lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


@dataclass
class Node:
    ns: Netns
    state_dir: Path

    def backend(self, **options: object) -> VxlanBackend:
        config = parse_config(
            json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", **options}})
        )
        index = int(self.ns.ip("-o", "link", "show", "eth0").split(":")[0])
        address = IPv4Address("198.18.0.1")
        iface = ExternalInterface("eth0", index, 1500, address, address)
        return VxlanBackend(
            BackendContext(config, iface), netns=self.ns.name, state_dir=str(self.state_dir)
        )

    def table(self) -> VxlanRouteTable:
        backend = self.backend()
        backend.prepare()
        (binding,) = backend.bind(OWN)
        assert isinstance(binding.table, VxlanRouteTable)
        return binding.table

    def neighbours(self) -> list[str]:
        return lines(self.ns.ip("neigh", "show", "dev", DEVICE, check=False))

    def fdb(self) -> list[str]:
        return lines(self.ns.run("bridge", "fdb", "show", "dev", DEVICE, check=False).stdout)

    def routes(self) -> list[str]:
        return lines(self.ns.ip("route", "show", "dev", DEVICE, check=False))

    def link(self) -> str:
        return " ".join(self.ns.ip("-d", "link", "show", DEVICE, check=False).split())

    def whole(self, p: VxlanPeer) -> bool:
        return (
            f"{p.vtep_ip} lladdr {p.mac} PERMANENT" in self.neighbours()
            and f"{p.mac} dst {p.public_ip} self permanent" in self.fdb()
            and f"{p.destination} via {p.vtep_ip} proto 157 onlink" in self.routes()
        )


@pytest.fixture
def node(netns: Callable[[str], Netns], tmp_path: Path) -> Node:
    ns, other = netns("vx"), netns("vxp")
    link_veth(ns, "eth0", other, "eth0")
    ns.ip("addr", "add", "198.18.0.1/24", "dev", "eth0")
    other.ip("addr", "add", "198.18.0.2/24", "dev", "eth0")
    return Node(ns, tmp_path)


def adds(*peers: VxlanPeer) -> Plan:
    return Plan(tuple(Change(Action.ADD, p) for p in peers))


def converge(table: VxlanRouteTable, want: list[VxlanPeer]) -> list[Outcome]:
    seen = table.observe()
    return table.apply(make_plan({p.key: p for p in want}, seen.owned, seen.foreign).plan)


def test_prepare_makes_the_device_and_keeps_its_mac(node: Node) -> None:
    backend = node.backend()
    attrs = backend.prepare()
    assert attrs.backend_type == "vxlan"
    assert attrs.backend_data == {"VNI": 1, "VtepMAC": backend.mac}
    assert f"link/ether {backend.mac}" in node.link()
    assert "vxlan id 1 local 198.18.0.1 dev eth0" in node.link()
    assert "dstport 8472 nolearning" in node.link()
    assert "mtu 1450" in node.link()
    assert (node.state_dir / "vxlan-1-198.18.0.1.mac").read_text() == backend.mac + "\n"
    backend.bind(OWN)
    assert "inet 10.5.1.0/32" in node.ns.ip("addr", "show", DEVICE)
    # udev (MACAddressPolicy) changed it: the next start puts the VtepMAC back.
    node.ns.ip("link", "set", DEVICE, "address", "0a:11:22:33:44:55")
    index = node.link().split(":")[0]
    again = node.backend()
    assert again.prepare().backend_data == {"VNI": 1, "VtepMAC": backend.mac}
    assert f"link/ether {backend.mac}" in node.link()
    assert node.link().split(":")[0] == index  # the same device, not a new one


def test_an_existing_device_without_state_file_is_reused_with_its_mac(node: Node) -> None:
    # As flanneld leaves it on a node that switches.
    node.ns.ip("link", "add", DEVICE, "address", "0a:aa:bb:cc:dd:01", "type", "vxlan",
               "id", "1", "local", "198.18.0.1", "dev", "eth0", "dstport", "8472", "nolearning")  # fmt: skip
    node.ns.ip("addr", "add", "10.5.77.0/32", "dev", DEVICE)  # an old lease's address (#1060)
    backend = node.backend()
    assert backend.prepare().backend_data == {"VNI": 1, "VtepMAC": "0a:aa:bb:cc:dd:01"}
    backend.bind(OWN)
    addresses = node.ns.ip("-4", "addr", "show", DEVICE)
    assert "inet 10.5.1.0/32" in addresses and "10.5.77.0" not in addresses


def test_an_incompatible_device_is_recreated_with_one_log_line(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    node.backend().prepare()
    mac = (node.state_dir / "vxlan-1-198.18.0.1.mac").read_text().strip()
    with caplog.at_level(logging.WARNING, logger="providers.vxlan"):
        node.backend(Port=4789, GBP=True).prepare()
    assert [r.getMessage() for r in caplog.records] == [
        "flannel.1 already exists with incompatible configuration (port: 8472 vs 4789); "
        "recreating it"
    ]
    assert "dstport 4789" in node.link() and " gbp " in node.link()
    assert f"link/ether {mac}" in node.link()


def test_a_changed_vni_replaces_the_old_device_and_says_so(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    node.backend().prepare()
    with caplog.at_level(logging.WARNING, logger="providers.vxlan"):
        node.backend(VNI=2).prepare()
    assert [r.getMessage() for r in caplog.records] == [
        "deleting flannel.1: the network config's VNI is now 2"
    ]
    assert node.link() == ""
    assert "vxlan id 2 " in node.ns.ip("-d", "link", "show", "flannel.2")


def test_a_peer_is_three_entries_made_in_order(node: Node) -> None:
    table = node.table()
    events = Netlink(node.ns.name, RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE)
    try:
        outcomes = table.apply(adds(peer(2), peer(3)))
        assert all(o.ok for o in outcomes), outcomes
        order: list[str] = []
        while len(order) < 6:
            data = events.sock.recv(65536)
            for kind, _f, _s, _p, lo, _hi in messages(data, len(data)):
                if kind == RTM_NEWNEIGH:
                    order.append("fdb" if data[lo] == AF_BRIDGE else "neighbour")
                elif kind == RTM_NEWROUTE:
                    order.append("route")
    finally:
        events.close()
    # Each peer's neighbour, then FDB entry, then route (one batch per step).
    assert order == ["neighbour", "neighbour", "fdb", "fdb", "route", "route"]
    assert node.whole(peer(2)) and node.whole(peer(3))
    assert {p.key for p in (peer(2), peer(3))} == set(table.observe().owned)
    assert table.observe().entries() == {peer(2), peer(3)}


def test_a_failed_route_undoes_the_neighbour_and_fdb_entries(node: Node) -> None:
    table = node.table()
    node.ns.ip("route", "add", "10.5.4.0/24", "via", "198.18.0.9", "proto", "static")
    (outcome,) = table.apply(adds(peer(4)))
    assert isinstance(outcome.error, RouteConflict)
    assert "10.5.4.0/24 is held by a route cloudroutes does not own" in str(outcome.error)
    assert node.neighbours() == [] and node.fdb() == []


def test_delete_removes_all_three(node: Node) -> None:
    table = node.table()
    table.apply(adds(peer(2), peer(3)))
    outcomes = converge(table, [peer(3)])
    assert [(o.change.action, o.ok) for o in outcomes] == [(Action.DELETE, True)]
    assert not any("10.5.2.0" in line or ":02 " in line for line in node.neighbours() + node.fdb())
    assert not any("10.5.2.0/24" in line for line in node.routes())
    assert node.whole(peer(3))


def test_a_partial_peer_is_broken_and_replaced_whole(node: Node) -> None:
    table = node.table()
    table.apply(adds(peer(2)))
    node.ns.run("bridge", "fdb", "del", peer(2).mac, "dev", DEVICE, "dst", "198.18.0.2")
    (observed,) = table.observe().owned.values()
    assert observed.state is EntryState.BROKEN
    outcomes = converge(table, [peer(2)])
    assert [(o.change.action, o.ok) for o in outcomes] == [(Action.REPLACE, True)]
    assert node.whole(peer(2))


def test_a_new_vtep_mac_replaces_the_stale_fdb_entry(node: Node) -> None:
    table = node.table()
    table.apply(adds(peer(2)))
    moved = VxlanPeer(peer(2).destination, "10.5.2.0", "0a:00:00:00:09:02", "198.18.0.2", DEVICE)
    converge(table, [moved])
    assert node.whole(moved)
    assert not any(peer(2).mac in line for line in node.fdb() + node.neighbours())


def test_a_deleted_device_comes_back_with_its_peers(node: Node) -> None:
    table = node.table()
    table.apply(adds(peer(2), peer(3)))
    mac = node.link().split("link/ether ")[1].split()[0]
    node.ns.ip("link", "del", DEVICE)
    assert table.observe().owned == {}
    outcomes = converge(table, [peer(2), peer(3)])
    assert all(o.ok for o in outcomes), outcomes
    assert node.whole(peer(2)) and node.whole(peer(3))
    assert f"link/ether {mac}" in node.link() and "UP" in node.link()
    assert "inet 10.5.1.0/32" in node.ns.ip("addr", "show", DEVICE)


def test_a_device_set_down_is_brought_up_with_its_peers(node: Node) -> None:
    table = node.table()
    table.apply(adds(peer(2)))
    node.ns.ip("link", "set", DEVICE, "down")  # the kernel drops the routes through it
    outcomes = converge(table, [peer(2)])
    assert all(o.ok for o in outcomes), outcomes
    assert node.whole(peer(2)) and ",UP," in node.link()


def test_flanneld_peers_are_adopted_in_place(node: Node) -> None:
    table = node.table()
    p = peer(2)
    # What flanneld leaves: the route has protocol boot.
    node.ns.ip("neigh", "add", p.vtep_ip, "lladdr", p.mac, "dev", DEVICE, "nud", "permanent")
    node.ns.run("bridge", "fdb", "add", p.mac, "dev", DEVICE, "dst", p.public_ip, "self",
                "permanent")  # fmt: skip
    node.ns.ip("route", "add", str(p.destination), "via", p.vtep_ip, "dev", DEVICE, "onlink")
    outcomes = converge(table, [p])
    assert [(o.change.action, o.ok) for o in outcomes] == [(Action.ADOPT, True)]
    assert node.whole(p)


def test_the_drift_watch_sees_a_deleted_fdb_entry(node: Node) -> None:
    table = node.table()
    table.apply(adds(peer(2)))
    table.observe()
    drift = threading.Event()
    stop = threading.Event()
    watch = threading.Thread(target=table.watch_drift, args=(drift.set, stop), daemon=True)
    watch.start()
    try:
        # Our own writes are no drift.
        table.apply(adds(peer(3)))
        assert not drift.wait(0.5)
        node.ns.run("bridge", "fdb", "del", peer(2).mac, "dev", DEVICE, "dst", "198.18.0.2")
        wait_for(drift.is_set, 5, "a drift notice")
    finally:
        stop.set()
        watch.join(5)
    assert not watch.is_alive(), "the drift watch did not stop"


def test_the_lease_of_a_direct_peer_gets_a_host_gw_route(node: Node) -> None:
    backend = node.backend(DirectRouting=True)
    backend.prepare()
    backend.bind(OWN)
    data = {"VNI": 1, "VtepMAC": "0a:00:00:00:00:02"}
    near = Lease(IPv4Network("10.5.2.0/24"), LeaseAttrs(IPv4Address("198.18.0.2"), None,
                                                        "vxlan", data))  # fmt: skip
    far = Lease(IPv4Network("10.5.3.0/24"), LeaseAttrs(IPv4Address("192.0.2.3"), None,
                                                       "vxlan", data))  # fmt: skip
    assert [str(e) for e in backend.desired(near)] == ["10.5.2.0/24 via 198.18.0.2 dev eth0"]
    assert [type(e).__name__ for e in backend.desired(far)] == ["VxlanPeer"]

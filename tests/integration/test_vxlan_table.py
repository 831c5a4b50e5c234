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
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from cloudroutes.backend import BackendContext, ExternalInterface
from cloudroutes.config import parse_config
from cloudroutes.errors import RouteConflict
from cloudroutes.lab.netns import Netns, link_veth
from cloudroutes.lease import Lease, LeaseAttrs, encode_attrs
from cloudroutes.plan import make_plan
from cloudroutes.routes import Action, Change, EntryState, Outcome, Plan, Route
from providers.netlink import (
    RTM_NEWROUTE,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_ROUTE,
    Netlink,
    messages,
)
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


DEVICE6 = "flannel-v6.1"
OWN6 = Lease(IPv4Network("10.5.1.0/24"), ipv6_subnet=IPv6Network("fc00:0:0:1::/64"))
DUAL = {"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fc00::/48"}
V6_ONLY = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fc00::/48"}


def peer6(n: int, public_ip: str = "2001:db8::2") -> VxlanPeer:
    return VxlanPeer(
        IPv6Network(f"fc00:0:0:{n}::/64"), f"fc00:0:0:{n}::", f"0a:00:00:00:06:{n:02x}",
        public_ip, DEVICE6,
    )  # fmt: skip


@dataclass
class Node:
    ns: Netns
    state_dir: Path

    def backend(self, families: dict[str, object] | None = None, **options: object) -> VxlanBackend:
        network = families or {"Network": "10.5.0.0/16"}
        config = parse_config(json.dumps({**network, "Backend": {"Type": "vxlan", **options}}))
        index = int(self.ns.ip("-o", "link", "show", "eth0").split(":")[0])
        address, address6 = IPv4Address("198.18.0.1"), IPv6Address("2001:db8::1")
        iface = ExternalInterface("eth0", index, 1500, address, address, address6, address6)
        return VxlanBackend(
            BackendContext(config, iface), netns=self.ns.name, state_dir=str(self.state_dir)
        )

    def tables(self, families: dict[str, object] = DUAL) -> list[VxlanRouteTable]:
        backend = self.backend(families)
        backend.prepare()
        tables = [b.table for b in backend.bind(OWN6)]
        assert all(isinstance(t, VxlanRouteTable) for t in tables)
        return tables  # type: ignore[return-value]

    def whole6(self, p: VxlanPeer) -> bool:
        neighbours = lines(self.ns.ip("-6", "neigh", "show", "dev", DEVICE6, check=False))
        fdb = lines(self.ns.run("bridge", "fdb", "show", "dev", DEVICE6, check=False).stdout)
        routes = lines(self.ns.ip("-6", "route", "show", "dev", DEVICE6, check=False))
        return (
            f"{p.vtep_ip} lladdr {p.mac} PERMANENT" in neighbours
            and f"{p.mac} dst {p.public_ip} self permanent" in fdb
            and f"{p.destination} via {p.vtep_ip} proto 157 metric 1024 onlink pref medium"
            in routes
        )

    def v6_entries(self) -> list[str]:
        """Every permanent neighbour, FDB entry and route of ours on the IPv6 device."""
        return [
            line
            for line in lines(self.ns.ip("-6", "neigh", "show", "dev", DEVICE6, check=False))
            + lines(self.ns.run("bridge", "fdb", "show", "dev", DEVICE6, check=False).stdout)
            + lines(self.ns.ip("-6", "route", "show", "dev", DEVICE6, check=False))
            if "PERMANENT" in line or " self permanent" in line or "proto 157" in line
        ]

    def link6(self) -> str:
        return " ".join(self.ns.ip("-d", "link", "show", DEVICE6, check=False).split())

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
    # nodad: a tentative address cannot be a VTEP's for the second DAD takes.
    ns.ip("addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad")
    other.ip("addr", "add", "2001:db8::2/64", "dev", "eth0", "nodad")
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


def kernel_order(node: Node, table: VxlanRouteTable, *peers: VxlanPeer) -> list[str]:
    """Add ``peers``: which kernel entries appeared, in the order the kernel announced them."""
    groups = RTMGRP_IPV4_ROUTE if peers[0].destination.version == 4 else RTMGRP_IPV6_ROUTE
    events = Netlink(node.ns.name, RTMGRP_NEIGH | groups)
    events.sock.settimeout(5)
    try:
        outcomes = table.apply(adds(*peers))
        assert all(o.ok for o in outcomes), outcomes
        order: list[str] = []
        while len(order) < 3 * len(peers):
            data = events.sock.recv(65536)
            for kind, _f, _s, _p, lo, _hi in messages(data, len(data)):
                # ndmsg: family, pads, ifindex, then the state (u16); rtmsg: protocol at 5.
                permanent = int.from_bytes(data[lo + 8 : lo + 10], "little") & 0x80
                if kind == RTM_NEWNEIGH and permanent:
                    order.append("fdb" if data[lo] == AF_BRIDGE else "neighbour")
                elif kind == RTM_NEWROUTE and data[lo + 5] == 157:
                    order.append("route")
    finally:
        events.close()
    return order


def test_a_peer_is_three_entries_made_in_order(node: Node) -> None:
    table = node.table()
    # Each peer's neighbour, then FDB entry, then route (one batch per step).
    order = kernel_order(node, table, peer(2), peer(3))
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


def repaired_whole(node: Node, table: VxlanRouteTable, p: VxlanPeer, *damage: str) -> bool:
    """Add ``p``, damage it by hand: it is observed BROKEN, replaced, and whole again."""
    table.apply(adds(p))
    node.ns.run(*damage)
    (observed,) = table.observe().owned.values()
    assert observed.state is EntryState.BROKEN
    outcomes = converge(table, [p])
    assert [(o.change.action, o.ok) for o in outcomes] == [(Action.REPLACE, True)]
    return node.whole(p) if p.destination.version == 4 else node.whole6(p)


def test_a_partial_peer_is_broken_and_replaced_whole(node: Node) -> None:
    damage = ("bridge", "fdb", "del", peer(2).mac, "dev", DEVICE, "dst", "198.18.0.2")
    assert repaired_whole(node, node.table(), peer(2), *damage)


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


def watch_sees_damage(
    table: VxlanRouteTable, first: VxlanPeer, second: VxlanPeer, damage: Callable[[], object]
) -> None:
    """With ``first`` in the table, adding ``second`` is no drift, and ``damage`` is."""
    table.apply(adds(first))
    table.observe()
    drift = threading.Event()
    stop = threading.Event()
    watch = threading.Thread(target=table.watch_drift, args=(drift.set, stop), daemon=True)
    watch.start()
    try:
        # Our own writes are no drift.
        table.apply(adds(second))
        assert not drift.wait(0.5)
        damage()
        wait_for(drift.is_set, 5, "a drift notice")
    finally:
        stop.set()
        watch.join(5)
    assert not watch.is_alive(), "the drift watch did not stop"


def test_the_drift_watch_sees_a_deleted_fdb_entry(node: Node) -> None:
    watch_sees_damage(
        node.table(), peer(2), peer(3),
        lambda: node.ns.run("bridge", "fdb", "del", peer(2).mac, "dev", DEVICE, "dst",
                            "198.18.0.2"),
    )  # fmt: skip


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


# --- IPv6 ---------------------------------------------------------------------------------------


def test_dual_stack_prepare_makes_both_devices_and_publishes_both_macs(node: Node) -> None:
    backend = node.backend(DUAL)
    attrs = backend.prepare()
    mac4, mac6 = backend.mac_of(4), backend.mac_of(6)
    assert mac4 != mac6
    assert encode_attrs(attrs).decode() == (
        '{"PublicIP":"198.18.0.1","PublicIPv6":"2001:db8::1","BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{mac4}"}},'
        f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}'
    )
    assert f"link/ether {mac6}" in node.link6()
    assert "vxlan id 1 local 2001:db8::1 dev eth0" in node.link6()
    assert "mtu 1430" in node.link6() and "mtu 1450" in node.link()
    assert (node.state_dir / "vxlan-v6-1-2001:db8::1.mac").read_text() == mac6 + "\n"
    bindings = backend.bind(OWN6)
    assert [b.table.name for b in bindings] == ["kernel", "kernel-v6"]
    assert "inet6 fc00:0:0:1::/128 scope global" in node.ns.ip("-6", "addr", "show", DEVICE6)
    assert "inet 10.5.1.0/32" in node.ns.ip("addr", "show", DEVICE)
    # A restart reuses both devices with their MACs.
    index = node.link6().split(":")[0]
    assert node.backend(DUAL).prepare() == attrs
    assert node.link6().split(":")[0] == index


def test_v6_peers_are_three_entries_made_in_order(node: Node) -> None:
    _v4, table = node.tables()
    order = kernel_order(node, table, peer6(2), peer6(3))
    assert order == ["neighbour", "neighbour", "fdb", "fdb", "route", "route"]
    assert node.whole6(peer6(2)) and node.whole6(peer6(3))
    assert table.observe().entries() == {peer6(2), peer6(3)}


def test_each_family_s_table_sees_and_deletes_only_its_own_peers(node: Node) -> None:
    v4, v6 = node.tables()
    v4.apply(adds(peer(2)))
    v6.apply(adds(peer6(2)))
    assert v4.observe().entries() == {peer(2)}
    assert v6.observe().entries() == {peer6(2)}
    # Converging the IPv4 table to nothing leaves the IPv6 peer alone, and the other way.
    assert [o.change.entry for o in converge(v4, [])] == [peer(2)]
    assert node.whole6(peer6(2))
    v4.apply(adds(peer(3)))
    assert [o.change.entry for o in converge(v6, [])] == [peer6(2)]
    assert node.whole(peer(3)) and node.v6_entries() == []


@pytest.mark.parametrize(
    "damage",
    [
        ("ip", "-6", "neigh", "del", "fc00:0:0:2::", "dev", DEVICE6),
        ("bridge", "fdb", "del", "0a:00:00:00:06:02", "dev", DEVICE6, "dst", "2001:db8::2"),
    ],
)
def test_a_v6_peer_missing_an_entry_is_broken_and_replaced_whole(
    node: Node, damage: tuple[str, ...]
) -> None:
    _v4, table = node.tables()
    assert repaired_whole(node, table, peer6(2), *damage)


def test_deleting_a_v6_peer_removes_all_three(node: Node) -> None:
    _v4, table = node.tables()
    table.apply(adds(peer6(2), peer6(3)))
    outcomes = converge(table, [peer6(3)])
    assert [(o.change.action, o.ok) for o in outcomes] == [(Action.DELETE, True)]
    assert not any("fc00:0:0:2::" in line or ":06:02 " in line for line in node.v6_entries())
    assert node.whole6(peer6(3))


def test_a_failed_v6_route_undoes_its_neighbour_and_fdb_entries(node: Node) -> None:
    _v4, table = node.tables()
    node.ns.ip("-6", "route", "add", "fc00:0:0:4::/64", "via", "2001:db8::9", "proto", "static")
    (outcome,) = table.apply(adds(peer6(4)))
    # IPv6 refuses the onlink gateway before the conflict: it resolves through eth0 now.
    assert "Nexthop has invalid gateway or device mismatch" in str(outcome.error)
    assert node.v6_entries() == []


def test_the_drift_watch_sees_a_deleted_v6_neighbour(node: Node) -> None:
    _v4, table = node.tables()
    watch_sees_damage(
        table, peer6(2), peer6(3),
        lambda: node.ns.ip("-6", "neigh", "del", "fc00:0:0:2::", "dev", DEVICE6),
    )  # fmt: skip


def test_an_ipv6_only_network_has_only_the_v6_device(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    node.backend().prepare()  # an IPv4 network before
    backend = node.backend(V6_ONLY)
    with caplog.at_level(logging.WARNING, logger="providers.vxlan"):
        attrs = backend.prepare()
    assert [r.getMessage() for r in caplog.records] == [
        "deleting flannel.1: the network config does not enable IPv4"
    ]
    assert encode_attrs(attrs).decode() == (
        '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::1","BackendType":"vxlan",'
        f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{backend.mac_of(6)}"}}}}'
    )
    assert node.link() == "" and "mtu 1430" in node.link6()
    (binding,) = backend.bind(OWN6)
    assert binding.table.name == "kernel-v6"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="providers.vxlan"):
        node.backend(V6_ONLY, Port=4789).prepare()
    assert [r.getMessage() for r in caplog.records] == [
        "flannel-v6.1 already exists with incompatible configuration (port: 8472 vs 4789); "
        "recreating it"
    ]
    assert f"link/ether {backend.mac_of(6)}" in node.link6()


def test_a_deleted_v6_device_comes_back_with_its_peers_and_address(node: Node) -> None:
    _v4, table = node.tables()
    table.apply(adds(peer6(2)))
    mac = node.link6().split("link/ether ")[1].split()[0]
    node.ns.ip("link", "del", DEVICE6)
    assert table.observe().owned == {}
    outcomes = converge(table, [peer6(2)])
    assert all(o.ok for o in outcomes), outcomes
    assert node.whole6(peer6(2))
    assert f"link/ether {mac}" in node.link6() and "mtu 1430" in node.link6()
    assert "inet6 fc00:0:0:1::/128" in node.ns.ip("-6", "addr", "show", DEVICE6)


def test_a_v6_peer_moves_between_a_direct_route_and_the_device(node: Node) -> None:
    # IPv6 refuses to replace a route on eth0 with an onlink one through the device in place.
    _v4, table = node.tables()
    direct = Route(IPv6Network("fc00:0:0:2::/64"), "2001:db8::2", "eth0")
    table.apply(Plan((Change(Action.ADD, direct),)))
    outcomes = converge(table, [peer6(2)])
    assert [(o.change.action, o.ok) for o in outcomes] == [(Action.REPLACE, True)]
    assert node.whole6(peer6(2))
    outcomes = converge(table, [direct])
    assert [(o.change.action, o.ok) for o in outcomes] == [(Action.REPLACE, True)]
    assert node.v6_entries() == []
    assert lines(node.ns.ip("-6", "route", "show", "fc00:0:0:2::/64")) == [
        "fc00:0:0:2::/64 via 2001:db8::2 dev eth0 proto 157 metric 1024 pref medium"
    ]

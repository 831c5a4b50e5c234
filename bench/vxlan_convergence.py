"""vxlan convergence: the vxlan backend's table against iproute2, in the same run.

Each round gets a fresh namespace with a veth to a peer on 198.18.0.0/24 and a new flannel.1
made by the backend. Timed: one reconcile pass that converges N vxlan leases (3 kernel entries
each: neighbour, FDB entry, route) through the one reconciler and ``VxlanRouteTable``, against
``ip -batch`` (neighbours and routes) plus ``bridge -batch`` (FDB entries) adding the same
entries; reading them back (observe(), against ``ip neigh show``, ``bridge fdb show`` and
``ip route show proto 157``); and removing them (against the same tools' batches).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from bench import Figure, Rounds, best_of
from cloudroutes.backend import BackendContext, ExternalInterface
from cloudroutes.config import parse_config
from cloudroutes.lab.netns import Netns, link_veth, unique_name
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.lease_table import LeaseTable
from cloudroutes.reconciler import Reconciler
from cloudroutes.routes import Action, Change, Plan
from providers.kernel import RTPROT_CLOUDROUTES
from providers.vxlan import VxlanBackend
from providers.vxlan_table import VxlanPeer, VxlanRouteTable

PROTO = str(RTPROT_CLOUDROUTES)
DEVICE = "flannel.1"
REPEAT = 3
CONFIG = parse_config(
    json.dumps({"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}})
)
OWN = Lease(IPv4Network("10.255.255.0/24"), LeaseAttrs(IPv4Address("198.18.0.1"), None, "vxlan"))


def leases(n: int) -> list[Lease]:
    out = []
    for i in range(n):
        mac = f"0a:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        public_ip = IPv4Address((198 << 24) + (19 << 16) + i)  # 198.19.0.0/16: a peer per lease
        attrs = LeaseAttrs(public_ip, None, "vxlan", {"VNI": 1, "VtepMAC": mac})
        out.append(Lease(IPv4Network(((10 << 24) + (i << 8), 24)), attrs))
    return out


class Node:
    """A namespace with eth0 on 198.18.0.1/24 (cabled to a peer) and the vxlan backend's
    device."""

    def __init__(self) -> None:
        self.ns = Netns(unique_name("bx"))
        self.peer = Netns(unique_name("bxp"))
        link_veth(self.ns, "eth0", self.peer, "eth0")
        self.ns.ip("addr", "add", "198.18.0.1/24", "dev", "eth0")
        self.peer.ip("addr", "add", "198.18.0.2/24", "dev", "eth0")
        index = int(self.ns.ip("-o", "link", "show", "eth0").split(":")[0])
        address = IPv4Address("198.18.0.1")
        iface = ExternalInterface("eth0", index, 1500, address, address)
        self._state = tempfile.TemporaryDirectory(prefix="bench-vxlan-")
        self.backend = VxlanBackend(
            BackendContext(CONFIG, iface), netns=self.ns.name, state_dir=self._state.name
        )
        self.backend.prepare()
        (self.binding,) = self.backend.bind(OWN)

    def batch(self, tool: str, commands: str) -> None:
        subprocess.run(
            [tool, "-n", self.ns.name, "-batch", "-"], input=commands, text=True, check=True
        )

    def show(self) -> None:
        for command in (
            ["ip", "-n", self.ns.name, "neigh", "show", "dev", DEVICE],
            ["bridge", "-n", self.ns.name, "fdb", "show", "dev", DEVICE],
            ["ip", "-n", self.ns.name, "route", "show", "proto", PROTO],
        ):
            subprocess.run(command, check=True, capture_output=True)

    def delete(self) -> None:
        self.ns.delete()
        self.peer.delete()
        self._state.cleanup()


@dataclass(frozen=True)
class Scripts:
    """The same entries as iproute2 batches: ``ip -batch`` for neighbours and routes,
    ``bridge -batch`` for FDB entries."""

    neighbours: str
    fdb: str
    routes: str


def scripts(peers: list[VxlanPeer], verb: str) -> Scripts:
    neighbours = "".join(
        f"neigh {verb} {p.vtep_ip} lladdr {p.mac} dev {DEVICE} nud permanent\n" for p in peers
    )
    routes = "".join(
        f"route {verb} {p.destination} via {p.vtep_ip} dev {DEVICE} onlink proto {PROTO}\n"
        for p in peers
    )
    fdb = "".join(
        f"fdb {verb} {p.mac} dev {DEVICE} dst {p.public_ip} self permanent\n" for p in peers
    )
    return Scripts(neighbours, fdb, routes)


def measure(n: int) -> Iterator[Figure]:
    all_leases = leases(n)
    rounds = Rounds(Node)
    try:
        rounds.fresh()
        assert rounds.node is not None
        peers: list[VxlanPeer] = [
            p for lease in all_leases for p in rounds.node.binding.desired(lease)
        ]  # type: ignore[misc]
        add, replace, delete = (scripts(peers, verb) for verb in ("add", "replace", "del"))

        def iproute2_converge() -> None:
            assert rounds.node is not None
            # The order the entries need: neighbours, FDB entries, then routes.
            rounds.node.batch("ip", add.neighbours)
            rounds.node.batch("bridge", add.fdb)
            rounds.node.batch("ip", add.routes)

        def ours_converge() -> None:
            assert rounds.node is not None
            table = LeaseTable()
            table.replace_all([OWN, *all_leases], revision=1)
            binding = rounds.node.binding
            result = Reconciler(binding.table, table, binding.desired).reconcile(resync=True)
            assert result.clean, "bench peers were refused"

        baseline = best_of(REPEAT, iproute2_converge, rounds.fresh)
        ours = best_of(REPEAT, ours_converge, rounds.fresh)
        yield Figure(
            f"converge {n} vxlan leases ({3 * n} kernel entries; one reconcile pass)",
            ours,
            baseline=baseline,
            baseline_name="ip -batch + bridge -batch",
        )

        # The last node holds the entries now.
        node = rounds.node
        assert node is not None
        table = node.binding.table
        assert isinstance(table, VxlanRouteTable)
        observed = best_of(REPEAT, table.observe)
        assert len(table.observe().owned) == n
        yield Figure(
            f"observe {n} vxlan peers",
            observed,
            baseline=best_of(REPEAT, node.show),
            baseline_name="ip neigh show + bridge fdb show + ip route show",
        )

        def refill() -> None:
            node.batch("ip", replace.neighbours)
            node.batch("bridge", replace.fdb)
            node.batch("ip", replace.routes)

        def iproute2_delete() -> None:
            node.batch("ip", delete.routes)
            node.batch("bridge", delete.fdb)
            node.batch("ip", delete.neighbours)

        deletes = Plan(tuple(Change(Action.DELETE, p, p) for p in peers))
        yield Figure(
            f"delete {n} vxlan peers (apply)",
            best_of(REPEAT, lambda: table.apply(deletes), refill),
            baseline=best_of(REPEAT, iproute2_delete, refill),
            baseline_name="ip -batch + bridge -batch",
        )
    finally:
        rounds.close()


def run(short: bool = False) -> Iterator[Figure]:
    yield from measure(1000 if short else 10000)

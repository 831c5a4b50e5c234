"""Data-path throughput of the kernel backends: iperf3 TCP from one node's gateway address to
another's, over host-gw and vxlan clusters run by real agents (and over the udp backend), next to
the same paths made by hand with ``ip`` and ``bridge`` and to a plain veth, all in the same run.

The hand-made paths have the lab's shape (two node namespaces on a switch, each with its
gateway on a ``cni0`` bridge) and the kernel entries flanneld would make: for host-gw one route
per peer via its underlay address; for vxlan a ``flannel.1`` (VNI 1, port 8472, learning off,
MTU 1450) with a permanent neighbour, a permanent FDB entry and an onlink route per peer. The
plain veth (two namespaces, one cable) is the ceiling. Targets: host-gw and vxlan within 10% of
their hand-made path (ratio >= 0.90); udp at least 0.15 of vxlan.

Runs alternate between the paths so that load from elsewhere on the machine falls on all of them
alike; each figure is the best run.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

from bench import Figure
from bench.udp_throughput import cluster, iperf
from cloudroutes.errors import CloudroutesError
from cloudroutes.lab.cluster import LabCluster, LabNode, node_address
from cloudroutes.lab.netns import Netns, Underlay, link_veth, unique_name

DEVICE = "flannel.1"
UNIT = "Gbit/s"


class HandMadePair:
    """Two node namespaces on a switch, each with a gateway on ``cni0`` in 10.6.<i>.0/24, their
    overlay made with ``ip``/``bridge`` as flanneld would make it."""

    def __init__(self, backend: str) -> None:
        self.switch = Underlay(unique_name("bhsw"))
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-hand-"))
        self.nodes: list[LabNode] = []
        try:
            for i in (1, 2):
                ns = Netns(unique_name(f"bh{i}-"))
                self.switch.plug(ns, "eth0", f"{node_address(i)}/24")
                ns.sysctl("net.ipv4.ip_forward", "1")
                ns.ip("link", "add", "cni0", "type", "bridge")
                ns.ip("link", "set", "cni0", "up")
                ns.ip("addr", "add", f"10.6.{i}.1/24", "dev", "cni0")
                run_dir = self.workdir / f"node{i}"
                run_dir.mkdir()
                subnet = run_dir / "subnet.env"
                subnet.write_text(f"FLANNEL_NETWORK=10.6.0.0/16\nFLANNEL_SUBNET=10.6.{i}.1/24\n")
                self.nodes.append(LabNode(f"hand{i}", ns, node_address(i), run_dir))
            for i, node in enumerate(self.nodes, 1):
                if backend == "vxlan":
                    self._vxlan_device(node, i)
            for node in self.nodes:
                for j, peer in enumerate(self.nodes, 1):
                    if peer is not node:
                        self._peer(backend, node, peer, j)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _mac(i: int) -> str:
        return f"0a:6a:00:00:00:{i:02x}"

    def _vxlan_device(self, node: LabNode, i: int) -> None:
        node.ns.ip("link", "add", DEVICE, "address", self._mac(i), "type", "vxlan", "id", "1",
                   "local", node.address, "dev", "eth0", "dstport", "8472",
                   "nolearning")  # fmt: skip
        node.ns.ip("link", "set", DEVICE, "mtu", "1450", "up")
        node.ns.ip("addr", "add", f"10.6.{i}.0/32", "dev", DEVICE)

    def _peer(self, backend: str, node: LabNode, peer: LabNode, j: int) -> None:
        subnet = f"10.6.{j}.0/24"
        if backend == "host-gw":
            node.ns.ip("route", "add", subnet, "via", peer.address, "dev", "eth0")
            return
        vtep, mac = f"10.6.{j}.0", self._mac(j)
        node.ns.ip("neigh", "add", vtep, "lladdr", mac, "dev", DEVICE, "nud", "permanent")
        node.ns.run("bridge", "fdb", "add", mac, "dev", DEVICE, "dst", peer.address, "self",
                    "permanent")  # fmt: skip
        node.ns.ip("route", "add", subnet, "via", vtep, "dev", DEVICE, "onlink")

    def close(self) -> None:
        for node in self.nodes:
            node.ns.delete()
        self.switch.delete()
        shutil.rmtree(self.workdir, ignore_errors=True)


class VethPair:
    """The ceiling: two namespaces and one veth between them."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-veth-"))
        a, b = Netns(unique_name("bva")), Netns(unique_name("bvb"))
        link_veth(a, "eth0", b, "eth0")
        self.nodes = []
        for i, ns in enumerate((a, b), 1):
            ns.ip("addr", "add", f"{node_address(i)}/24", "dev", "eth0")
            self.nodes.append(LabNode(f"veth{i}", ns, node_address(i), self.workdir))

    def close(self) -> None:
        for node in self.nodes:
            node.ns.delete()
        shutil.rmtree(self.workdir, ignore_errors=True)


def gateways(nodes: list[LabNode], seconds: float) -> Callable[[], float]:
    a, b = nodes
    return lambda: iperf(a, b, a.gateway, b.gateway, seconds)


def udp_cluster() -> LabCluster | None:
    """A udp cluster, or None (saying why) while the udp backend does not carry traffic."""
    try:
        return cluster("udp")
    except (RuntimeError, CloudroutesError) as exc:
        print(f"  (udp backend left out: {str(exc).splitlines()[0]})", flush=True)
        return None


def run(short: bool = False) -> Iterator[Figure]:
    seconds, rounds = (1.0, 1) if short else (5.0, 3)
    with ExitStack() as stack:
        veth = VethPair()
        stack.callback(veth.close)
        paths: dict[str, Callable[[], float]] = {
            "veth": lambda: iperf(*veth.nodes, veth.nodes[0].address, veth.nodes[1].address,
                                  seconds),
        }  # fmt: skip
        for backend in ("host-gw", "vxlan"):
            hand = HandMadePair(backend)
            stack.callback(hand.close)
            paths[f"hand {backend}"] = gateways(hand.nodes, seconds)
            lab = cluster(backend)
            stack.callback(lab.close)
            paths[backend] = gateways(lab.nodes, seconds)
        udp = udp_cluster()
        if udp is not None:
            stack.callback(udp.close)
            paths["udp"] = gateways(udp.nodes, seconds)
        best: dict[str, float] = dict.fromkeys(paths, 0.0)
        for _ in range(rounds):
            for name, measure in paths.items():
                best[name] = max(best[name], measure())

    what = "iperf3 TCP gateway to gateway"
    for backend in ("host-gw", "vxlan"):
        yield Figure(f"{what}, {backend} backend (target >= 0.90x)", best[backend], UNIT,
                     best[f"hand {backend}"], "the same path made by hand with ip")  # fmt: skip
    if "udp" in best:
        yield Figure(f"{what}, udp backend (target >= 0.15x)", best["udp"], UNIT,
                     best["vxlan"], "vxlan backend")  # fmt: skip
    for name in ("hand host-gw", "hand vxlan", "host-gw", "vxlan", "udp"):
        if name in best:
            yield Figure(f"{what}, {name}", best[name], UNIT, best["veth"], "plain veth")

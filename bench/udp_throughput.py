"""udp backend throughput: iperf3 TCP between two nodes' gateway addresses, over the udp backend
(the Python forwarder), against the same over the vxlan backend (the kernel) and over the plain
underlay veths, in the same run.

Both clusters are real agents in namespaces (cloudroutes.lab). Runs alternate between the paths
so that load from elsewhere on the machine falls on all of them alike; each figure is the median.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

from bench import Figure
from cloudroutes.lab.cluster import LabCluster, LabNode
from cloudroutes.lab.cluster import iperf as lab_iperf

PORT = 5201


def iperf(src: LabNode, dst: LabNode, source: str, target: str, seconds: float) -> float:
    """Gbit/s received in one iperf3 TCP run from ``source`` on src to ``target`` on dst."""
    return lab_iperf(src.ns, dst.ns, source, target, seconds) / 1e9


def cluster(backend: str) -> LabCluster:
    lab = LabCluster(2, backend=backend).build()
    try:
        lab.start()
        if not lab.ping(*lab.nodes):
            raise RuntimeError(f"{backend}: the nodes do not reach each other")
    except BaseException:
        lab.close()
        raise
    return lab


def run(short: bool = False) -> Iterator[Figure]:
    seconds, rounds = (2.0, 1) if short else (10.0, 3)
    udp = cluster("udp")
    try:
        vxlan = cluster("vxlan")
        try:
            results: dict[str, list[float]] = {"udp": [], "vxlan": [], "veth": []}
            for _ in range(rounds):
                for name, lab in (("udp", udp), ("vxlan", vxlan)):
                    a, b = lab.nodes
                    results[name].append(iperf(a, b, a.gateway, b.gateway, seconds))
                a, b = udp.nodes
                results["veth"].append(iperf(a, b, a.address, b.address, seconds))
        finally:
            vxlan.close()
    finally:
        udp.close()
    gbps = {name: statistics.median(values) for name, values in results.items()}
    yield Figure("iperf3 TCP gateway to gateway, udp backend", gbps["udp"], "Gbit/s",
                 gbps["vxlan"], "vxlan backend")  # fmt: skip
    yield Figure("iperf3 TCP gateway to gateway, udp backend", gbps["udp"], "Gbit/s",
                 gbps["veth"], "plain underlay veth")  # fmt: skip
    yield Figure("iperf3 TCP gateway to gateway, vxlan backend", gbps["vxlan"], "Gbit/s",
                 gbps["veth"], "plain underlay veth")  # fmt: skip

"""``cloudroutes demo``: a small cluster on this machine, in network namespaces.

It builds a lab cluster (a switch, an etcd machine and N nodes on 198.18.0.0/24), runs a real
agent on every node, shows every node's subnet gateway pinging every other node's through the
routes the agents programmed, then prints the leases and each node's routes. Everything is
removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

from cloudroutes.errors import ConfigError
from cloudroutes.lab.cluster import LabCluster


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def _show_cluster(cluster: LabCluster) -> bool:
    for node in cluster.nodes:
        env = node.subnet_env()
        say(f"{node.name} ({node.address}): FLANNEL_SUBNET={env['FLANNEL_SUBNET']} "
            f"FLANNEL_MTU={env['FLANNEL_MTU']}")  # fmt: skip
    say("pinging every node's subnet gateway from every other node's")
    ok = True
    for src in cluster.nodes:
        for dst in cluster.nodes:
            if src is not dst:
                passed = cluster.ping(src, dst)
                ok &= passed
                mark = "ok  " if passed else "FAIL"
                say(f"  {mark} {src.name} {src.gateway} -> {dst.name} {dst.gateway}")
    say("leases in etcd (cloudroutes leases):")
    print(cluster.cli_in_etcd_host("leases").stdout, end="")
    for node in cluster.nodes:
        say(f"{node.name}: kernel routes (the agent's carry its own proto number)")
        print(cluster.routes(node), end="")
    return ok


def run_demo(*, backend: str, nodes: int, keep: bool) -> int:
    if os.geteuid() != 0:
        raise ConfigError("the demo builds network namespaces and needs root; run it with sudo")
    if nodes < 2:
        raise ConfigError("--nodes must be at least 2 for nodes to reach each other")

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Explicitly, also for SIGINT: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    cluster = LabCluster(nodes, backend=backend)
    try:
        say(f"building {nodes} nodes and an etcd machine on 198.18.0.0/24 (backend {backend})")
        cluster.build()
        say(f"writing the network config; starting one agent per node (logs: {cluster.workdir})")
        cluster.start("--ip-masq")
        ok = _show_cluster(cluster)
        if keep:
            say("cluster is up; press Ctrl-C to tear it down")
            signal.pause()
        say("all pings passed" if ok else "some pings failed")
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        say("cleaning up")
        cluster.close()

"""``cloudroutes demo``: a small cluster on this machine, in network namespaces.

It builds a lab cluster (a switch, an etcd machine and N nodes on 198.18.0.0/24) and runs a real
agent on every node. Everything is removed at the end, also on Ctrl-C: pods (through the CNI
plugin's DEL), namespaces, and the lab directory with every node's subnet.env and CNI data.

- vxlan (the default), host-gw, udp: two pods join every node through the flannel CNI plugin
  (installed with cloudroutes; run inside the node with Debian's bridge and host-local, as a
  runtime would, reading the node's subnet.env); every pod pings one pod on each other node
  through the routes the agents programmed, a pod on node1 sends to one on node2 for two
  seconds with iperf3, then the leases and each node's routes are printed.
- aws-vpc, ali-vpc, gce: the nodes are instances of that cloud's fake on this machine (moto
  for EC2, the Alibaba VPC and Compute API fakes of cloudroutes.lab, each behind a counting
  proxy, and one metadata server per node, all in a "cloud" namespace on the switch). The
  route table (GCE: the network's routes) is printed as the agents fill it, with the owner
  of each route per the ledger in etcd and the cluster's marker on the route; then one node
  leaves the cluster (its agent stops, its lease is deleted) and the table is printed again
  once the elected agent has removed its route.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_network
from types import FrameType

from cloudroutes.errors import ConfigError
from cloudroutes.lab.cluster import (
    CLOUD_ADDRESS,
    CLOUDS,
    CloudRoute,
    ClusterError,
    LabCluster,
    LabNode,
    LabPod,
    iperf,
)
from cloudroutes.ledger import LedgerEntry, decode_entry, ledger_path, parse_entry_key, within

PREFIX = "/coreos.com/network"
CLOUD_MODES = ("node", "cluster")
# Seconds between the agents' full reads of the table; the default (300) would keep the demo
# waiting minutes for the collector's next look.
DEMO_RESYNC = 5
POLL = 0.5
CONVERGE_TIMEOUT = 90.0
PODS_PER_NODE = 2
IPERF_SECONDS = 2
# A node-mode collector leaves routes alone for their first minute (the node that made one may
# hold a lease it has not heard of yet), then notices at its next read.
LEAVE_TIMEOUT = 60 + 3 * DEMO_RESYNC + 30.0


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def _attach_pods(cluster: LabCluster) -> list[list[LabPod]]:
    """Every node's pods, attached by the CNI plugin once the node's agent wrote subnet.env."""
    say(f"attaching {PODS_PER_NODE} pods per node: CNI ADD of the flannel plugin inside the node "
        f"(CNI_PATH={cluster.cni_path})")  # fmt: skip
    pods = []
    for node in cluster.nodes:
        cluster.wait_ready(node)
        env = node.subnet_env()
        say(f"{node.name} ({node.address}): FLANNEL_SUBNET={env['FLANNEL_SUBNET']} "
            f"FLANNEL_MTU={env['FLANNEL_MTU']}")  # fmt: skip
        mine = [cluster.add_pod(node, f"{node.name}-pod{k}") for k in range(1, PODS_PER_NODE + 1)]
        for pod in mine:
            say(f"  {pod.name} {pod.address} (netns {pod.ns.name})")
        pods.append(mine)
    return pods


def _ping_pods(cluster: LabCluster, pods: list[list[LabPod]]) -> bool:
    """Every pod pings the pod of the same rank on each other node."""
    say("pinging from every pod one pod on each other node")
    ok = True
    for here in pods:
        for there in pods:
            if there is here:
                continue
            for src, dst in zip(here, there, strict=True):
                passed = cluster.ping_pod(src, dst)
                ok &= passed
                mark = "ok  " if passed else "FAIL"
                say(f"  {mark} {src.name} {src.address} -> {dst.name} {dst.address}")
    return ok


def _throughput(src: LabPod, dst: LabPod) -> bool:
    what = f"iperf3 TCP {src.name} {src.address} -> {dst.name} {dst.address}"
    try:
        rate = iperf(src.ns, dst.ns, src.address, dst.address, IPERF_SECONDS)
    except ClusterError as exc:
        say(f"{what}: FAIL ({exc})")
        return False
    say(f"{what}: {rate / 1e9:.2f} Gbit/s over {IPERF_SECONDS} s")
    return True


def _kernel(cluster: LabCluster) -> tuple[bool, bool]:
    """Start the agents, attach pods and show them reaching each other; (pings passed,
    everything passed)."""
    cluster.set_config()
    for node in cluster.nodes:
        cluster.start_agent(node, "--ip-masq")
    pods = _attach_pods(cluster)
    pinged = _ping_pods(cluster, pods)
    measured = pinged and _throughput(pods[0][0], pods[1][0])
    say("leases in etcd (cloudroutes leases):")
    print(cluster.cli_in_etcd_host("leases").stdout, end="")
    for node in cluster.nodes:
        say(f"{node.name}: kernel routes (the agent's carry its own proto number)")
        print(cluster.routes(node), end="")
    return pinged, measured


# --- the cloud backends (aws-vpc, ali-vpc, gce) -------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    """One route of the cloud's route table, as the demo prints it."""

    name: str
    destination: str
    target: str
    state: str
    owner: str


class CloudView:
    """What the demo reads of a cloud cluster: its route table, ledger and leaders (straight
    from the fake and etcd: none of it counts as an agent's call)."""

    def __init__(self, cluster: LabCluster) -> None:
        assert cluster.cloud is not None
        self.cluster = cluster
        self.cloud = cluster.cloud
        self.table_id = cluster.route_table_id
        self.network = ip_network(cluster.network)
        # With no ClusterName in the config, the cluster is named after the etcd prefix.
        self.cluster_name = PREFIX
        self.ledger_prefix = ledger_path(PREFIX, self.cluster_name, self.table_id)

    def node_named(self, text: str) -> str:
        """A node's name for its address or its instance's route target; else the text."""
        for node in self.cluster.nodes:
            if text == node.address or (node.machine and text == node.machine.target):
                return node.name
        return text

    def ledger(self) -> dict[str, LedgerEntry]:
        entries = {}
        for key, value in self.cluster.etcd_get_prefix(self.ledger_prefix).items():
            destination = parse_entry_key(key.removeprefix(self.ledger_prefix))
            if destination is None:
                continue
            try:
                entries[str(destination)] = decode_entry(destination, value.encode())
            except ValueError:
                continue  # unreadable: its route counts as not ours, as the agents count it
        return entries

    def rows(self) -> list[TableRow]:
        ledger = self.ledger()
        rows = []
        for route in self.cloud.routes(self.cluster_name):
            short = route.target.rsplit("/", 1)[-1]  # a GCE instance by its name
            name = self.node_named(route.target)
            shown = short if name == route.target else f"{short} ({name})"
            owner = self._owner(route, ledger.get(route.destination))
            rows.append(TableRow(route.name, route.destination, shown, route.state, owner))
        return rows

    def _owner(self, route: CloudRoute, entry: LedgerEntry | None) -> str:
        """The ledger's rule: made through the API, inside the Network, recorded with this
        target; and whether it carries the cluster's marker, where the cloud has them."""
        if route.made_by_cloud:
            return route.made_by_cloud
        try:
            destination = ip_network(route.destination)
        except ValueError:
            return "not cloudroutes' (unreadable destination)"
        if not within(destination, [self.network]):
            return "not cloudroutes' (outside its Network)"
        if entry is None:
            return "not cloudroutes' (not in its ledger)"
        if not route.ledger_target or not entry.owns(route.ledger_target):
            return f"not cloudroutes' (its ledger records {entry.target})"
        marker = {None: "", True: ", marked", False: ", no marker (adopted)"}[route.marked]
        return f"cloudroutes (ledger: written by {self.node_named(entry.by)}{marker})"

    def leaders(self) -> dict[str, str]:
        """Each elected duty (e.g. gce-gc, ali-vpc-controller) and the node holding it."""
        out = {}
        prefix = f"{PREFIX}/cloudroutes/leader/"
        for key, value in self.cluster.etcd_get_prefix(prefix).items():
            try:
                candidate = str(json.loads(value).get("candidate", "?"))
            except (ValueError, AttributeError):
                candidate = "?"
            out[key.rsplit("/", 1)[-1]] = self.node_named(candidate)
        return out

    def calls(self) -> str:
        assert self.cloud.proxy is not None
        counts = self.cloud.proxy.counts()
        actions = ", ".join(f"{a} {n}" for a, n in sorted(counts.by_action.items()))
        return f"{counts.reads} reads, {counts.writes} writes ({actions})"


class TableWatch:
    """Prints the route table whenever it changes, with the time since the agents started."""

    def __init__(self, view: CloudView) -> None:
        self.view = view
        self.started = time.monotonic()
        self._last: list[TableRow] | None = None

    def until(self, done: Callable[[dict[str, str]], bool], timeout: float, what: str) -> bool:
        """Poll the table until ``done`` holds for {destination: node name or target}; False
        on a timeout or an agent that exited."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.view.rows()
            if rows != self._last:
                self._print(rows)
                self._last = rows
            if done({r.destination: r.target for r in rows}):
                return True
            for node in self.view.cluster.nodes:
                if node.agent is not None and node.agent.poll() is not None:
                    say(f"{node.name}'s agent exited; its log ends:\n{node.log_tail()}")
                    return False
            if time.monotonic() > deadline:
                say(f"gave up after {timeout:.0f} s waiting for {what}")
                return False
            time.sleep(POLL)

    def _print(self, rows: list[TableRow]) -> None:
        elapsed = time.monotonic() - self.started
        view = self.view
        say(f"route table {view.table_id} ({view.cloud.listing}) at {elapsed:.1f} s:")
        head = TableRow("NAME", "DESTINATION", "TARGET", "STATE", "OWNER")
        cells = [(r.name, r.destination, r.target, r.state) for r in (head, *rows)]
        widths = [max(len(row[k]) for row in cells) for k in range(4)]
        for row, shown in zip((head, *rows), cells, strict=True):
            line = "  ".join(c.ljust(w) for c, w in zip(shown, widths, strict=True))
            print(f"    {line}  {row.owner}", flush=True)


def _routed(node: LabNode) -> tuple[str, str]:
    """The node's subnet, and its route's target as the table shows it."""
    assert node.machine is not None
    return node.subnet, f"{node.machine.target.rsplit('/', 1)[-1]} ({node.name})"


def _cloud(cluster: LabCluster, mode: str) -> bool:
    """Start the agents and show the table filling, then one node leaving."""
    view = CloudView(cluster)
    cluster.set_config()
    for node in cluster.nodes:
        cluster.start_agent(node, "--ip-masq")
    watch = TableWatch(view)
    say("no pings here: the fake cloud keeps route tables but carries no packets; the table is "
        "the proof")  # fmt: skip
    names = {f"({node.name})" for node in cluster.nodes}
    converged = watch.until(
        lambda table: names <= {t.split(" ")[-1] for t in table.values()},
        CONVERGE_TIMEOUT,
        "a route to every node",
    )
    if not converged:
        return False
    for node in cluster.nodes:
        cluster.wait_ready(node)
        assert node.machine is not None
        say(
            f"{node.name} ({node.address}): {node.machine.shown}, "
            f"FLANNEL_SUBNET={node.subnet_env()['FLANNEL_SUBNET']}"
        )
    want = dict(_routed(node) for node in cluster.nodes)
    if not watch.until(
        lambda table: all(table.get(d) == t for d, t in want.items()),
        CONVERGE_TIMEOUT,
        "every node's subnet routed to its instance",
    ):
        return False
    say(f"converged: every node's subnet routes to its instance; API calls so far: {view.calls()}")
    leaders = view.leaders()
    for duty, holder in sorted(leaders.items()):
        say(f"elected for {duty}: {holder}")
    leaving = next(
        (n for n in reversed(cluster.nodes) if n.name not in leaders.values()), cluster.nodes[-1]
    )
    subnet, target = _routed(leaving)
    say(f"{leaving.name} leaves the cluster: its agent stops, then its lease is deleted")
    cluster.stop_agent(leaving)
    assert cluster.etcd is not None
    cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/{subnet.replace('/', '-')}")
    if mode == "node":
        say(
            "the elected collector leaves routes alone for their first minute (their node may "
            "hold a lease it has not heard of yet), then deletes it at its next read "
            f"(ResyncPeriod {DEMO_RESYNC} s here)"
        )
    else:
        say("the elected writer deletes its route as soon as it sees the lease deleted")
    others = {d: t for d, t in want.items() if d != subnet}
    gone = watch.until(
        lambda table: subnet not in table and all(table.get(d) == t for d, t in others.items()),
        LEAVE_TIMEOUT,
        f"{leaving.name}'s route {subnet} -> {target} to go",
    )
    if gone:
        say(f"{leaving.name}'s route is gone, the others stayed; API calls: {view.calls()}")
    return gone


# --- the verb ----------------------------------------------------------------------------------


def run_demo(*, backend: str, nodes: int, keep: bool, mode: str | None = None) -> int:
    if os.geteuid() != 0:
        raise ConfigError("the demo builds network namespaces and needs root; run it with sudo")
    if nodes < 2:
        raise ConfigError("--nodes must be at least 2 for nodes to reach each other")
    cloud = backend in CLOUDS
    if mode is not None and not cloud:
        raise ConfigError(
            f"--mode is an option of the cloud backends ({', '.join(CLOUDS)}); leave it out "
            f"for {backend}"
        )
    mode = mode or "node"
    if mode not in CLOUD_MODES:
        raise ConfigError(f'--mode must be "node" or "cluster", got {mode!r}')
    missing = [m for m in (CLOUDS[backend].modules if cloud else ()) if not _installed(m)]
    if missing:
        raise ConfigError(
            f"the {backend} demo needs {', '.join(missing)}, not installed here; run "
            f"`make demo BACKEND={backend}`, or pip install 'cloudroutes[all,test]'"
        )

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Explicitly, also for SIGINT: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    options = {"Mode": mode, "ResyncPeriod": DEMO_RESYNC} if cloud else {}
    cluster = LabCluster(nodes, backend=backend, backend_options=options)
    try:
        where = f" and {CLOUDS[backend].what} at {CLOUD_ADDRESS}" if cloud else ""
        say(f"building {nodes} nodes, an etcd machine{where} on 198.18.0.0/24 (backend {backend})")
        cluster.build()
        mode_text = f", Mode {mode}" if cloud else ""
        say(
            f"writing the network config{mode_text}; starting one agent per node "
            f"(logs: {cluster.workdir})"
        )
        pinged = True
        if cloud:
            ok = _cloud(cluster, mode)
        else:
            pinged, ok = _kernel(cluster)
        if keep:
            say("cluster is up; press Ctrl-C to tear it down")
            signal.pause()
        if not cloud:
            say("all pings passed" if pinged else "some pings failed")
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        say("cleaning up")
        cluster.close()

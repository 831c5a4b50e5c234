"""``cloudroutes demo``: a small cluster on this machine, in network namespaces.

It builds a lab cluster (a switch, an etcd machine and N nodes on 198.18.0.0/24) and runs a real
agent on every node. Everything is removed at the end, also on Ctrl-C.

- host-gw: every node's subnet gateway pings every other node's through the routes the agents
  programmed; then the leases and each node's routes are printed.
- aws-vpc: the nodes are instances of a fake AWS on this machine (moto behind a counting
  proxy, and one instance metadata service per node, in a "cloud" namespace on the switch).
  The VPC route table is printed as the agents fill it, with the owner of each route per the
  ledger in etcd; then one node leaves the cluster (its agent stops, its lease is deleted) and
  the table is printed again once the elected agent has removed its route.
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
from cloudroutes.lab.cluster import AWS_VPC, LabCluster, LabNode
from cloudroutes.ledger import LedgerEntry, decode_entry, ledger_path, parse_entry_key, within

PREFIX = "/coreos.com/network"
AWS_MODES = ("node", "cluster")
# Seconds between the agents' full reads of the table; the default (300) would keep the demo
# waiting minutes for the collector's next look.
DEMO_RESYNC = 5
POLL = 0.5
CONVERGE_TIMEOUT = 90.0
# A node-mode collector leaves routes alone for their first minute (the node that made one may
# hold a lease it has not heard of yet), then notices at its next read.
LEAVE_TIMEOUT = 60 + 3 * DEMO_RESYNC + 30.0


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


# --- aws-vpc -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    """One route of the VPC route table, as the demo prints it."""

    destination: str
    target: str
    state: str
    owner: str


class AwsView:
    """What the demo reads of an aws-vpc lab cluster: its route table, ledger and leaders."""

    def __init__(self, cluster: LabCluster) -> None:
        assert cluster.aws is not None
        self.cluster = cluster
        self.aws = cluster.aws
        self.table_id = cluster.route_table_id
        self.network = ip_network(cluster.network)
        # With no ClusterName in the config, the cluster is named after the etcd prefix.
        self.ledger_prefix = ledger_path(PREFIX, PREFIX, self.table_id)

    def node_named(self, text: str) -> str:
        """A node's name for its address or ENI id; the text itself for anything else."""
        for node in self.cluster.nodes:
            if text == node.address or (node.instance and text == node.instance.eni_id):
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
        """DescribeRouteTables of the table (straight to moto: not counted as an agent call)."""
        listing = self.aws.admin().describe_route_tables(RouteTableIds=[self.table_id])
        ledger = self.ledger()
        rows = []
        for route in listing["RouteTables"][0]["Routes"]:
            destination = route.get("DestinationCidrBlock") or route.get(
                "DestinationIpv6CidrBlock", "?"
            )
            target = (
                route.get("NetworkInterfaceId")
                or route.get("InstanceId")
                or route.get("GatewayId")
                or "?"
            )
            name = self.node_named(target)
            shown = target if name == target else f"{target} ({name})"
            rows.append(
                TableRow(destination, shown, route.get("State", "?"), self._owner(route, ledger))
            )
        return rows

    def _owner(self, route: dict[str, str], ledger: dict[str, LedgerEntry]) -> str:
        """The ledger's rule: made by CreateRoute, inside the Network, recorded with this
        target."""
        destination = route.get("DestinationCidrBlock", "")
        entry = ledger.get(destination)
        target = route.get("NetworkInterfaceId", "")
        if route.get("Origin") != "CreateRoute":
            return f"AWS ({route.get('Origin', '?')})"
        if not within(ip_network(destination), [self.network]):
            return "not cloudroutes' (outside its Network)"
        if entry is None:
            return "not cloudroutes' (not in its ledger)"
        if not entry.owns(target):
            return f"not cloudroutes' (its ledger records {entry.target})"
        return f"cloudroutes (ledger: written by {self.node_named(entry.by)})"

    def leaders(self) -> dict[str, str]:
        """Each elected duty (aws-vpc-gc, aws-vpc-controller) and the node holding it."""
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
        assert self.aws.proxy is not None
        counts = self.aws.proxy.counts()
        actions = ", ".join(f"{a} {n}" for a, n in sorted(counts.by_action.items()))
        return f"{counts.reads} reads, {counts.writes} writes ({actions})"


class TableWatch:
    """Prints the route table whenever it changes, with the time since the agents started."""

    def __init__(self, view: AwsView) -> None:
        self.view = view
        self.started = time.monotonic()
        self._last: list[TableRow] | None = None

    def until(self, done: Callable[[dict[str, str]], bool], timeout: float, what: str) -> bool:
        """Poll the table until ``done`` holds for {destination: target}; False on a timeout
        or an agent that exited."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.view.rows()
            if rows != self._last:
                self._print(rows)
                self._last = rows
            if done({r.destination: r.target.split(" ")[0] for r in rows}):
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
        say(f"route table {self.view.table_id} (DescribeRouteTables) at {elapsed:.1f} s:")
        head = TableRow("DESTINATION", "TARGET", "STATE", "OWNER")
        every = [head, *rows]
        widths = [max(len(r.destination) for r in every), max(len(r.target) for r in every)]
        widths.append(max(len(r.state) for r in every))
        for row in every:
            cells = (row.destination, row.target, row.state)
            line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
            print(f"    {line}  {row.owner}", flush=True)


def _wanted(node: LabNode) -> tuple[str, str]:
    assert node.instance is not None
    return node.subnet, node.instance.eni_id


def _aws_vpc(cluster: LabCluster, mode: str) -> bool:
    """Start the agents and show the table filling, then one node leaving."""
    view = AwsView(cluster)
    cluster.set_config()
    for node in cluster.nodes:
        cluster.start_agent(node, "--ip-masq")
    watch = TableWatch(view)
    say("no pings here: moto keeps route tables but carries no packets; the table is the proof")
    enis = {node.instance.eni_id for node in cluster.nodes if node.instance is not None}
    converged = watch.until(
        lambda table: enis <= set(table.values()), CONVERGE_TIMEOUT, "a route to every node"
    )
    if not converged:
        return False
    for node in cluster.nodes:
        cluster.wait_ready(node)
        assert node.instance is not None
        say(
            f"{node.name} ({node.address}): instance {node.instance.instance_id}, ENI "
            f"{node.instance.eni_id}, FLANNEL_SUBNET={node.subnet_env()['FLANNEL_SUBNET']}"
        )
    want = dict(_wanted(node) for node in cluster.nodes)
    if not watch.until(
        lambda table: all(table.get(d) == eni for d, eni in want.items()),
        CONVERGE_TIMEOUT,
        "every node's subnet routed to its ENI",
    ):
        return False
    say(f"converged: every node's subnet routes to its ENI; EC2 calls so far: {view.calls()}")
    leaders = view.leaders()
    for duty, holder in sorted(leaders.items()):
        say(f"elected for {duty}: {holder}")
    leaving = next(
        (n for n in reversed(cluster.nodes) if n.name not in leaders.values()), cluster.nodes[-1]
    )
    subnet, eni = _wanted(leaving)
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
    others = {d: e for d, e in want.items() if d != subnet}
    gone = watch.until(
        lambda table: subnet not in table and all(table.get(d) == e for d, e in others.items()),
        LEAVE_TIMEOUT,
        f"{leaving.name}'s route {subnet} -> {eni} to go",
    )
    if gone:
        say(f"{leaving.name}'s route is gone, the others stayed; EC2 calls: {view.calls()}")
    return gone


# --- the verb ----------------------------------------------------------------------------------


def run_demo(*, backend: str, nodes: int, keep: bool, mode: str | None = None) -> int:
    if os.geteuid() != 0:
        raise ConfigError("the demo builds network namespaces and needs root; run it with sudo")
    if nodes < 2:
        raise ConfigError("--nodes must be at least 2 for nodes to reach each other")
    if mode is not None and backend != AWS_VPC:
        raise ConfigError(f"--mode is an option of --backend {AWS_VPC}; leave it out for {backend}")
    mode = mode or "node"
    if mode not in AWS_MODES:
        raise ConfigError(f'--mode must be "node" or "cluster", got {mode!r}')
    cloud = backend == AWS_VPC
    if cloud and not all(importlib.util.find_spec(m) for m in ("moto", "boto3")):
        raise ConfigError(
            "the aws-vpc demo runs a fake AWS with moto and boto3, which are not installed; "
            "run `make demo BACKEND=aws-vpc`, or pip install 'cloudroutes[aws,test]'"
        )

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Explicitly, also for SIGINT: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    options = {"Mode": mode, "ResyncPeriod": DEMO_RESYNC} if cloud else {}
    cluster = LabCluster(nodes, backend=backend, backend_options=options)
    try:
        where = " and a fake AWS (moto, IMDS) on 198.18.0.253" if cloud else ""
        say(f"building {nodes} nodes, an etcd machine{where} on 198.18.0.0/24 (backend {backend})")
        cluster.build()
        mode_text = f", Mode {mode}" if cloud else ""
        say(
            f"writing the network config{mode_text}; starting one agent per node "
            f"(logs: {cluster.workdir})"
        )
        if cloud:
            ok = _aws_vpc(cluster, mode)
        else:
            cluster.start("--ip-masq")
            ok = _show_cluster(cluster)
        if keep:
            say("cluster is up; press Ctrl-C to tear it down")
            signal.pause()
        if not cloud:
            say("all pings passed" if ok else "some pings failed")
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        say("cleaning up")
        cluster.close()

"""EC2 API cost of aws-vpc: calls and time, node mode and cluster mode, against flannel's way.

Everything runs in this process: moto's EC2 behind the counting fault proxy (no fault added, so
no route limit: moto has none, and the backend's RouteLimit is set past every size, as after a
raised quota), a real etcd for the ledger and the elections, and for each simulated agent the
real AwsVpcBackend bindings driven by the real Reconciler. Calls are the proxy's counts.

Scenarios, for N leases (one node each, every route in one table):

(a) full convergence from an empty table: every agent's first pass (node mode: each agent
    reads the table and creates its own route; the elected collector reads it too), or the
    elected writer's passes until nothing is left to do (cluster mode);
(b) a steady resync: every reconciler reads the table again, nothing to write;
(c) one lease change: a node joins (its agent's first pass), then a node leaves (its lease
    is deleted; the elected agent deletes its route).

The baseline, measured in the same run, is flannel v0.19's aws-vpc, which on every start of a
node describes the table (to clean blackhole routes), deletes its own route and creates it
again, and otherwise never calls EC2: it has no resync (its only way to re-assert the table is
restarting every node, the (b) baseline) and never removes a dead node's route.

Shrunk: moto answers DescribeRouteTables in about 0.45 ms per route, so N agents each reading
an N-route table cost about N^2 / 2 * 0.45 ms (4 minutes at 1,000, for each of (a) and (b)).
Node mode and the flannel baseline are therefore run with all N agents only up to
ALL_AGENTS leases; above that, SAMPLE agents are measured on the full table (which cluster mode
converged): (b) is then per node, (a) is not measured for them, and cluster mode, measured
whole at every size, is set against flannel's calls for the whole cluster as N times one node's
start (its calls do not depend on the table: 1 read, 2 writes; its time does, so no time is
extrapolated).

Not counted on either side: the start-up calls both make once per node (instance metadata,
the source/destination check), and the simulated agents share one boto3 client (1,000 clients
would cost seconds and gigabytes; the proxy counts the calls either way). Only one agent
campaigns in each election: the others' campaigns cost etcd calls, never EC2 ones.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from bench import Figure
from cloudroutes.backend import BackendContext, Coordination, ExternalInterface
from cloudroutes.config import NetworkConfig, parse_config
from cloudroutes.errors import CloudroutesError
from cloudroutes.lab.aws import DEFAULT_REGION, EC2Client, LabVpc, MotoServer, ec2_client, make_vpc
from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.lab.fault_proxy import FaultProxy
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.lease_table import EventType, LeaseEvent, LeaseTable
from cloudroutes.routing import Routing, node_vetting
from cloudroutes.subnet.etcd_client import EtcdClient, EtcdSettings
from providers import aws_route_table, aws_vpc

SIZES = (50, 500, 1000)
SHORT_SIZES = (50,)
ALL_AGENTS = 50
SAMPLE = 10
PREFIX = "/coreos.com/network"
NETWORK = "10.0.0.0/8"
ROUTE_LIMIT = 2000  # past every size: the quota raised, as 1,000 routes need
MAX_PASSES = 20
FLANNEL = "flannel-style"


class BenchError(CloudroutesError):
    """The bench did not get the table it set out to measure."""


@dataclass(frozen=True)
class Cost:
    """EC2 calls (the proxy's counts) and wall time of one piece of work."""

    reads: float  # a mean per agent need not be whole
    writes: float
    seconds: float

    @property
    def calls(self) -> float:
        return self.reads + self.writes

    def per(self, agents: int) -> Cost:
        return Cost(self.reads / agents, self.writes / agents, self.seconds / agents)

    def shown(self) -> str:
        return f"{self.reads:g} reads + {self.writes:g} writes"


class CloudLab:
    """moto behind the counting proxy, a VPC with an ENI per node, and a real etcd."""

    def __init__(self, nodes: int) -> None:
        self._stack = contextlib.ExitStack()
        try:
            self.moto = self._stack.enter_context(MotoServer())
            self.proxy = self._stack.enter_context(FaultProxy(self.moto.url))
            self.etcd = EtcdCluster().start()
            self._stack.callback(self.etcd.close)
            self.client = EtcdClient(EtcdSettings(endpoints=(self.etcd.endpoint,)))
            self._stack.callback(self.client.close)
            self.admin = ec2_client(self.moto.url, DEFAULT_REGION, max_attempts=1)
            self.vpc: LabVpc = make_vpc(self.admin, nodes=0, tables=1)
            # The agents' client: through the proxy, SDK retries off as the backend has them,
            # and the lab's dummy keys.
            self.ec2: EC2Client = ec2_client(
                self.proxy.url, DEFAULT_REGION, max_attempts=1, read_timeout=aws_vpc.READ_TIMEOUT
            )
            self.enis = [self._eni(i) for i in range(nodes)]
        except BaseException:
            self._stack.close()
            raise

    def _eni(self, i: int) -> tuple[str, IPv4Address]:
        # An address of its own (moto would draw them at random, and two nodes sharing one
        # would refuse each other's leases).
        ip = IPv4Network(self.vpc.cidr).network_address + 10 + i
        eni = self.admin.create_network_interface(
            SubnetId=self.vpc.subnet_id, PrivateIpAddress=str(ip)
        )["NetworkInterface"]
        return eni["NetworkInterfaceId"], ip

    def new_table(self) -> str:
        return self.admin.create_route_table(VpcId=self.vpc.vpc_id)["RouteTable"]["RouteTableId"]

    def routes(self, table_id: str) -> dict[str, str]:
        """The table's routes to ENIs: destination -> ENI (straight to moto, not counted)."""
        listing = self.admin.describe_route_tables(RouteTableIds=[table_id])["RouteTables"][0]
        return {
            r["DestinationCidrBlock"]: r["NetworkInterfaceId"]
            for r in listing["Routes"]
            if "NetworkInterfaceId" in r
        }

    def lease(self, i: int) -> Lease:
        """Node i's lease, as its agent publishes it."""
        eni, ip = self.enis[i]
        return Lease(
            subnet=IPv4Network(f"10.{1 + i // 256}.{i % 256}.0/24"),
            attrs=LeaseAttrs(
                public_ip=ip,
                backend_type=aws_vpc.BACKEND_TYPE,
                backend_data={"NetworkInterfaceID": eni, "Region": DEFAULT_REGION},
            ),
            store_lease_id=1000 + i,
        )

    def measure(self, work: Callable[[], object]) -> Cost:
        self.proxy.reset_counts()
        started = time.perf_counter()
        work()
        seconds = time.perf_counter() - started
        counts = self.proxy.counts()
        return Cost(counts.reads, counts.writes, seconds)

    def expect(self, table_id: str, leases: Sequence[Lease], what: str) -> None:
        want = {
            str(lease.subnet): lease.attrs.backend_data["NetworkInterfaceID"] for lease in leases
        }
        if self.routes(table_id) != want:
            raise BenchError(f"{what}: the table does not hold exactly the leases' routes")

    def close(self) -> None:
        self._stack.close()


@contextlib.contextmanager
def simulated_agents(lab: CloudLab) -> Iterator[None]:
    """The provider's seams for many agents in one process: one shared EC2 client, each
    agent's identity without an IMDS round trip, and no minute of grace before the collector
    may judge a route (the bench cannot wait it out)."""
    identities = {
        str(ip): aws_vpc.NodeIdentity(f"i-{eni[4:]}", DEFAULT_REGION, "", eni, "", lab.vpc.vpc_id)
        for eni, ip in lab.enis
    }
    saved = (aws_vpc.ec2_client, aws_vpc.discover, aws_route_table.LEDGER_GRACE)
    aws_vpc.ec2_client = lambda region: lab.ec2  # type: ignore[assignment]
    aws_vpc.discover = lambda imds, address: identities[str(address)]  # type: ignore[assignment]
    aws_route_table.LEDGER_GRACE = 0.0
    try:
        yield
    finally:
        aws_vpc.ec2_client, aws_vpc.discover, aws_route_table.LEDGER_GRACE = saved


class Agent:
    """One node's aws-vpc part: its backend's bindings under the real reconcilers."""

    def __init__(
        self, lab: CloudLab, config: NetworkConfig, leases: LeaseTable, i: int, candidate: bool
    ) -> None:
        own = lab.lease(i)
        iface = ExternalInterface("eth0", 2, 9001, own.public_ip, own.public_ip)
        ctx = BackendContext(config, iface, Coordination(lab.client, PREFIX, f"node-{i}"))
        self.backend = aws_vpc.AwsVpcBackend(ctx)
        self.vetting = node_vetting(config, self.backend, own, iface, [lab.etcd.endpoint])
        self.routing = Routing(self.backend, self.backend.bind(own), leases, self.vetting)
        self.stop = threading.Event()
        self.threads = []
        if candidate:
            for name, task in self.backend.tasks():
                thread = threading.Thread(target=task, args=(self.stop,), name=name, daemon=True)
                thread.start()
                self.threads.append(thread)
            deadline = time.monotonic() + 30
            while not self.backend.election().is_leader():
                if time.monotonic() > deadline:
                    raise BenchError("the candidate was not elected within 30 s")
                time.sleep(0.05)

    def passes(self, *, resync: bool) -> bool:
        """One pass of each reconciler; whether any of them planned a change."""
        planned = False
        for reconciler in self.routing.reconcilers:
            planned |= bool(reconciler.reconcile(resync=resync).plan)
        return planned

    def converge(self) -> None:
        """Passes until one plans nothing (the first reads the table, as an agent's does)."""
        for n in range(MAX_PASSES):
            if not self.passes(resync=n == 0) and n > 0:
                return
        raise BenchError(f"not converged after {MAX_PASSES} passes")

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=20)


class Scenario:
    """One table, one lease table and the agents of one mode for it."""

    def __init__(self, lab: CloudLab, mode: str, n: int, table_id: str, cluster: str) -> None:
        self.lab = lab
        self.table_id = table_id
        self.config = parse_config(
            json.dumps(
                {
                    "Network": NETWORK,
                    "Backend": {
                        "Type": aws_vpc.BACKEND_TYPE,
                        "Mode": mode,
                        "RouteTableID": table_id,
                        "ClusterName": cluster,
                        "RouteLimit": ROUTE_LIMIT,
                    },
                }
            )
        )
        self.live = list(range(n))
        self.leases = LeaseTable()
        self.leases.replace_all([lab.lease(i) for i in self.live], revision=1)
        self._revision = 1
        self.agents: dict[int, Agent] = {}

    def agent(self, i: int, candidate: bool = False) -> Agent:
        self.agents[i] = Agent(self.lab, self.config, self.leases, i, candidate)
        return self.agents[i]

    def join(self, i: int) -> None:
        self.live.append(i)
        self._event(EventType.ADDED, i)

    def leave(self, i: int) -> None:
        self.live.remove(i)
        agent = self.agents.pop(i, None)
        if agent is not None:
            agent.close()
        self._event(EventType.REMOVED, i)

    def _event(self, kind: EventType, i: int) -> None:
        self._revision += 1
        self.leases.apply([LeaseEvent(kind, self.lab.lease(i))], revision=self._revision)

    def passes(self, *, resync: bool) -> None:
        for agent in self.agents.values():
            agent.passes(resync=resync)

    def first_pass(self, newcomer: int) -> None:
        """A new node's agent makes its first pass; the others hear of its lease."""
        for i, agent in self.agents.items():
            agent.passes(resync=i == newcomer)

    def expect(self, what: str) -> None:
        self.lab.expect(self.table_id, [self.lab.lease(i) for i in self.live], what)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.close()


# --- flannel v0.19's aws-vpc, per node --------------------------------------------------------


def flannel_start(lab: CloudLab, table_id: str, i: int) -> None:
    """What flanneld's aws-vpc does for one table at every start of node i."""
    ec2 = lab.ec2
    network = IPv4Network(NETWORK)
    listing = ec2.describe_route_tables(RouteTableIds=[table_id])["RouteTables"][0]["Routes"]
    for route in listing:  # blackhole routes inside the Network
        cidr = route.get("DestinationCidrBlock")
        if route.get("State") == "blackhole" and cidr and IPv4Network(cidr).subnet_of(network):
            ec2.delete_route(RouteTableId=table_id, DestinationCidrBlock=cidr)
    lease = lab.lease(i)
    with contextlib.suppress(ec2.exceptions.ClientError):  # InvalidRoute.NotFound
        ec2.delete_route(RouteTableId=table_id, DestinationCidrBlock=str(lease.subnet))
    ec2.create_route(
        RouteTableId=table_id,
        DestinationCidrBlock=str(lease.subnet),
        NetworkInterfaceId=lease.attrs.backend_data["NetworkInterfaceID"],
    )


# --- the measurements -------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """One approach's costs at one size (None: not measured there)."""

    converge: Cost | None
    resync: Cost
    join: Cost
    leave: Cost | None


def cluster_mode(lab: CloudLab, n: int) -> tuple[Costs, Scenario]:
    """The elected writer's costs, and the scenario (its table now holds n routes)."""
    s = Scenario(lab, "cluster", n, lab.new_table(), f"bench-{n}")
    try:
        leader = s.agent(0, candidate=True)
        converge = lab.measure(leader.converge)
        s.expect("cluster mode, converged")
        resync = lab.measure(lambda: leader.passes(resync=True))
        s.join(n)
        join = lab.measure(lambda: leader.passes(resync=False))
        s.leave(n - 1)
        leave = lab.measure(lambda: leader.passes(resync=False))
        s.expect("cluster mode, after a join and a leave")
    except BaseException:
        s.close()
        raise
    return Costs(converge, resync, join, leave), s


def node_mode_all(lab: CloudLab, n: int) -> Costs:
    s = Scenario(lab, "node", n, lab.new_table(), f"bench-node-{n}")
    try:
        for i in range(n):
            s.agent(i, candidate=i == 0)  # node 0 is the elected collector
        converge = lab.measure(lambda: s.passes(resync=True))
        s.expect("node mode, converged")
        resync = lab.measure(lambda: s.passes(resync=True))
        s.join(n)
        s.agent(n)
        join = lab.measure(lambda: s.first_pass(n))
        s.leave(n - 1)
        leave = lab.measure(lambda: s.passes(resync=False))
        s.expect("node mode, after a join and a leave")
        return Costs(converge, resync, join, leave)
    finally:
        s.close()


def node_mode_sampled(lab: CloudLab, n: int, table: Scenario) -> Costs:
    """SAMPLE agents on the n-route table cluster mode made (the same cluster's ledger)."""
    s = Scenario(lab, "node", 0, table.table_id, f"bench-{n}")
    s.live = list(table.live)
    s.leases.replace_all([lab.lease(i) for i in s.live], revision=1)
    try:
        sample = s.live[:: max(1, len(s.live) // SAMPLE)][:SAMPLE]
        collector = s.agent(sample[0], candidate=True)
        collector.passes(resync=True)  # the collector's first read, not measured
        for i in sample[1:]:
            s.agent(i)
        resync = lab.measure(
            lambda: [s.agents[i].routing.reconcilers[0].reconcile(resync=True) for i in sample]
        ).per(len(sample))
        newcomer = n + 1
        s.join(newcomer)
        s.agent(newcomer)
        join = lab.measure(lambda: s.first_pass(newcomer))
        s.leave(sample[-1])
        leave = lab.measure(lambda: s.passes(resync=False))
        s.expect("node mode, sampled, after a join and a leave")
        return Costs(None, resync, join, leave)
    finally:
        s.close()


def flannel_all(lab: CloudLab, n: int) -> Costs:
    table_id = lab.new_table()
    converge = lab.measure(lambda: [flannel_start(lab, table_id, i) for i in range(n)])
    lab.expect(table_id, [lab.lease(i) for i in range(n)], "flannel-style, converged")
    restart = lab.measure(lambda: [flannel_start(lab, table_id, i) for i in range(n)])
    join = lab.measure(lambda: flannel_start(lab, table_id, n))
    return Costs(converge, restart, join, None)


def flannel_sampled(lab: CloudLab, n: int, table: Scenario) -> Costs:
    sample = table.live[:: max(1, len(table.live) // SAMPLE)][:SAMPLE]
    restart = lab.measure(lambda: [flannel_start(lab, table.table_id, i) for i in sample]).per(
        len(sample)
    )
    join = lab.measure(lambda: flannel_start(lab, table.table_id, n + 1))
    return Costs(None, restart, join, None)


# --- figures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """What a figure is set against: a cost, how it is named, and whether its time was measured
    (an extrapolated one gives calls only)."""

    cost: Cost | None
    name: str
    timed: bool = True


def pair(name: str, cost: Cost, base: Baseline) -> Iterator[Figure]:
    """Two figures: the EC2 calls and the time, each against the baseline (named in the
    figure when it has no cost to set against)."""
    if base.cost is None:
        name = f"{name} [{base.name}]"
    calls = float(base.cost.calls) if base.cost else None
    shown = f"{base.name} ({base.cost.shown()})" if base.cost else base.name
    yield Figure(
        f"{name}: EC2 calls ({cost.shown()})",
        float(cost.calls),
        "calls",
        baseline=calls,
        baseline_name=shown,
    )
    timed = base.cost is not None and base.timed
    yield Figure(
        f"{name}: time",
        cost.seconds,
        baseline=base.cost.seconds if timed and base.cost else None,
        baseline_name=base.name if timed else "",
    )


def changes(head: str, ours: Costs, flannel: Costs) -> Iterator[Figure]:
    """(c): a node joins, then one leaves."""
    yield from pair(f"{head}, (c) a node joins", ours.join, Baseline(flannel.join, FLANNEL))
    if ours.leave is not None:
        stays = Baseline(None, f"{FLANNEL}: no call, and the route stays for good")
        yield from pair(f"{head}, (c) a node leaves", ours.leave, stays)


def whole(n: int, mode: str, ours: Costs, flannel: Costs) -> Iterator[Figure]:
    """Figures of a size where every agent ran."""
    assert ours.converge is not None and flannel.converge is not None
    head = f"{n} leases, {mode} mode"
    converge = Baseline(flannel.converge, FLANNEL)
    yield from pair(f"{head}, (a) full convergence", ours.converge, converge)
    restart = Baseline(flannel.resync, f"{FLANNEL} restart of every node (it has no resync)")
    yield from pair(f"{head}, (b) steady resync", ours.resync, restart)
    yield from changes(head, ours, flannel)


def sampled(n: int, node: Costs, cluster: Costs, flannel: Costs) -> Iterator[Figure]:
    """Figures of a size where node mode and flannel ran SAMPLE agents on the full table."""
    each = f"per node (mean of {SAMPLE})"
    head = f"{n} leases, node mode"
    restart = Baseline(flannel.resync, f"{FLANNEL} restart (it has no resync), {each}")
    yield from pair(f"{head}, (b) steady resync {each}", node.resync, restart)
    yield from changes(head, node, flannel)
    # flannel's whole cluster at this size: n times one node's start, whose calls do not
    # depend on the table (1 read, 2 writes); its time does, so it is not extrapolated.
    scaled = Cost(flannel.resync.reads * n, flannel.resync.writes * n, 0.0)
    head = f"{n} leases, cluster mode"
    assert cluster.converge is not None
    every = Baseline(scaled, f"{FLANNEL}, {n} x one node's start", timed=False)
    yield from pair(f"{head}, (a) full convergence", cluster.converge, every)
    every = Baseline(scaled, f"{FLANNEL} restart of every node, {n} x one node's", timed=False)
    yield from pair(f"{head}, (b) steady resync", cluster.resync, every)
    yield from changes(head, cluster, flannel)


def measure(lab: CloudLab, n: int) -> Iterator[Figure]:
    cluster, table = cluster_mode(lab, n)
    try:
        if n <= ALL_AGENTS:
            node, flannel = node_mode_all(lab, n), flannel_all(lab, n)
        else:
            node = node_mode_sampled(lab, n, table)
            flannel = flannel_sampled(lab, n, table)
    finally:
        table.close()
    if n <= ALL_AGENTS:
        yield from whole(n, "node", node, flannel)
        yield from whole(n, "cluster", cluster, flannel)
    else:
        yield from sampled(n, node, cluster, flannel)


def run(short: bool = False) -> Iterator[Figure]:
    sizes = SHORT_SIZES if short else SIZES
    lab = CloudLab(max(sizes) + 2)
    try:
        with simulated_agents(lab):
            for n in sizes:
                yield from measure(lab, n)
    finally:
        lab.close()

"""Cloud API cost of aws-vpc, ali-vpc and gce: calls and time, node mode and cluster mode,
against flannel v0.19's per-node way, each cloud in the same run as its baseline.

Everything runs in this process: each cloud's fake (moto's EC2, the Alibaba VPC API and Compute
API fakes of cloudroutes.lab) behind the counting fault proxy (no fault added; quotas raised
past every size, and the backend's RouteLimit too), a real etcd for the ledger and the
elections, and for each simulated agent the real backend's bindings driven by the real
Reconciler. Calls are the proxy's counts. What is particular to a cloud (its fake, its
leases, the provider's seams for many agents in one process, flanneld's start) is its driver:
bench/_cloud_aws.py, _cloud_ali.py, _cloud_gce.py.

Scenarios, for N leases (one node each, every route in one table; GCE: one network):

(a) full convergence from an empty table: every agent's first pass (node mode: each agent
    reads the table and creates its own route; the elected collector reads it too), or the
    elected writer's passes until nothing is left to do (cluster mode: one batch of creates
    per 50 entries on Alibaba, one insert per route on GCE with at most MAX_IN_FLIGHT
    operations in flight, waited on);
(b) a steady resync: every reconciler reads the table again, nothing to write;
(c) one lease change: a node joins (its agent's first pass), then a node leaves (its lease
    is deleted; the elected agent deletes its route).

The baseline, measured in the same run, is flannel v0.19's backend for that cloud (each
driver says what it does at a node's start). It has no resync (its only way to re-assert the
table is restarting every node, the (b) baseline) and never removes a dead node's route.

Shrunk: reading an N-route table costs each agent time in N, so N agents each reading it cost
N^2 (moto: about 0.45 ms per route, 4 minutes at 1,000 for each of (a) and (b)). Node mode
and the flannel baseline are therefore run with all N agents only up to a driver's all_agents;
above that, SAMPLE agents are measured on the full table (which cluster mode converged): (b)
is then per node, (a) is not measured for them, and cluster mode, measured whole at every
size, is set against flannel's calls for the whole cluster as N times one node's start (its
calls do not depend on the table but for the pages of a list; its time does, so no time is
extrapolated).

Not counted on either side: the start-up calls both make once per node (instance metadata,
the source/destination check on AWS), and the simulated agents share one client (1,000
clients would cost seconds and gigabytes; the proxy counts the calls either way). GCE's check
that an instance forwards IP (instances.get, once per instance and process) is counted: it
comes with the first route to each instance. Only one agent campaigns in each election: the
others' campaigns cost etcd calls, never cloud ones.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any, Protocol

from bench import Figure
from bench._cloud_ali import AliDriver
from bench._cloud_aws import AwsDriver
from bench._cloud_gce import GceDriver
from cloudroutes.backend import BackendContext, Coordination, ExternalInterface
from cloudroutes.config import NetworkConfig, parse_config
from cloudroutes.errors import CloudroutesError
from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.lab.fault_proxy import FaultProxy
from cloudroutes.lease import Lease
from cloudroutes.lease_table import EventType, LeaseEvent, LeaseTable
from cloudroutes.routing import Routing, node_vetting
from cloudroutes.subnet.etcd_client import EtcdClient, EtcdSettings

SIZES = (50, 500, 1000)
# Short (CI): three clouds, each with every agent and flannel's baseline, well within a minute.
SHORT_SIZES = (30,)
SAMPLE = 10
PREFIX = "/coreos.com/network"
NETWORK = "10.0.0.0/8"
ROUTE_LIMIT = 2000  # past every size: the quota raised, as 1,000 routes need
MAX_PASSES = 100  # Alibaba: one batch of 50 per pass, 20 passes at 1,000
FLANNEL = "flannel-style"


class BenchError(CloudroutesError):
    """The bench did not get the table it set out to measure."""


class Driver(Protocol):
    """One cloud as the bench drives it (bench/_cloud_*.py)."""

    name: str  # the backend type
    api: str  # how its calls are named in a figure: "EC2", "Compute"
    all_agents: int  # up to this many leases, every agent runs
    proxy: FaultProxy

    def new_table(self) -> str: ...

    def backend_options(self, table_id: str) -> dict[str, Any]:
        """The Backend options that point the agents at ``table_id``."""
        ...

    def lease(self, i: int, subnet: IPv4Network) -> Lease:
        """Node i's lease, as its agent publishes it."""
        ...

    def target(self, i: int) -> str:
        """What node i's route points at, as ``routes`` shows it."""
        ...

    def routes(self, table_id: str) -> dict[str, str]:
        """The table's routes to instances: destination -> target (not counted)."""
        ...

    def seams(self) -> contextlib.AbstractContextManager[None]: ...

    def backend(self, ctx: BackendContext, i: int, table_id: str) -> Any:
        """Node i's backend, on the shared client, knowing who it is."""
        ...

    def flannel_start(self, table_id: str, i: int, lease: Lease) -> None:
        """What flanneld does for one table at every start of node i."""
        ...

    def close(self) -> None: ...


DRIVERS: tuple[Callable[[int, str], Driver], ...] = (AwsDriver, AliDriver, GceDriver)


@dataclass(frozen=True)
class Cost:
    """Cloud API calls (the proxy's counts) and wall time of one piece of work."""

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
    """One cloud's driver and a real etcd."""

    def __init__(self, driver: Driver, etcd: EtcdCluster, client: EtcdClient) -> None:
        self.driver = driver
        self.etcd = etcd
        self.client = client

    def lease(self, i: int) -> Lease:
        return self.driver.lease(i, IPv4Network(f"10.{1 + i // 256}.{i % 256}.0/24"))

    def new_table(self) -> str:
        return self.driver.new_table()

    def measure(self, work: Callable[[], object]) -> Cost:
        proxy = self.driver.proxy
        proxy.reset_counts()
        started = time.perf_counter()
        work()
        seconds = time.perf_counter() - started
        counts = proxy.counts()
        return Cost(counts.reads, counts.writes, seconds)

    def expect(self, table_id: str, nodes: Sequence[int], what: str) -> None:
        want = {str(self.lease(i).subnet): self.driver.target(i) for i in nodes}
        if self.driver.routes(table_id) != want:
            raise BenchError(f"{self.driver.name}, {what}: the table does not hold exactly the "
                             "leases' routes")  # fmt: skip

    def flannel_start(self, table_id: str, i: int) -> None:
        self.driver.flannel_start(table_id, i, self.lease(i))


class Agent:
    """One node's cloud backend: its bindings under the real reconcilers."""

    def __init__(
        self,
        lab: CloudLab,
        config: NetworkConfig,
        leases: LeaseTable,
        i: int,
        table_id: str,
        candidate: bool,
    ) -> None:
        own = lab.lease(i)
        iface = ExternalInterface("eth0", 2, 9001, own.public_ip, own.public_ip)
        ctx = BackendContext(config, iface, Coordination(lab.client, PREFIX, f"node-{i}"))
        self.backend = lab.driver.backend(ctx, i, table_id)
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
                        "Type": lab.driver.name,
                        "Mode": mode,
                        "ClusterName": cluster,
                        "RouteLimit": ROUTE_LIMIT,
                        **lab.driver.backend_options(table_id),
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
        self.agents[i] = Agent(self.lab, self.config, self.leases, i, self.table_id, candidate)
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
        self.lab.expect(self.table_id, self.live, what)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.close()


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
    converge = lab.measure(lambda: [lab.flannel_start(table_id, i) for i in range(n)])
    lab.expect(table_id, range(n), "flannel-style, converged")
    restart = lab.measure(lambda: [lab.flannel_start(table_id, i) for i in range(n)])
    join = lab.measure(lambda: lab.flannel_start(table_id, n))
    return Costs(converge, restart, join, None)


def flannel_sampled(lab: CloudLab, n: int, table: Scenario) -> Costs:
    """SAMPLE flanneld nodes restarting on the n-route table cluster mode made: their first
    start (not measured) makes their own routes (GCE: named flanneld's way), so the measured
    one is a restart."""
    sample = table.live[:: max(1, len(table.live) // SAMPLE)][:SAMPLE]
    for i in sample:
        lab.flannel_start(table.table_id, i)
    restart = lab.measure(lambda: [lab.flannel_start(table.table_id, i) for i in sample])
    join = lab.measure(lambda: lab.flannel_start(table.table_id, n + 1))
    return Costs(None, restart.per(len(sample)), join, None)


# --- figures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """What a figure is set against: a cost, how it is named, and whether its time was measured
    (an extrapolated one gives calls only)."""

    cost: Cost | None
    name: str
    timed: bool = True


@dataclass(frozen=True)
class Heading:
    """What every figure of one cloud at one size begins with, and how its calls are named."""

    text: str  # "gce, 50 leases"
    api: str  # "Compute"

    def of(self, more: str) -> Heading:
        return Heading(f"{self.text}, {more}", self.api)


def pair(head: Heading, cost: Cost, base: Baseline) -> Iterator[Figure]:
    """Two figures: the cloud API calls and the time, each against the baseline (named in the
    figure when it has no cost to set against)."""
    name = head.text
    if base.cost is None:
        name = f"{name} [{base.name}]"
    calls = float(base.cost.calls) if base.cost else None
    shown = f"{base.name} ({base.cost.shown()})" if base.cost else base.name
    yield Figure(
        f"{name}: {head.api} calls ({cost.shown()})",
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


def changes(head: Heading, ours: Costs, flannel: Costs) -> Iterator[Figure]:
    """(c): a node joins, then one leaves."""
    yield from pair(head.of("(c) a node joins"), ours.join, Baseline(flannel.join, FLANNEL))
    if ours.leave is not None:
        stays = Baseline(None, f"{FLANNEL}: no call, and the route stays for good")
        yield from pair(head.of("(c) a node leaves"), ours.leave, stays)


def whole(head: Heading, mode: str, ours: Costs, flannel: Costs) -> Iterator[Figure]:
    """Figures of a size where every agent ran."""
    assert ours.converge is not None and flannel.converge is not None
    head = head.of(f"{mode} mode")
    converge = Baseline(flannel.converge, FLANNEL)
    yield from pair(head.of("(a) full convergence"), ours.converge, converge)
    restart = Baseline(flannel.resync, f"{FLANNEL} restart of every node (it has no resync)")
    yield from pair(head.of("(b) steady resync"), ours.resync, restart)
    yield from changes(head, ours, flannel)


def sampled(head: Heading, n: int, node: Costs, cluster: Costs, flannel: Costs) -> Iterator[Figure]:
    """Figures of a size where node mode and flannel ran SAMPLE agents on the full table."""
    each = f"per node (mean of {SAMPLE})"
    node_head = head.of("node mode")
    restart = Baseline(flannel.resync, f"{FLANNEL} restart (it has no resync), {each}")
    yield from pair(node_head.of(f"(b) steady resync {each}"), node.resync, restart)
    yield from changes(node_head, node, flannel)
    # flannel's whole cluster at this size: n times one node's start (the join) or restart,
    # whose calls depend on the table only through the pages of a list; their time does, so
    # it is not extrapolated.
    starts = Cost(flannel.join.reads * n, flannel.join.writes * n, 0.0)
    restarts = Cost(flannel.resync.reads * n, flannel.resync.writes * n, 0.0)
    cluster_head = head.of("cluster mode")
    assert cluster.converge is not None
    every = Baseline(starts, f"{FLANNEL}, {n} x one node's start", timed=False)
    yield from pair(cluster_head.of("(a) full convergence"), cluster.converge, every)
    every = Baseline(restarts, f"{FLANNEL} restart of every node, {n} x one node's", timed=False)
    yield from pair(cluster_head.of("(b) steady resync"), cluster.resync, every)
    yield from changes(cluster_head, cluster, flannel)


def measure(lab: CloudLab, n: int) -> Iterator[Figure]:
    every_agent = n <= lab.driver.all_agents
    cluster, table = cluster_mode(lab, n)
    try:
        if every_agent:
            node, flannel = node_mode_all(lab, n), flannel_all(lab, n)
        else:
            node = node_mode_sampled(lab, n, table)
            flannel = flannel_sampled(lab, n, table)
    finally:
        table.close()
    head = Heading(f"{lab.driver.name}, {n} leases", lab.driver.api)
    if every_agent:
        yield from whole(head, "node", node, flannel)
        yield from whole(head, "cluster", cluster, flannel)
    else:
        yield from sampled(head, n, node, cluster, flannel)


def run(short: bool = False) -> Iterator[Figure]:
    sizes = SHORT_SIZES if short else SIZES
    with contextlib.ExitStack() as stack:
        etcd = EtcdCluster().start()
        stack.callback(etcd.close)
        client = EtcdClient(EtcdSettings(endpoints=(etcd.endpoint,)))
        stack.callback(client.close)
        for make in DRIVERS:
            with contextlib.ExitStack() as cloud:
                driver = make(max(sizes) + 2, NETWORK)
                cloud.callback(driver.close)
                cloud.enter_context(driver.seams())
                lab = CloudLab(driver, etcd, client)
                for n in sizes:
                    yield from measure(lab, n)

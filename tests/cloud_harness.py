"""What the cloud backends' end-to-end tests share: a node as its agent runs it (backend,
lease, reconcilers, election task) and a lab around them (a real etcd, the lease table every
node reads, the network config). Each cloud's test module adds its cloud: its fakes, how a
node finds out who it is, and how to read the routes back."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, Self, TypeVar

import pytest

from cloudroutes.backend import Backend, BackendContext, BackgroundTask, Coordination
from cloudroutes.config import NetworkConfig, parse_config
from cloudroutes.election import Election
from cloudroutes.errors import CloudroutesError
from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.lab.fault_proxy import Call, Fault, FaultProxy, Proceed, Reply
from cloudroutes.lab.http_service import HttpService
from cloudroutes.lab.netns import Netns
from cloudroutes.lease import Lease
from cloudroutes.lease_table import EventType, LeaseEvent, LeaseTable
from cloudroutes.ledger import Ledger
from cloudroutes.reconciler import Reconciler
from cloudroutes.routing import Routing, node_vetting
from cloudroutes.subnet.etcd_client import EtcdClient, EtcdSettings
from tests.wait import wait_for

PREFIX = "/coreos.com/network"
CLUSTER = "lab"
# A lab in a cloud namespace listens at CLOUD_HOST; an agent in a node namespace has NODE_IP.
CLOUD_HOST = "198.18.0.253"
NODE_IP = "198.18.0.1"


@dataclass(frozen=True)
class CloudNetwork:
    """A cloud namespace (where a lab's services listen, at CLOUD_HOST) and a node's (where
    an agent runs, at NODE_IP) on one underlay, as the demo wires them."""

    cloud: Netns
    node: Netns


class CloudBackend(Backend, Protocol):
    """A backend with an election task, as every cloud backend is."""

    def tasks(self) -> list[tuple[str, BackgroundTask]]: ...
    def election(self) -> Election: ...


B = TypeVar("B", bound=CloudBackend)


@dataclass
class Node(Generic[B]):
    """One agent's cloud part: its backend, lease and reconcilers, and its election task."""

    name: str
    instance: Any  # the lab's instance it runs on; None for a controller
    backend: B
    lease: Lease | None
    routing: Routing
    client: EtcdClient
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def reconcilers(self) -> list[Reconciler]:
        return self.routing.reconcilers

    def start_tasks(self) -> None:
        for name, task in self.backend.tasks():
            thread = threading.Thread(target=task, args=(self.stop,), name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def leads(self) -> bool:
        return self.backend.election().is_leader()

    def shutdown(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)
        self.client.close()

    def passes(self, resync: bool = True) -> None:
        """One pass of each reconciler (those not leading do nothing)."""
        for reconciler in self.reconcilers:
            # A failed read (throttled) is dropped: the next pass reads again, as run() does.
            with contextlib.suppress(CloudroutesError):
                reconciler.reconcile(resync=resync)

    def status(self) -> dict[str, Any]:
        return self.routing.status()["routes"]


class CloudLab(Generic[B]):
    """The lease table every node reads, the network config of ``backend_type`` (with
    ``backend_options``), the nodes made so far, a reader of the ledger in etcd, the proxy
    the nodes reach the cloud's API through, and the lab's metadata servers (``servers``,
    stopped with the lab). A cloud's lab says how a node starts (``node``, ``controller``)
    and how to read a table back (``routes``)."""

    def __init__(
        self,
        backend_type: str,
        proxy: FaultProxy,
        etcd: EtcdCluster,
        monkeypatch: pytest.MonkeyPatch,
        servers: Sequence[HttpService] = (),
    ) -> None:
        self.backend_type = backend_type
        self.proxy = proxy
        self.etcd = etcd
        self.monkeypatch = monkeypatch
        self.servers = list(servers)
        self.leases = LeaseTable()
        self.leases.replace_all([], revision=1)
        self.nodes: list[Node[B]] = []
        self.backend_options: dict[str, Any] = {"ClusterName": CLUSTER, "ResyncPeriod": 60}
        self.extra: dict[str, Any] = {}  # more of the network config
        self._revision = 1
        self._reader: EtcdClient | None = None

    def config(self) -> NetworkConfig:
        backend = {"Type": self.backend_type, **self.backend_options}
        doc = {"Network": "10.5.0.0/16", "Backend": backend}
        return parse_config(json.dumps({**doc, **self.extra}))

    def etcd_client(self) -> EtcdClient:
        return EtcdClient(EtcdSettings(endpoints=(self.etcd.endpoint,), request_timeout=3))

    def context(self, name: str, iface: Any, client: EtcdClient) -> BackendContext:
        """The context an agent (``iface``) or the controller (None) gives its backend."""
        coordination = Coordination(client, PREFIX, name)
        return BackendContext(self.config(), iface, coordination, iface is None)

    def bind(
        self,
        name: str,
        instance: Any,
        backend: B,
        lease: Lease | None,
        client: EtcdClient,
        ctx: BackendContext,
    ) -> Node[B]:
        """The node's routing as the agent starts it, its election task running."""
        vetting = node_vetting(ctx.config, backend, lease, ctx.iface, [self.etcd.endpoint])
        routing = Routing(backend, backend.bind(lease), self.leases, vetting)
        node = Node(name, instance, backend, lease, routing, client)
        node.start_tasks()
        self.nodes.append(node)
        return node

    def ledger(self, table_id: str) -> dict[Any, Any]:
        """The table's ledger as another process reads it from etcd."""
        if self._reader is None:
            self._reader = self.etcd_client()
        return Ledger(self._reader, PREFIX, CLUSTER, table_id).entries()

    def put_lease(self, lease: Lease) -> None:
        self._revision += 1
        self.leases.apply([LeaseEvent(EventType.ADDED, lease)], revision=self._revision)

    def drop_lease(self, lease: Lease) -> None:
        self._revision += 1
        self.leases.apply([LeaseEvent(EventType.REMOVED, lease)], revision=self._revision)

    def passes(self, resync: bool = True) -> None:
        for node in self.nodes:
            node.passes(resync)

    def leader(self) -> Node[B]:
        return wait_for(
            lambda: next((n for n in self.nodes if n.leads()), None), 30, "an elected leader"
        )

    def node(self, i: int) -> Node[B]:
        """Node i as its agent starts: who it is, its lease, its bindings."""
        raise NotImplementedError

    def converged(self, count: int) -> list[Node[B]]:
        """Nodes 0 to count - 1 started, a leader elected, and a pass of each made."""
        nodes = [self.node(i) for i in range(count)]
        self.leader()
        self.passes()
        return nodes

    def restart(self, count: int, leases: Sequence[Lease] | None = None) -> list[Node[B]]:
        """Every agent stopped, then nodes 0 to count - 1 converged again, their calls counted
        from zero. ``leases``: the only ones left (the others expired while nothing ran)."""
        for node in self.nodes:
            node.shutdown()
        self.nodes.clear()
        if leases is not None:
            self.leases.replace_all(list(leases), revision=50)
        self.proxy.reset_counts()
        return self.converged(count)

    @property
    def tables(self) -> Sequence[str]:
        raise NotImplementedError

    def routes(self, table_id: str) -> dict[str, str]:
        """Destination -> next hop of the routes of ours' kind in the table, as the cloud
        lists them."""
        raise NotImplementedError

    def all_routes(self) -> dict[str, dict[str, str]]:
        return {t: self.routes(t) for t in self.tables}

    def kill_leader_mid_write(self, action: str) -> tuple[Node[B], Node[B]]:
        """The leader's pass under way, each ``action`` call answered 0.3 s after it is
        applied; the leader killed (its fence ends at once) after the first. Returns the old
        leader and the new one, which has made no pass yet; the proxy counts what the old
        one wrote."""
        leader = self.leader()
        applied = threading.Semaphore(0)

        class Slow(Fault):
            """A slow API: each call is applied, then answered 0.3 s later."""

            def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
                reply = proceed()
                applied.release()
                time.sleep(0.3)
                return reply

        slow = self.proxy.add(Slow(actions={action}))
        self.proxy.reset_counts()
        worker = threading.Thread(target=leader.passes, daemon=True)
        worker.start()
        assert applied.acquire(timeout=20)
        leader.backend.election().resign()
        worker.join(timeout=30)
        assert not worker.is_alive()
        self.proxy.remove(slow)
        successor = wait_for(
            lambda: next((n for n in self.nodes if n is not leader and n.leads()), None),
            30,
            "a new leader",
        )
        return leader, successor

    def close(self) -> None:
        for node in self.nodes:
            node.shutdown()
        if self._reader is not None:
            self._reader.close()
        for server in self.servers:
            server.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

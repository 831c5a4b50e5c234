"""What every cloud backend shares: its common options, its modes, and its elections.

A cloud file (aws_vpc, gce, ali_vpc) says only what is particular to its cloud: how a node
finds out who it is, what a lease's route points at, and how to read and write one route
table (its ``CloudBackend`` subclass; its table a ``providers.cloud_ledger.CloudTable``). This
module turns that into the bindings of a mode:

- ``node`` (flannel's way): per route table, one binding that wants only this node's own
  routes, and one garbage collector that may only delete, active while this process holds the
  ``<type>-gc`` election; it keeps every live lease's routes and removes the others.
- ``cluster``: per route table, one binding that wants every lease's routes, active while this
  process holds the ``<type>-controller`` election. Agents and `cloudroutes controller` are
  candidates alike.

Common options of the ``Backend`` object: ``Mode`` ("node" | "cluster"), ``ClusterName``
(whose routes these are, default the etcd prefix), ``ResyncPeriod`` (seconds between full
reads of each table, default 300) and ``RouteLimit`` (the table's route quota, when known).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Required, TypedDict

from cloudroutes.backend import BackendContext, BackgroundTask, Coordination, RouteTableBinding
from cloudroutes.config import NetworkConfig
from cloudroutes.election import Election, Fence, election_key
from cloudroutes.errors import ConfigError, LeaseRefused
from cloudroutes.lease import NO_IPV4, Lease, LeaseAttrs
from cloudroutes.ledger import Ledger
from cloudroutes.reconciler import Gate
from cloudroutes.routes import Action, Destination, Route, RouteTable

MODES = ("node", "cluster")
DEFAULT_RESYNC = 300.0
MAX_CLUSTER_NAME = 200
# Seconds. Cloud calls made under the election's fence must finish well within TTL / 2.
ELECTION_TTL = 15
# A target the garbage collector keeps for a live lease whose own target it cannot tell: it
# only deletes, so any value that keeps the destination wanted will do.
UNKNOWN_TARGET = "-"


@dataclass(frozen=True)
class CloudOptions:
    mode: str
    cluster_name: str
    resync_period: float
    route_limit: int | None


def shown(value: Any) -> str:
    """A value from the config as a message shows it: quoted, and never very long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_cloud_options(
    config: NetworkConfig, coordination: Coordination | None, *, limit_hint: str = "e.g. 50"
) -> CloudOptions:
    """The common options, or one ConfigError naming the option and the fix."""
    backend = config.backend
    mode = backend.get("Mode", "node")
    if not isinstance(mode, str) or mode.casefold() not in MODES:
        raise ConfigError(
            f'Backend.Mode must be "node" or "cluster", got {shown(mode)}; use "node" '
            '(each node writes its own route) or "cluster" (one elected process writes all)'
        )
    # Without etcd (a config being checked) the default is not known yet.
    default_name = coordination.prefix if coordination is not None else None
    cluster = backend.get("ClusterName")
    if cluster is None:
        cluster = default_name or ""
    elif (
        not isinstance(cluster, str)
        or not 0 < len(cluster) <= MAX_CLUSTER_NAME
        or not cluster.isprintable()
    ):
        raise ConfigError(
            f"Backend.ClusterName must be 1 to {MAX_CLUSTER_NAME} printable characters, got "
            f'{shown(cluster)}; name the cluster, e.g. "prod-eu1"'
        )
    resync = backend.get("ResyncPeriod", DEFAULT_RESYNC)
    if isinstance(resync, bool) or not isinstance(resync, int | float) or not 1 <= resync <= 86400:
        raise ConfigError(
            f"Backend.ResyncPeriod must be a number of seconds from 1 to 86400, got "
            f"{shown(resync)}; the default is {int(DEFAULT_RESYNC)}"
        )
    limit = backend.get("RouteLimit")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10000
    ):
        raise ConfigError(
            f"Backend.RouteLimit must be a whole number of routes (1 to 10000), got "
            f"{shown(limit)}; set it to the route table's quota, {limit_hint}"
        )
    return CloudOptions(mode.casefold(), cluster, float(resync), limit)


def route_table_ids(
    value: Any, option: str, pattern: re.Pattern[str], example: str
) -> tuple[str, ...]:
    """The route tables ``Backend.<option>`` names (one id or a list; none: discover), or one
    ConfigError naming the option and the fix. ``example``: an id of the cloud's form."""
    if value is None or value == "" or value == []:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(
            f"Backend.{option} must be a route table id or a list of them, got "
            f'{shown(value)}; e.g. "{example}"'
        )
    for item in items:
        if not pattern.fullmatch(item):
            raise ConfigError(
                f"Backend.{option}: {shown(item)} is not a route table id; ids look like "
                f'"{example}"'
            )
    if len(set(items)) != len(items):
        twice = next(i for i in items if items.count(i) > 1)
        raise ConfigError(f"Backend.{option} lists {twice} twice; list each table once")
    return tuple(items)


def checked_context(ctx: BackendContext, backend_type: str, mode: str) -> Coordination:
    """What every cloud backend needs from its context, or one ConfigError saying what is
    missing: etcd (for the ledger and elections), Mode cluster for the controller, and the
    node's interface for an agent."""
    if ctx.coordination is None:
        raise ConfigError(
            f"{backend_type} keeps its record of the routes it owns in etcd, and this process "
            "has no etcd connection; run it with --etcd-endpoints (the kube subnet manager is "
            f"not supported with {backend_type})"
        )
    if ctx.controller and mode != "cluster":
        raise ConfigError(
            '`cloudroutes controller` writes routes in Mode "cluster" only; with Mode '
            '"node" each agent writes its own route: set Backend.Mode to "cluster"'
        )
    if not ctx.controller and ctx.iface is None:
        raise ConfigError(f"{backend_type} needs the node's external interface")
    return ctx.coordination


def pod_networks(config: NetworkConfig) -> tuple[Destination, ...]:
    """The Networks of the families the config enables: cloud routes are ours only inside."""
    candidates = (
        config.network if config.enable_ipv4 else None,
        config.ipv6_network if config.enable_ipv6 else None,
    )
    return tuple(n for n in candidates if n is not None)


def lease_destinations(lease: Lease, config: NetworkConfig) -> Iterator[Destination]:
    """A lease's subnets of the families the network enables."""
    if config.enable_ipv4 and lease.subnet is not None:
        yield lease.subnet
    if config.enable_ipv6 and lease.ipv6_subnet is not None:
        yield lease.ipv6_subnet


def routes_to(lease: Lease, config: NetworkConfig, target: Callable[[Lease], str]) -> list[Route]:
    """A lease's routes: one per destination of an enabled family, to ``target(lease)`` (which
    raises LeaseRefused when the lease names nothing to route to)."""
    destinations = list(lease_destinations(lease, config))
    if not destinations:
        return []
    hop = target(lease)
    return [Route(d, hop, lease_key=lease.key) for d in destinations]


def kept_routes(
    lease: Lease, config: NetworkConfig, routes: Callable[[Lease], list[Route]]
) -> list[Route]:
    """What a garbage collector keeps for a live lease: its routes, or, when its target cannot
    be told, a placeholder at each destination (it only deletes, so nothing alive goes)."""
    try:
        return routes(lease)
    except LeaseRefused:
        return [
            Route(d, UNKNOWN_TARGET, lease_key=lease.key) for d in lease_destinations(lease, config)
        ]


class TableArgs(TypedDict, total=False):
    """What every cloud's route table is built with, besides its cloud client and table id
    (``providers.cloud_ledger.CloudTable`` says what each means)."""

    ledger: Required[Ledger]
    networks: Required[Sequence[Destination]]
    member: Required[str]
    gate: Required[Gate]
    name: str | None
    scope: frozenset[Destination] | None
    collect: bool
    skip_young: bool
    fence: Callable[[], Fence | None] | None
    route_limit: int | None
    resync_period: float


class CloudBackend:
    """What every cloud backend object does alike: it checks its context, holds its modes
    and elections, and binds its route tables. A cloud's backend adds how the node finds out
    who it is (``prepare``), which tables it keeps (``route_table_ids``), what a lease wants
    (``lease_routes``), and how one table is built (``cloud_table``)."""

    backend_type: ClassVar[str]
    default_mtu: ClassVar[int] = 1500

    def __init__(self, ctx: BackendContext, common: CloudOptions) -> None:
        self._coordination = checked_context(ctx, self.backend_type, common.mode)
        self._ctx = ctx
        self._config = ctx.config
        self._common = common
        self._networks = pod_networks(ctx.config)
        self._lock = threading.Lock()
        self._gate = Gate()
        self._election: Election | None = None

    @property
    def accepts(self) -> frozenset[str]:
        return frozenset({self.backend_type, ""})

    @property
    def mtu(self) -> int:
        iface = self._ctx.iface
        return iface.mtu if iface is not None else self.default_mtu

    def __repr__(self) -> str:
        common = self._common
        return f"{type(self).__name__}(mode={common.mode!r}, cluster={common.cluster_name!r})"

    def address(self) -> str | None:
        """The agent's interface address (None for the controller): which of the instance's
        interfaces is this node's."""
        iface = self._ctx.iface
        return str(iface.ip) if iface is not None and iface.ip is not None else None

    @property
    def cluster(self) -> bool:
        return self._common.mode == "cluster"

    def lease_attrs(self, backend_data: dict[str, str]) -> LeaseAttrs:
        """This node's lease as the agent publishes it: the interface's addresses of the
        families the network enables, and what its routes go to (``backend_data``)."""
        iface = self._ctx.iface
        assert iface is not None
        config = self._config
        public_ip = (iface.public_ip or iface.ip or NO_IPV4) if config.enable_ipv4 else NO_IPV4
        return LeaseAttrs(
            public_ip=public_ip,
            public_ipv6=(iface.public_ipv6 or iface.ipv6) if config.enable_ipv6 else None,
            backend_type=self.backend_type,
            backend_data=backend_data,
        )

    def election(self) -> Election:
        """The election this mode needs: the garbage collector's (node) or the writer's
        (cluster). It gets an etcd connection of its own when the coordination can open one."""
        with self._lock:
            if self._election is None:
                c = self._coordination
                duty = f"{self.backend_type}-{'controller' if self.cluster else 'gc'}"
                key = election_key(c.prefix, self._common.cluster_name, duty)
                client = c.connect() if c.connect is not None else c.client
                self._election = Election(client, key, c.member, ttl=ELECTION_TTL)
            return self._election

    def tasks(self) -> list[tuple[str, BackgroundTask]]:
        election = self.election()
        return [(f"election-{election.key.rsplit('/', 1)[-1]}", election.run)]

    def route_table_ids(self) -> Sequence[str]:
        raise NotImplementedError

    def lease_routes(self) -> Callable[[Lease], list[Route]]:
        """The routes a lease wants in every table (LeaseRefused when it cannot be routed)."""
        raise NotImplementedError

    def cloud_table(self, table_id: str, args: TableArgs) -> RouteTable:
        raise NotImplementedError

    def bind(self, own: Lease | None) -> Sequence[RouteTableBinding]:
        """The bindings of this mode, per route table (the module's docstring says which)."""
        if own is None and not self.cluster:
            raise ConfigError(
                f"{self.backend_type} in Mode node binds a node's own lease only; "
                'the controller serves Mode "cluster"'
            )
        routes = self.lease_routes()
        config = self._config
        election = self.election()
        bindings: list[RouteTableBinding] = []
        for table_id in self.route_table_ids():
            if self.cluster:
                table = self._table(table_id, collect=True, fence=election.fence)
                bindings.append(RouteTableBinding(table, routes, active=election.is_leader))
                continue
            assert own is not None
            mine = frozenset(lease_destinations(own, config))

            def own_routes(lease: Lease, own_key: str = own.key) -> list[Route]:
                return routes(lease) if lease.key == own_key else []

            def live(lease: Lease) -> list[Route]:
                return kept_routes(lease, config, routes)

            node_table = self._table(table_id, scope=mine)
            gc_table = self._table(
                table_id, name=f"{table_id}/gc", collect=True, fence=election.fence
            )
            bindings.append(RouteTableBinding(node_table, own_routes))
            bindings.append(
                RouteTableBinding(
                    gc_table, live, actions=frozenset({Action.DELETE}), active=election.is_leader
                )
            )
        return bindings

    def _table(
        self,
        table_id: str,
        *,
        name: str | None = None,
        scope: frozenset[Destination] | None = None,
        collect: bool = False,
        fence: Callable[[], Fence | None] | None = None,
    ) -> RouteTable:
        """A cloud's route table. ``scope``: the destinations a node-mode table owns (its
        own); ``collect``: the table sees every route the cluster owns (garbage collector,
        cluster writer); ``fence``: the election's fence its writes carry; ``name``: the
        table's name in /status and metrics."""
        c = self._coordination
        common = self._common
        args = TableArgs(
            ledger=Ledger(c.client, c.prefix, common.cluster_name, table_id),
            networks=self._networks,
            member=c.member,
            gate=self._gate,
            name=name,
            scope=scope,
            collect=collect,
            # The node-mode garbage collector leaves alone routes too young for their lease
            # to have reached it yet.
            skip_young=collect and common.mode == "node",
            fence=fence,
            route_limit=common.route_limit,
            resync_period=common.resync_period,
        )
        return self.cloud_table(table_id, args)

"""What a backend is, and how backends are found.

A backend says only what is particular to it:

- at construction, it checks its options and the node (raising ConfigError), with no side
  effects, so a bad config is rejected before anything is programmed;
- ``prepare()`` readies the node (devices, cloud attributes) and returns the attributes this
  node publishes in its lease;
- ``bind(own)`` returns its route tables, each with the function that maps one lease to the
  entries that table should hold for it;
- ``tasks()`` (optional): named background tasks the agent runs while it runs (elections, the
  udp data path);
- ``accepts`` (optional): the BackendTypes of the leases it can route; leases of other types
  are reported as refused, never silently dropped.

Backends are registered by name: the built-in ones in ``providers/__init__.py``, third-party
ones through the entry-point group ``cloudroutes.providers``. The core never imports a provider
module by name.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from cloudroutes.config import NetworkConfig
from cloudroutes.errors import ConfigError
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.reconciler import DesiredEntries
from cloudroutes.routes import Action, RouteTable
from cloudroutes.subnet.etcd_client import EtcdClient

ENTRY_POINT_GROUP = "cloudroutes.providers"


@dataclass(frozen=True)
class ExternalInterface:
    """The interface that carries traffic between nodes, and the addresses peers use."""

    name: str
    index: int
    mtu: int
    ip: IPv4Address | None
    public_ip: IPv4Address | None
    ipv6: IPv6Address | None = None
    public_ipv6: IPv6Address | None = None


@dataclass(frozen=True)
class Coordination:
    """What cloud backends share through the lease store: ownership ledgers and elections.

    ``client`` is a connection of the backend's own to etcd, ``prefix`` the network's etcd
    prefix (the ledger and election keys live under it), ``member`` who this process is
    (a node's name or public IP, or the controller's id) for ledger entries and elections.
    """

    client: EtcdClient
    prefix: str
    member: str
    # Opens another connection, for loops that must not share one (an election).
    connect: Callable[[], EtcdClient] | None = None


@dataclass(frozen=True)
class BackendContext:
    config: NetworkConfig
    iface: ExternalInterface | None
    # None only for `cloudroutes controller`, which has no interface, lease or kernel routes.
    coordination: Coordination | None = None
    # True for `cloudroutes controller`: a cluster-mode candidate that programs cloud routes
    # only; it takes no lease and touches nothing on the node.
    controller: bool = False
    # flanneld's --ip-blackhole-route: kernel backends add a blackhole route for the node's
    # own subnet.
    blackhole_own_subnet: bool = False
    # Where a backend keeps what must survive restarts and reboots (vxlan's VtepMAC). Not
    # subnet.env's directory: /run is emptied at boot.
    state_dir: str | None = None


@dataclass(frozen=True)
class RouteTableBinding:
    """A route table and the entries each lease wants in it."""

    table: RouteTable
    desired: DesiredEntries
    # The only actions its reconciler may take (a garbage collector only deletes); None: all.
    actions: frozenset[Action] | None = None
    # Whether its reconciler may act now (it holds the election this table needs); None: always.
    active: Callable[[], bool] | None = None


class Backend(Protocol):
    @property
    def mtu(self) -> int: ...

    def prepare(self) -> LeaseAttrs: ...

    def bind(self, own: Lease | None) -> Sequence[RouteTableBinding]:
        """The route tables and what each lease wants in them; ``own`` is None for the
        controller, which has no lease."""
        ...


class BackgroundTask(Protocol):
    """Work a backend needs running beside its reconcilers (an election), until ``stop``."""

    def __call__(self, stop: threading.Event) -> None: ...


BackendFactory = Callable[[BackendContext], Backend]

_registry: dict[str, str | BackendFactory] = {}


def register(name: str, factory: str | BackendFactory) -> None:
    """Register a backend by name; ``factory`` may be "module:attr", imported on first use."""
    _registry[name] = factory


def backend_names() -> list[str]:
    _load_builtin()
    names = set(_registry)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def backend_factory(name: str) -> BackendFactory:
    _load_builtin()
    factory = _registry.get(name)
    if factory is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                factory = ep.value
                break
    if factory is None:
        known = ", ".join(backend_names())
        raise ConfigError(f"unknown backend type: {name} (this build knows {known})")
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        _registry[name] = factory
    return factory


def _load_builtin() -> None:
    # The providers package registers the built-in backends when imported.
    importlib.import_module("providers")

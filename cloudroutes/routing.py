"""From a backend's bindings to running reconcilers: what the agent, the controller and
`cloudroutes plan` share.

Every binding gets the same vetting in front of its desired function, so a refused lease is
refused alike in every table, in /status and in `cloudroutes plan`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from cloudroutes.backend import Backend, ExternalInterface, RouteTableBinding
from cloudroutes.config import NetworkConfig
from cloudroutes.lease import Lease
from cloudroutes.lease_table import LeaseTable
from cloudroutes.lease_vetting import Address, LeaseVetting, addresses, vetted
from cloudroutes.metrics import Metrics
from cloudroutes.reconciler import Reconciler

Spawn = Callable[[str, Callable[..., Any], threading.Event], None]


def endpoint_addresses(urls: Iterable[str]) -> tuple[Address, ...]:
    """The addresses among etcd endpoint URLs (hostnames are left out: they are not routed)."""
    return tuple(sorted(addresses(urlsplit(url.strip()).hostname for url in urls), key=str))


def node_vetting(
    config: NetworkConfig,
    backend: Backend,
    own: Lease | None,
    iface: ExternalInterface | None,
    store_endpoints: Iterable[str],
) -> LeaseVetting:
    mine = (
        addresses(str(a) for a in (iface.ip, iface.public_ip, iface.ipv6, iface.public_ipv6) if a)
        if iface is not None
        else frozenset()
    )
    return LeaseVetting(
        config,
        own=own,
        own_addresses=mine,
        protected=endpoint_addresses(store_endpoints),
        backend_types=getattr(backend, "accepts", None),
        backend_name=config.backend_type,
    )


def reconciler_for(
    binding: RouteTableBinding,
    leases: LeaseTable,
    vetting: LeaseVetting,
    metrics: Metrics | None = None,
) -> Reconciler:
    return Reconciler(
        binding.table,
        leases,
        vetted(binding.desired, vetting),
        metrics=metrics,
        actions=binding.actions,
        active=binding.active,
    )


class Routing:
    """The reconcilers of one backend over one lease table, and the backend's own tasks."""

    def __init__(
        self,
        backend: Backend,
        bindings: Sequence[RouteTableBinding],
        leases: LeaseTable,
        vetting: LeaseVetting,
        metrics: Metrics | None = None,
    ) -> None:
        self.backend = backend
        self.reconcilers = [reconciler_for(b, leases, vetting, metrics) for b in bindings]

    def start(self, spawn: Spawn, stop: threading.Event) -> None:
        tasks = getattr(self.backend, "tasks", None)
        for name, task in tasks() if tasks else ():
            spawn(name, task, stop)
        for reconciler in self.reconcilers:
            table = reconciler.table
            spawn(f"reconcile-{table.name}", reconciler.run, stop)
            watch_drift = getattr(table, "watch_drift", None)
            if watch_drift is not None:
                spawn(
                    f"drift-{table.name}",
                    lambda s, w=watch_drift, r=reconciler: w(r.invalidate, s),
                    stop,
                )

    def wake(self) -> None:
        for reconciler in self.reconcilers:
            reconciler.wake()

    def status(self) -> dict[str, Any]:
        """Each route's state and reason, the leases each table refuses, and pass counts."""
        routes: dict[str, Any] = {}
        refused: dict[str, Any] = {}
        passes: dict[str, int] = {}
        problems: dict[str, str] = {}
        for reconciler in self.reconcilers:
            name = reconciler.table.name
            passes[name] = reconciler.passes
            if reconciler.problem is not None:
                problems[name] = reconciler.problem
            for key, st in reconciler.status().items():
                routes[f"{name} {key}"] = {
                    "route": str(st.entry),
                    "state": st.state.value,
                    "reason": st.reason,
                    "lease": st.entry.lease_key,
                }
            for lease_key, reason in reconciler.refused().items():
                refused.setdefault(lease_key, reason)
        return {
            "routes": routes,
            "refused_leases": refused,
            "passes": passes,
            "table_problems": problems,
        }

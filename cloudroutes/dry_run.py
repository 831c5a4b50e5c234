"""``cloudroutes plan``: what a reconcile on this node would change now, changing nothing.

It reads the config and the leases once, picks the interface as the agent does, and asks each
of the backend's route tables for the diff. The node's own lease is the one holding its public
IP; without one (the agent never ran here) every lease counts as a peer.
"""

from __future__ import annotations

from typing import Any

from cloudroutes.backend import BackendContext, backend_factory
from cloudroutes.config import parse_config
from cloudroutes.errors import ConfigError
from cloudroutes.interface import choose_interface
from cloudroutes.lease import Lease
from cloudroutes.lease_table import LeaseTable
from cloudroutes.reconciler import Reconciler
from cloudroutes.routes import Plan


def plan_for_node(source: Any, values: dict[str, Any]) -> list[tuple[str, Plan]]:
    text = source.get_config_text()
    if text is None:
        raise ConfigError(
            f"no network config at etcd {source.config_key}; write it: cloudroutes config set FILE"
        )
    config = parse_config(text, source=f"etcd {source.config_key}")
    iface = choose_interface(
        values["iface"],
        values["iface_regex"],
        values["public_ip"],
        values["public_ipv6"],
        need_ipv4=config.enable_ipv4,
        need_ipv6=config.enable_ipv6,
    )
    backend = backend_factory(config.backend_type)(BackendContext(config, iface))
    leases = source.list_leases()
    table = LeaseTable()
    table.replace_all(leases, revision=0)
    own = next(
        (x for x in leases if iface.public_ip is not None and x.public_ip == iface.public_ip),
        Lease(subnet=None),
    )
    plans = []
    for binding in backend.bind(own):
        reconciler = Reconciler(binding.table, table, binding.desired)
        plans.append((binding.table.name, reconciler.plan()))
    return plans

"""``cloudroutes plan``: what a reconcile on this node would change now, changing nothing.

It reads the config and the leases once, picks the interface as the agent does, and asks each
of the backend's route tables for its plan, with the destinations others hold, the creates a
full table would block and the leases vetting refuses. Route tables are only read. The node's
own lease is the one holding its public IP; without one (the agent never ran here) every
lease counts as a peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloudroutes.backend import BackendContext, Coordination, backend_factory
from cloudroutes.config import parse_config
from cloudroutes.errors import ConfigError
from cloudroutes.interface import choose_interface
from cloudroutes.lease import Lease
from cloudroutes.lease_table import LeaseTable
from cloudroutes.reconciler import Preview
from cloudroutes.routing import node_vetting, reconciler_for
from cloudroutes.subnet.etcd_client import EtcdClient


@dataclass(frozen=True)
class TablePreview:
    table: str
    preview: Preview


def plan_for_node(source: Any, values: dict[str, Any]) -> list[TablePreview]:
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
        iface_can_reach=values.get("iface_can_reach"),
        need_ipv4=config.enable_ipv4,
        need_ipv6=config.enable_ipv6,
    )
    settings = source.settings
    client = EtcdClient(settings)
    try:
        coordination = Coordination(client, settings.prefix, f"plan-{iface.public_ip}")
        context = BackendContext(
            config,
            iface,
            coordination=coordination,
            blackhole_own_subnet=bool(values.get("ip_blackhole_route")),
        )
        backend = backend_factory(config.backend_type)(context)
        leases = source.list_leases()
        table = LeaseTable()
        table.replace_all(leases, revision=0)
        own = next(
            (x for x in leases if iface.public_ip is not None and x.public_ip == iface.public_ip),
            Lease(subnet=None),
        )
        vetting = node_vetting(config, backend, own, iface, settings.endpoints)
        return [
            TablePreview(binding.table.name, reconciler_for(binding, table, vetting).preview())
            for binding in backend.bind(own)
        ]
    finally:
        client.close()


def render(previews: list[TablePreview]) -> list[str]:
    """The report `cloudroutes plan` prints, one line per fact."""
    lines: list[str] = []
    for item in previews:
        preview = item.preview
        if preview.plan:
            lines.append(f"route table {item.table}: {len(preview.plan)} change(s)")
            lines.extend(f"  {change}" for change in preview.plan)
        else:
            lines.append(f"route table {item.table}: nothing to change")
        for key, foreign in sorted(preview.conflicts.items(), key=lambda kv: str(kv[0])):
            lines.append(f"  conflict: {foreign.conflict(key)}")
        for change in preview.blocked:
            lines.append(f"  quota-blocked: add {change.entry}: the route table is full")
        for lease_key, reason in sorted(preview.refused.items()):
            lines.append(f"  refused lease {lease_key}: {reason}")
    return lines

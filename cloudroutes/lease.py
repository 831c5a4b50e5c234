"""The subnet lease: one node's claim on a subnet, and its byte-compatible flannel codec.

A lease is stored at ``<prefix>/subnets/<key>`` where the key is ``10.5.34.0-24`` or, dual
stack, ``10.5.34.0-24&fc00::-64``. Its value is JSON with the fields PublicIP, PublicIPv6,
BackendType, BackendData and BackendV6Data, in that order, empty ones omitted as flanneld does.
BackendData is kept as decoded JSON, so fields we do not know survive a round trip.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from cloudroutes.errors import ConfigError
from cloudroutes.jsonfields import FoldedObject

NO_IPV4 = IPv4Address("0.0.0.0")
NO_SUBNET = IPv4Network("0.0.0.0/0")

_KEY = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


@dataclass(frozen=True)
class LeaseAttrs:
    """What a node publishes about itself in its lease value."""

    public_ip: IPv4Address = NO_IPV4
    public_ipv6: IPv6Address | None = None
    backend_type: str = ""
    backend_data: Any = None
    backend_v6_data: Any = None


@dataclass(frozen=True)
class Lease:
    """A subnet held by one node.

    ``store_lease_id`` is the etcd lease the key is attached to: 0 for a reservation, a key
    written without one, which never expires. ``expiration`` is known for the node's own lease
    and for leases listed for display; the watch leaves it None, as routes never need it.
    """

    subnet: IPv4Network | None
    attrs: LeaseAttrs = field(default_factory=LeaseAttrs)
    ipv6_subnet: IPv6Network | None = None
    expiration: datetime | None = None
    store_lease_id: int = 0

    @cached_property
    def key(self) -> str:
        # Cached: the reconciler and backends ask for it per lease on every pass.
        return subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def public_ip(self) -> IPv4Address:
        return self.attrs.public_ip

    @property
    def backend_type(self) -> str:
        return self.attrs.backend_type

    @property
    def is_reservation(self) -> bool:
        return self.store_lease_id == 0

    def with_attrs(self, attrs: LeaseAttrs) -> Lease:
        return replace(self, attrs=attrs)


def subnet_key(subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None = None) -> str:
    """The etcd key name of a lease, as flanneld writes it."""
    v4 = subnet or NO_SUBNET
    key = f"{v4.network_address}-{v4.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return key


def parse_subnet_key(key: str) -> tuple[IPv4Network | None, IPv6Network | None] | None:
    """Parse a lease key; None when it is not a lease key (flannel skips those with a warning)."""
    match = _KEY.search(key)
    if not match:
        return None
    try:
        v4 = IPv4Network(f"{match[1]}/{match[2]}")
        v6 = IPv6Network(f"{match[3]}/{match[4]}") if match[3] else None
    except ValueError:
        return None
    return (None if v4 == NO_SUBNET else v4), v6


def encode_attrs(attrs: LeaseAttrs) -> bytes:
    """The lease value, byte for byte as flanneld's Go encoder writes it."""
    doc: dict[str, Any] = {
        "PublicIP": str(attrs.public_ip),
        "PublicIPv6": str(attrs.public_ipv6) if attrs.public_ipv6 is not None else None,
    }
    if attrs.backend_type:
        doc["BackendType"] = attrs.backend_type
    if attrs.backend_data is not None:
        doc["BackendData"] = attrs.backend_data
    if attrs.backend_v6_data is not None:
        doc["BackendV6Data"] = attrs.backend_v6_data
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_attrs(value: bytes | str, *, where: str = "lease") -> LeaseAttrs:
    """Read a lease value written by flanneld or by us. Raises ConfigError on a bad value."""
    try:
        doc = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: value is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: value must be a JSON object")
    obj = FoldedObject(doc)
    try:
        public_ip = IPv4Address(obj.get("PublicIP") or "0.0.0.0")
        raw_v6 = obj.get("PublicIPv6")
        public_ipv6 = IPv6Address(raw_v6) if raw_v6 else None
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    backend_type = obj.get("BackendType") or ""
    if not isinstance(backend_type, str):
        raise ConfigError(f"{where}: BackendType must be a string")
    return LeaseAttrs(
        public_ip=public_ip,
        public_ipv6=public_ipv6,
        backend_type=backend_type,
        backend_data=obj.get("BackendData"),
        backend_v6_data=obj.get("BackendV6Data"),
    )

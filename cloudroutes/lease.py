"""The subnet lease: one node's claim on a subnet, and its byte-compatible flannel codec.

A lease is stored at ``<prefix>/subnets/<key>`` where the key is ``10.5.34.0-24`` or, dual
stack, ``10.5.34.0-24&fc00::-64``. Its value is JSON with the fields PublicIP, PublicIPv6,
BackendType, BackendData and BackendV6Data, in that order, empty ones omitted as flanneld does.
BackendData is kept as decoded JSON, so fields we do not know survive a round trip.

Keys and values come from a shared store anyone can write to: both parsers refuse anything
flanneld would not have written (with one ConfigError line, or None for a key), and never
raise anything else, whatever the bytes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, TypeVar

from cloudroutes.errors import ConfigError
from cloudroutes.jsonfields import FoldedObject
from cloudroutes.routes import KeyedIPv4Network, KeyedIPv6Network

NO_IPV4 = IPv4Address("0.0.0.0")
NO_SUBNET = IPv4Network("0.0.0.0/0")

_KEY = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?")
# No flannel backend nests its BackendData more than two levels; deeper values are refused
# before anything (comparison, encoding) recurses through them.
MAX_DEPTH = 32
# A flannel lease value is about 150 bytes; this bounds what one bad value costs in memory.
MAX_VALUE_BYTES = 64 * 1024

_Address = TypeVar("_Address", IPv4Address, IPv6Address)
_FAMILY: dict[type, str] = {IPv4Address: "IPv4", IPv6Address: "IPv6"}


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
    """Parse a lease key (the part after ``<prefix>/subnets/``); None when it is not one.

    flannel's regex is unanchored; here the whole key must be a lease key written the way
    flanneld writes it (network address, canonical form), so that ``x10.5.1.0-24`` or
    ``10.5.1.7-24`` can never stand for, and shadow, the lease at ``10.5.1.0-24``.
    """
    match = _KEY.fullmatch(key)
    if not match:
        return None
    try:
        # Keyed: a lease's subnets become route destinations, dict keys on every pass.
        v4 = KeyedIPv4Network(f"{match[1]}/{match[2]}")
        v6 = KeyedIPv6Network(f"{match[3]}/{match[4]}") if match[3] else None
    except ValueError:
        return None
    subnet = None if v4 == NO_SUBNET else v4
    if subnet is None and v6 is None:
        return None  # 0.0.0.0-0 alone holds no subnet at all
    if subnet_key(subnet, v6) != key:
        return None
    return subnet, v6


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
    """Read a lease value written by flanneld or by us.

    Raises ConfigError (one line naming ``where``) on any value flanneld would refuse or
    could not have written, and never anything else.
    """
    doc = _parse_json(value, where)
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: value must be a JSON object, not {_json_kind(doc)}")
    obj = FoldedObject(doc)
    public_ip = _address(obj, "PublicIP", IPv4Address, where)
    public_ipv6 = _address(obj, "PublicIPv6", IPv6Address, where)
    backend_type = obj.get("BackendType")
    if backend_type is not None and not isinstance(backend_type, str):
        raise ConfigError(f"{where}: BackendType must be a string, not {_json_kind(backend_type)}")
    return LeaseAttrs(
        public_ip=public_ip or NO_IPV4,
        public_ipv6=public_ipv6,
        backend_type=backend_type or "",
        backend_data=obj.get("BackendData"),
        backend_v6_data=obj.get("BackendV6Data"),
    )


def _parse_json(value: bytes | str, where: str) -> Any:
    size = len(value)
    if size > MAX_VALUE_BYTES:
        raise ConfigError(f"{where}: value is {size} bytes, more than a lease value can be")
    try:
        # Strict UTF-8, as Go reads JSON: json.loads(bytes) would also guess UTF-16 or -32.
        text = value.decode() if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: value is not UTF-8 text") from None
    try:
        doc = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{where}: value is not JSON ({exc.msg} at character {exc.pos})"
        ) from None
    except RecursionError:
        raise ConfigError(f"{where}: value is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError:
        # NaN, Infinity, or a number too long to convert or too large for a float (Go's
        # RawMessage would keep those, but they could not be written back as JSON).
        raise ConfigError(f"{where}: value holds a number JSON cannot carry") from None
    if _depth(doc) > MAX_DEPTH:
        raise ConfigError(f"{where}: value is nested more than {MAX_DEPTH} levels deep")
    return doc


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)  # NaN and Infinity: Python reads them, JSON (and Go) does not


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(text)
    return number


def _depth(doc: Any) -> int:
    """How deeply arrays and objects nest in ``doc``, walked without recursion."""
    deepest = 0
    pending = [(doc, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            return depth
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in children)
    return deepest


def _address(obj: FoldedObject, name: str, kind: type[_Address], where: str) -> _Address | None:
    """A dotted address field: absent is None; anything but an address string is refused.

    Python would take 167772161 or true for an IPv4 address; flanneld takes only a string.
    """
    raw = obj.get(name)
    if raw is None and (name != "PublicIP" or name not in obj):
        return None  # PublicIPv6 is null when unset; PublicIP may only be absent
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: {name} must be an address string, not {_json_kind(raw)}")
    try:
        if "%" in raw:
            raise ValueError(raw)  # a scoped address: Go's ParseIP refuses the zone
        return kind(raw)
    except ValueError:
        raise ConfigError(
            f"{where}: {name} {_shown(raw)} is not an {_FAMILY[kind]} address"
        ) from None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _shown(text: str, limit: int = 40) -> str:
    """A value for a message: quoted, and cut short so a huge one cannot flood the log."""
    return repr(text if len(text) <= limit else text[:limit] + "...")

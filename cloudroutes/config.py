"""The network config: flannel's net-conf JSON, with flannel's defaults, rules and error texts.

The same document lives at ``<prefix>/config`` in etcd or in ``net-conf.json`` for the kube
subnet manager. Keys match case-insensitively, as Go's encoding/json does. The ``Backend`` object
is kept whole, unknown keys included, for the backend to read its own options from.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from cloudroutes.errors import ConfigError
from cloudroutes.jsonfields import FoldedObject

DEFAULT_BACKEND = "udp"


@dataclass(frozen=True)
class BackendOptions:
    """The ``Backend`` object of the config: its ``Type`` and every other key, matched like Go."""

    type: str
    options: FoldedObject = field(default_factory=lambda: FoldedObject({}))

    def get(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network | None
    subnet_len: int
    subnet_min: IPv4Address | None
    subnet_max: IPv4Address | None
    ipv6_network: IPv6Network | None
    ipv6_subnet_len: int
    ipv6_subnet_min: IPv6Address | None
    ipv6_subnet_max: IPv6Address | None
    enable_ipv4: bool
    enable_ipv6: bool
    enable_nftables: bool
    backend: BackendOptions
    source: str = "config"

    @property
    def backend_type(self) -> str:
        return self.backend.type


def parse_config(text: str | bytes, *, source: str = "config", check: bool = True) -> NetworkConfig:
    """Parse and (unless ``check`` is false, as in kube mode) validate a net-conf document.

    Raises ConfigError with flannel's message, prefixed by where the config came from; a
    document that is not a JSON object names only where it came from.
    """
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(
            f'{source}: not a JSON object; write one such as {{"Network": "10.5.0.0/16"}}'
        )
    try:
        return _parse(FoldedObject(doc), source=source, check=check)
    except ConfigError as exc:
        raise ConfigError(f"invalid network config ({source}): {exc}") from None


def _parse(obj: FoldedObject, *, source: str, check: bool) -> NetworkConfig:
    enable_ipv4 = _bool(obj, "EnableIPv4", True)
    enable_ipv6 = _bool(obj, "EnableIPv6", False)
    enable_nftables = _bool(obj, "EnableNFTables", False)
    network = _net(obj, "Network", IPv4Network)
    ipv6_network = _net(obj, "IPv6Network", IPv6Network)
    subnet_len = _uint(obj, "SubnetLen")
    ipv6_subnet_len = _uint(obj, "IPv6SubnetLen")
    subnet_min = _addr(obj, "SubnetMin", IPv4Address)
    subnet_max = _addr(obj, "SubnetMax", IPv4Address)
    ipv6_subnet_min = _addr(obj, "IPv6SubnetMin", IPv6Address)
    ipv6_subnet_max = _addr(obj, "IPv6SubnetMax", IPv6Address)
    backend = _backend(obj)

    if check:
        if not enable_ipv4 and not enable_ipv6:
            raise ConfigError("none defined stack")
        if enable_ipv4:
            subnet_len, subnet_min, subnet_max = _check_family(
                network, subnet_len, subnet_min, subnet_max, bits=32, prefix=""
            )
        if enable_ipv6:
            ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max = _check_family(
                ipv6_network,
                ipv6_subnet_len,
                ipv6_subnet_min,
                ipv6_subnet_max,
                bits=128,
                prefix="IPv6",
            )
        if backend.type == "" and "Backend" in obj:
            raise ConfigError("unknown backend type: ")

    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        ipv6_network=ipv6_network,
        ipv6_subnet_len=ipv6_subnet_len,
        ipv6_subnet_min=ipv6_subnet_min,
        ipv6_subnet_max=ipv6_subnet_max,
        enable_ipv4=enable_ipv4,
        enable_ipv6=enable_ipv6,
        enable_nftables=enable_nftables,
        backend=backend,
        source=source,
    )


def _check_family(
    network: Any, subnet_len: int, subnet_min: Any, subnet_max: Any, *, bits: int, prefix: str
) -> tuple[int, Any, Any]:
    """flannel's CheckNetworkConfig for one address family; returns the defaulted values.

    The texts are flannel's, word for word (its IPv6 length errors say "SubnetLen" too).
    """
    if network is None:
        raise ConfigError(
            f"please define a correct {prefix}Network parameter in the flannel config"
        )
    _check_routable(network, f"{prefix}Network")
    max_len = bits - 2
    smallest = bits - 4
    if subnet_len > 0:
        if subnet_len > max_len:
            raise ConfigError(f"SubnetLen must be less than /{max_len + 1}")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets")
    elif network.prefixlen > smallest:
        raise ConfigError(
            f"{prefix + 'Network' if prefix else 'network'} is too small. "
            f"Minimum useful network prefix is /{smallest}"
        )
    elif network.prefixlen <= (22 if bits == 32 else 62):
        subnet_len = 24 if bits == 32 else 64
    else:
        subnet_len = network.prefixlen + 2

    size = 1 << (bits - subnet_len)
    addr_type = type(network.network_address)
    last = int(network.broadcast_address) + 1
    if subnet_min is None:
        subnet_min = addr_type(int(network.network_address) + size)
    elif subnet_min not in network:
        raise ConfigError(f"{prefix}SubnetMin is not in the range of the {prefix}Network")
    if subnet_max is None:
        subnet_max = addr_type(last - size)
    elif subnet_max not in network:
        raise ConfigError(f"{prefix}SubnetMax is not in the range of the {prefix}Network")
    if int(subnet_min) % size:
        raise ConfigError(f"{prefix}SubnetMin is not on a SubnetLen boundary: {subnet_min}")
    if int(subnet_max) % size:
        raise ConfigError(f"{prefix}SubnetMax is not on a SubnetLen boundary: {subnet_max}")
    if subnet_min > subnet_max:
        # flannel accepts this and then finds no subnet to lease on every node.
        raise ConfigError(
            f"{prefix}SubnetMin {subnet_min} is above {prefix}SubnetMax {subnet_max}, "
            "which leaves no subnet to lease; swap them or widen the range"
        )
    return subnet_len, subnet_min, subnet_max


# Ranges a pod network must not touch (flannel does not check; a node would route them away).
# Link-local is refused too: routers never forward it (RFC 3927, RFC 4291), and 169.254.0.0/16
# holds the cloud metadata service that the cloud backends must keep reaching.
_RESERVED = (
    (IPv4Network("0.0.0.0/8"), "the 'this network' range"),
    (IPv4Network("127.0.0.0/8"), "the loopback range"),
    (IPv4Network("169.254.0.0/16"), "the link-local range"),
    (IPv4Network("224.0.0.0/4"), "the multicast range"),
    (IPv4Network("240.0.0.0/4"), "the reserved range"),
    (IPv6Network("::/128"), "the unspecified address"),
    (IPv6Network("::1/128"), "the loopback address"),
    (IPv6Network("fe80::/10"), "the link-local range"),
    (IPv6Network("ff00::/8"), "the multicast range"),
)


def _check_routable(network: IPv4Network | IPv6Network, name: str) -> None:
    for reserved, what in _RESERVED:
        if reserved.version == network.version and network.overlaps(reserved):  # type: ignore[arg-type]
            example = "10.244.0.0/16" if network.version == 4 else "fd00:10:244::/56"
            raise ConfigError(
                f"{name} {network} overlaps {what} {reserved}, which cannot carry pod "
                f"traffic between nodes; choose a private range such as {example}"
            )


def _bool(obj: FoldedObject, name: str, default: bool) -> bool:
    value = obj.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {json.dumps(value)}")
    return value


def _uint(obj: FoldedObject, name: str) -> int:
    value = obj.get(name, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a prefix length such as 24, got {json.dumps(value)}")
    return value


def _net(obj: FoldedObject, name: str, kind: type) -> Any:
    value = obj.get(name)
    if value in (None, ""):
        return None
    example = "10.5.0.0/16" if kind is IPv4Network else "fc00::/48"
    if not isinstance(value, str):
        raise ConfigError(
            f"{name} must be a CIDR string such as {example}, got {json.dumps(value)}"
        )
    try:
        network = kind(value, strict=False)
    except (ValueError, ipaddress.AddressValueError, ipaddress.NetmaskValueError):
        raise ConfigError(
            f"{name} {json.dumps(value)} is not a valid CIDR; write it like {example}"
        ) from None
    # flannel's Empty(): the zero network (0.0.0.0/0, ::/0) means no Network at all.
    if network.prefixlen == 0 and int(network.network_address) == 0:
        return None
    return network


def _addr(obj: FoldedObject, name: str, kind: type) -> Any:
    value = obj.get(name)
    if value in (None, ""):
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        address = kind(value)
    except (ValueError, ipaddress.AddressValueError):
        raise ConfigError(f"{name} {json.dumps(value)} is not a valid address") from None
    # As in flannel, the zero address (0.0.0.0, ::) means unset: the default applies.
    return address if int(address) else None


def _backend(obj: FoldedObject) -> BackendOptions:
    raw = obj.get("Backend")
    if raw is None:
        return BackendOptions(type=DEFAULT_BACKEND)
    if not isinstance(raw, dict):
        raise ConfigError('Backend must be an object such as {"Type": "host-gw"}')
    options = FoldedObject(raw)
    backend_type = options.get("Type", "")
    if not isinstance(backend_type, str):
        raise ConfigError(f"Backend.Type must be a string, got {json.dumps(backend_type)}")
    return BackendOptions(type=backend_type, options=options)

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

    Raises ConfigError with flannel's message, prefixed by where the config came from.
    """
    try:
        return _parse(text, source=source, check=check)
    except ConfigError as exc:
        raise ConfigError(f"invalid network config ({source}): {exc}") from None


def _parse(text: str | bytes, *, source: str, check: bool) -> NetworkConfig:
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError('the config must be a JSON object such as {"Network": "10.5.0.0/16"}')
    obj = FoldedObject(doc)

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
    """flannel's CheckNetworkConfig for one address family; returns the defaulted values."""
    if network is None:
        raise ConfigError(
            f"please define a correct {prefix}Network parameter in the flannel config"
        )
    max_len = bits - 2
    smallest = bits - 4
    if subnet_len > 0:
        if subnet_len > max_len:
            raise ConfigError(f"{prefix}SubnetLen must be less than /{max_len + 1}")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets")
    elif network.prefixlen > smallest:
        raise ConfigError(
            f"{'IPv6 network' if prefix else 'network'} is too small. "
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
        raise ConfigError(f"{prefix}SubnetMin is not on a {prefix}SubnetLen boundary: {subnet_min}")
    if int(subnet_max) % size:
        raise ConfigError(f"{prefix}SubnetMax is not on a {prefix}SubnetLen boundary: {subnet_max}")
    return subnet_len, subnet_min, subnet_max


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
        return kind(value, strict=False)
    except (ValueError, ipaddress.AddressValueError, ipaddress.NetmaskValueError):
        raise ConfigError(
            f"{name} {json.dumps(value)} is not a valid CIDR; write it like {example}"
        ) from None


def _addr(obj: FoldedObject, name: str, kind: type) -> Any:
    value = obj.get(name)
    if value in (None, ""):
        return None
    try:
        return kind(value)
    except (ValueError, ipaddress.AddressValueError):
        raise ConfigError(f"{name} {json.dumps(value)} is not a valid address") from None


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

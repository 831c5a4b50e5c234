"""The flannel CNI plugin's pure part: its NetConf, flannel's subnet.env, the delegate config.

Rules and messages are flannel's (flannel-io/cni-plugin), so a runtime, a log search or a
runbook sees what it would see with flannel. Imported by the plugin process on every ADD:
json, os and _socket only (cloudroutes.subnet_env would pull in dataclasses, tempfile and
pathlib, and ipaddress alone costs as much as the rest of the plugin's imports together).
"""

from __future__ import annotations

import os
from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton

from cloudroutes.cni_json import ERR_INTERNAL, CniError, GoStruct, type_name

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"

_NETCONF_ERROR = "failed to load flannel netconf file: failed to load netconf: "
_MAX_UINT32 = 2**32 - 1
_MAPPED = bytes(10) + b"\xff\xff"  # the first 12 bytes of an IPv4-mapped IPv6 address


class FlannelSubnet:
    """What subnet.env tells the plugin: this node's subnets, the networks, MTU and masquerade."""

    __slots__ = ("ipmasq", "ipv6_networks", "ipv6_subnet", "mtu", "networks", "subnet")

    def __init__(
        self,
        networks: list[str],
        subnet: str | None,
        ipv6_networks: list[str],
        ipv6_subnet: str | None,
        mtu: int,
        ipmasq: bool,
    ) -> None:
        self.networks = networks
        self.subnet = subnet
        self.ipv6_networks = ipv6_networks
        self.ipv6_subnet = ipv6_subnet
        self.mtu = mtu
        self.ipmasq = ipmasq


class NetConf:
    """The plugin's own network config (stdin), with flannel's defaults filled in."""

    __slots__ = (
        "cni_version",
        "data_dir",
        "delegate",
        "ipam",
        "name",
        "runtime_config",
        "subnet_file",
    )

    def __init__(self, conf: dict[str, object]) -> None:
        """Check the fields' JSON types as Go's unmarshal into flannel's NetConf does.

        Raises CniError with flannel's "failed to load netconf" message.
        """
        self.cni_version = _string_field(conf, "cniVersion", "")
        self.name = _string_field(conf, "name", "")
        _string_field(conf, "type", "")
        self.subnet_file = _string_field(conf, "subnetFile", DEFAULT_SUBNET_FILE)
        self.data_dir = _string_field(conf, "dataDir", DEFAULT_DATA_DIR)
        self.delegate = _object_field(conf, "delegate")
        self.ipam = _object_field(conf, "ipam")
        self.runtime_config = _object_field(conf, "runtimeConfig")
        for key in ("capabilities", "dns", "prevResult"):
            _object_field(conf, key)


def _string_field(conf: dict[str, object], key: str, default: str) -> str:
    value = conf.get(key)
    if value is None:
        return default  # Go leaves the default in place for null or a missing key.
    if not isinstance(value, str):
        raise CniError(
            ERR_INTERNAL, f'{_NETCONF_ERROR}"{key}" must be a string, not {type_name(value)}'
        )
    return value


def _object_field(conf: dict[str, object], key: str) -> dict[str, object] | None:
    value = conf.get(key)
    if value is not None and not isinstance(value, dict):
        raise CniError(
            ERR_INTERNAL, f'{_NETCONF_ERROR}"{key}" must be an object, not {type_name(value)}'
        )
    return value


def load_subnet_env(path: str) -> FlannelSubnet:
    """Read subnet.env as flannel's plugin does; CniError with flannel's message if unusable."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        return parse_subnet_env(text, path)
    except (OSError, ValueError) as exc:
        why = _os_reason(path, exc) if isinstance(exc, OSError) else str(exc)
        raise CniError(
            ERR_INTERNAL,
            f"failed to load flannel 'subnet.env' file: {why}. "
            "Check the flannel pod log for this node.",
        ) from None


def _os_reason(path: str, exc: OSError) -> str:
    # Go's wording ("open /x: no such file or directory"), which runbooks search for.
    reason = (exc.strerror or str(exc)).lower()
    return f"open {path}: {reason}"


def parse_subnet_env(text: str, path: str) -> FlannelSubnet:
    """KEY=VALUE lines, the last of a key winning; ValueError names what is wrong.

    Stricter than the agent's reader on purpose: this is flannel's plugin's grammar (no
    quotes, no ``export``), and FLANNEL_NETWORK may list several networks, comma separated.
    """
    networks: list[str] = []
    ipv6_networks: list[str] = []
    subnet: str | None = None
    ipv6_subnet: str | None = None
    mtu: int | None = None
    ipmasq: bool | None = None
    for line in text.split("\n"):
        key, _, value = line.removesuffix("\r").partition("=")
        if key == "FLANNEL_NETWORK":
            networks = _network_list(value)
        elif key == "FLANNEL_IPV6_NETWORK":
            ipv6_networks = _network_list(value)
        elif key == "FLANNEL_SUBNET":
            subnet = parse_cidr(value, masked=True)
        elif key == "FLANNEL_IPV6_SUBNET":
            ipv6_subnet = parse_cidr(value, masked=True)
        elif key == "FLANNEL_MTU":
            if not (value.isascii() and value.isdigit()) or int(value) > _MAX_UINT32:
                raise ValueError(f'FLANNEL_MTU: invalid value "{value}"')
            mtu = int(value)
        elif key == "FLANNEL_IPMASQ":
            ipmasq = value == "true"
    missing = []
    if not networks and not ipv6_networks:
        missing += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]
    if subnet is None and ipv6_subnet is None:
        missing += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]
    if mtu is None:
        missing.append("FLANNEL_MTU")
    if ipmasq is None:
        missing.append("FLANNEL_IPMASQ")
    if missing or mtu is None or ipmasq is None:
        raise ValueError(f"{path} is missing {', '.join(missing)}")
    return FlannelSubnet(networks, subnet, ipv6_networks, ipv6_subnet, mtu, ipmasq)


def _network_list(value: str) -> list[str]:
    networks: list[str] = []
    for text in value.split(","):
        network = parse_cidr(text, masked=True)
        if network not in networks:
            networks.append(network)
    return networks


def parse_cidr(text: str, *, masked: bool) -> str:
    """``addr/len`` as Go's net.ParseCIDR takes it; the network (masked) or the address kept,
    printed as Go prints them.

    ValueError ``invalid CIDR address: <text>`` for anything else (a netmask instead of a
    length, a zone, no length).
    """
    address, slash, length = text.partition("/")
    try:
        if not slash or not (length.isascii() and length.isdigit()):
            raise ValueError
        packed = _parse_ip(address)
        bits = int(length)
        if bits > len(packed) * 8:
            raise ValueError
    except ValueError:
        raise ValueError(f"invalid CIDR address: {text}") from None
    if not masked:
        return f"{_go_ip(packed)}/{bits}"
    size = len(packed) * 8
    network = int.from_bytes(packed, "big") & (((1 << bits) - 1) << (size - bits))
    packed = network.to_bytes(len(packed), "big")
    if packed[:12] == _MAPPED and bits >= 96:
        # Go prints a mapped network as the IPv4 network it is, with the mask's IPv4 part.
        return f"{inet_ntop(AF_INET, packed[12:])}/{bits - 96}"
    return f"{_go_ip(packed)}/{bits}"


def _parse_ip(text: str) -> bytes:
    """The 4 or 16 bytes of an address as Go's net.ParseIP reads it (no zone); ValueError."""
    if "%" in text:
        raise ValueError(text)
    try:
        return inet_pton(AF_INET6 if ":" in text else AF_INET, text)
    except OSError:
        raise ValueError(text) from None


def _go_ip(packed: bytes) -> str:
    """An address as Go prints it: an IPv4-mapped IPv6 address as IPv4, and never the dotted
    tail the C library gives the deprecated IPv4-compatible form (::1.2.3.4)."""
    if len(packed) == 4:
        return inet_ntop(AF_INET, packed)
    if packed[:12] == _MAPPED:
        return inet_ntop(AF_INET, packed[12:])
    if not any(packed[:12]) and any(packed[12:14]):
        high, low = int.from_bytes(packed[12:14], "big"), int.from_bytes(packed[14:], "big")
        return f"::{high:x}:{low:x}"
    return inet_ntop(AF_INET6, packed)


def build_delegate(conf: NetConf, subnet: FlannelSubnet) -> dict[str, object]:
    """The config flannel hands to the delegate plugin (bridge by default).

    Raises CniError for a delegate that sets what flannel owns (name, ipam) or routes that do
    not parse.
    """
    delegate = dict(conf.delegate) if conf.delegate is not None else {}
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CniError(
            ERR_INTERNAL, "'delegate' dictionary, if present, must have (string) 'type' field"
        )
    for owned in ("name", "ipam"):
        if owned in delegate:
            raise CniError(
                ERR_INTERNAL,
                f"'delegate' dictionary must not have '{owned}' field, it'll be set by flannel",
            )
    if conf.runtime_config is not None:
        delegate["runtimeConfig"] = conf.runtime_config
    delegate["name"] = conf.name
    delegate.setdefault("type", "bridge")
    # When flannel does not masquerade pod traffic leaving the network, the bridge must.
    delegate.setdefault("ipMasq", not subnet.ipmasq)
    delegate.setdefault("mtu", subnet.mtu)
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    if conf.cni_version:
        delegate["cniVersion"] = conf.cni_version
    delegate["ipam"] = _delegate_ipam(conf, subnet)
    return delegate


def _delegate_ipam(conf: NetConf, subnet: FlannelSubnet) -> dict[str, object]:
    ipam = dict(conf.ipam) if conf.ipam is not None else {}
    ipam.setdefault("type", "host-local")
    ranges = []
    for node_subnet in (subnet.subnet, subnet.ipv6_subnet):
        if node_subnet:
            ranges.append([{"subnet": node_subnet}])
    ipam["ranges"] = ranges
    try:
        routes = _routes(ipam.get("routes"))
    except ValueError as exc:
        raise CniError(
            ERR_INTERNAL,
            "failed to assemble Delegate IPAM: failed to read IPAM routes: "
            f"failed to parse ipam.routes: {exc}",
        ) from None
    for network in subnet.networks + subnet.ipv6_networks:
        routes.append(GoStruct(dst=network))
    ipam["routes"] = routes
    return ipam


_ROUTE_INTS = ("mtu", "advmss", "priority")
_ROUTE_OPTIONAL_INTS = ("table", "scope")


def _routes(value: object) -> list[object]:
    """ipam.routes decoded into CNI's Route struct and back: unknown keys dropped, zeros omitted."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"routes must be an array, not {type_name(value)}")
    routes: list[object] = []
    for entry in value:
        if not isinstance(entry, dict):
            raise ValueError(f"a route must be an object, not {type_name(entry)}")
        dst = entry.get("dst")
        if not isinstance(dst, str):
            raise ValueError(f'route "dst" must be a CIDR string, not {type_name(dst)}')
        route = GoStruct(dst=parse_cidr(dst, masked=False))
        gw = entry.get("gw")
        if gw is not None and gw != "":
            route["gw"] = _gateway(gw)
        for key in _ROUTE_INTS + _ROUTE_OPTIONAL_INTS:
            number = entry.get(key)
            if number is None:
                continue
            if not isinstance(number, float | int) or isinstance(number, bool):
                raise ValueError(f'route "{key}" must be a number, not {type_name(number)}')
            if not float(number).is_integer():
                raise ValueError(f'route "{key}" must be a whole number, not {number}')
            if number or key in _ROUTE_OPTIONAL_INTS:
                route[key] = int(number)
        routes.append(route)
    return routes


def _gateway(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"invalid IP address: {value}")
    try:
        return _go_ip(_parse_ip(value))
    except ValueError:
        raise ValueError(f"invalid IP address: {value}") from None


def scratch_path(data_dir: str, container_id: str) -> str:
    """Where ADD keeps the delegate config for DEL (the container ID is checked: no slashes)."""
    return os.path.join(data_dir, container_id)

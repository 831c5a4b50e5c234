"""Choosing the external interface and the public IP, as flanneld does.

Order: each ``--iface`` (a name or an address) in turn, then ``--iface-regex`` (matched against
addresses first, then names), then the interface of the default route. The interface's first
IPv4 address is its IP (or the address given with ``--iface``); the public IP is
``--public-ip`` when set, else the interface IP.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from pyroute2 import IPRoute

from cloudroutes.backend import ExternalInterface
from cloudroutes.errors import ConfigError


@dataclass(frozen=True)
class _Link:
    name: str
    index: int
    mtu: int
    up: bool
    ipv4: tuple[IPv4Address, ...]
    ipv6: tuple[IPv6Address, ...]


def _links(ipr: IPRoute) -> list[_Link]:
    v4: dict[int, list[IPv4Address]] = {}
    v6: dict[int, list[IPv6Address]] = {}
    for msg in ipr.get_addr():
        address = msg.get_attr("IFA_ADDRESS")
        if msg["family"] == socket.AF_INET:
            address = msg.get_attr("IFA_LOCAL") or address
            v4.setdefault(msg["index"], []).append(IPv4Address(address))
        elif msg["family"] == socket.AF_INET6 and msg["scope"] == 0:  # global scope only
            v6.setdefault(msg["index"], []).append(IPv6Address(address))
    links = []
    for msg in ipr.get_links():
        index = msg["index"]
        links.append(
            _Link(
                name=msg.get_attr("IFLA_IFNAME"),
                index=index,
                mtu=msg.get_attr("IFLA_MTU"),
                up=bool(msg["flags"] & 1),
                ipv4=tuple(v4.get(index, ())),
                ipv6=tuple(v6.get(index, ())),
            )
        )
    return links


def _default_route_index(ipr: IPRoute) -> int | None:
    for route in ipr.get_routes(family=socket.AF_INET, table=254):
        if route["dst_len"] == 0 and route.get_attr("RTA_OIF") is not None:
            return route.get_attr("RTA_OIF")
    return None


def choose_interface(
    ifaces: Sequence[str] = (),
    iface_regex: str | None = None,
    public_ip: str | None = None,
    public_ipv6: str | None = None,
    *,
    need_ipv4: bool = True,
    need_ipv6: bool = False,
) -> ExternalInterface:
    """Find the external interface in the current network namespace."""
    pattern = _compile(iface_regex)
    with IPRoute() as ipr:
        links = _links(ipr)
        default_index = _default_route_index(ipr)

    chosen: tuple[_Link, IPv4Address | None] | None = None
    for spec in ifaces:
        chosen = _by_spec(links, spec)
        if chosen:
            break
    if chosen is None and pattern is not None:
        chosen = _by_regex(links, pattern)
    if chosen is None and not ifaces and pattern is None:
        link = next((lk for lk in links if lk.index == default_index), None)
        if link is not None:
            chosen = (link, None)
    if chosen is None:
        tried = ", ".join([*ifaces, *([f"regex {iface_regex}"] if iface_regex else [])])
        raise ConfigError(
            "failed to find any valid interface to use"
            + (f" (tried {tried})" if tried else " (no default route)")
            + "; name one with --iface or --iface-regex"
        )
    link, address = chosen
    ip = address or (link.ipv4[0] if link.ipv4 else None)
    ipv6 = link.ipv6[0] if link.ipv6 else None
    if need_ipv4 and ip is None:
        raise ConfigError(
            f"interface {link.name} has no IPv4 address; add one or choose another with --iface"
        )
    if need_ipv6 and ipv6 is None:
        raise ConfigError(
            f"interface {link.name} has no global IPv6 address, but EnableIPv6 is set; "
            "add one or choose another with --iface"
        )
    return ExternalInterface(
        name=link.name,
        index=link.index,
        mtu=link.mtu,
        ip=ip,
        public_ip=_address(public_ip, IPv4Address, "--public-ip") or ip,
        ipv6=ipv6,
        public_ipv6=_address(public_ipv6, IPv6Address, "--public-ipv6") or ipv6,
    )


def _by_spec(links: list[_Link], spec: str) -> tuple[_Link, IPv4Address | None] | None:
    try:
        address = ipaddress.ip_address(spec)
    except ValueError:
        link = next((lk for lk in links if lk.name == spec), None)
        return (link, None) if link else None
    for link in links:
        if address in link.ipv4 or address in link.ipv6:
            return link, address if isinstance(address, IPv4Address) else None
    return None


def _by_regex(
    links: list[_Link], pattern: re.Pattern[str]
) -> tuple[_Link, IPv4Address | None] | None:
    for link in links:
        for address in link.ipv4:
            if pattern.search(str(address)):
                return link, address
    for link in links:
        if pattern.search(link.name):
            return link, None
    return None


def _compile(regex: str | None) -> re.Pattern[str] | None:
    if not regex:
        return None
    try:
        return re.compile(regex)
    except re.error as exc:
        raise ConfigError(
            f"--iface-regex {regex!r} is not a valid regular expression: {exc}"
        ) from None


def _address(value: str | None, kind: type, flag: str):  # type: ignore[no-untyped-def]
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r} is not a valid address") from None

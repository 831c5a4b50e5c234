"""Choosing the external interface and the public IP, as flanneld does.

Order (flanneld's): each ``--iface`` (a name or an address) in turn, then each
``--iface-regex`` in turn (matched against addresses first, then names), then
``--iface-can-reach`` (the interface and source address the kernel would use to reach that
address, as ``ip route get`` shows). With none of these, the interface holding ``--public-ip``
when one does, else the interface of the default route. A candidate without a usable address
(the loopback interface, an interface with only 127.0.0.1) is skipped with its reason.

The interface's IP is the address given with ``--iface`` or the route's source, else its first
usable address, in flannel's order (global before link-local, permanent before dynamic,
non-temporary before temporary). The public IP is ``--public-ip`` when set, else the interface
IP. IPv4 addresses are looked up only when the network enables IPv4, IPv6 ones only with IPv6,
so a node publishes exactly what flanneld would.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cloudroutes.backend import ExternalInterface
from cloudroutes.errors import ConfigError
from cloudroutes.flags import address_problem

_IFF_LOOPBACK = 0x8
_IFA_F_TEMPORARY = 0x01
_IFA_F_DEPRECATED = 0x20
_IFA_F_PERMANENT = 0x80


@dataclass(frozen=True)
class _Link:
    name: str
    index: int
    mtu: int
    loopback: bool
    ipv4: tuple[IPv4Address, ...]  # usable ones only, in flannel's order of preference
    ipv6: tuple[IPv6Address, ...]
    unusable: tuple[IPv4Address | IPv6Address, ...]  # loopback and the like, for the message


@dataclass(frozen=True)
class _Choice:
    link: _Link
    ip: IPv4Address | None = None
    ipv6: IPv6Address | None = None


def _preference(address: IPv4Address | IPv6Address, flags: int) -> tuple[bool, bool, bool]:
    """flannel's compareAddrs as a sort key: global, then permanent, then non-temporary."""
    return (
        address.is_link_local,
        not flags & _IFA_F_PERMANENT,
        bool(flags & _IFA_F_TEMPORARY),
    )


def _links(ipr: IPRoute) -> list[_Link]:
    found: dict[int, list[tuple[tuple[bool, bool, bool], IPv4Address | IPv6Address]]] = {}
    unusable: dict[int, list[IPv4Address | IPv6Address]] = {}
    for msg in ipr.get_addr():
        if msg["family"] == socket.AF_INET:
            address: IPv4Address | IPv6Address = IPv4Address(
                msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            )
        elif msg["family"] == socket.AF_INET6:
            address = IPv6Address(msg.get_attr("IFA_ADDRESS"))
        else:
            continue
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        if address_problem(address) or flags & _IFA_F_DEPRECATED:
            unusable.setdefault(msg["index"], []).append(address)
            continue
        found.setdefault(msg["index"], []).append((_preference(address, flags), address))
    links = []
    for msg in ipr.get_links():
        index = msg["index"]
        ordered = [a for _, a in sorted(found.get(index, []), key=lambda pair: pair[0])]
        links.append(
            _Link(
                name=msg.get_attr("IFLA_IFNAME"),
                index=index,
                mtu=msg.get_attr("IFLA_MTU"),
                loopback=bool(msg["flags"] & _IFF_LOOPBACK),
                ipv4=tuple(a for a in ordered if isinstance(a, IPv4Address)),
                ipv6=tuple(a for a in ordered if isinstance(a, IPv6Address)),
                unusable=tuple(unusable.get(index, ())),
            )
        )
    return links


def _default_route_index(ipr: IPRoute, family: int) -> int | None:
    for route in ipr.get_routes(family=family, table=254):
        if route["dst_len"] == 0 and route.get_attr("RTA_OIF") is not None:
            return route.get_attr("RTA_OIF")
    return None


def choose_interface(
    ifaces: Sequence[str] = (),
    iface_regex: str | Sequence[str] | None = None,
    public_ip: str | None = None,
    public_ipv6: str | None = None,
    *,
    iface_can_reach: str | None = None,
    need_ipv4: bool = True,
    need_ipv6: bool = False,
) -> ExternalInterface:
    """Find the external interface in the current network namespace."""
    regexes = [iface_regex] if isinstance(iface_regex, str) else list(iface_regex or ())
    patterns = [_compile(r) for r in regexes if r]
    public = _address(public_ip, IPv4Address, "--public-ip")
    public6 = _address(public_ipv6, IPv6Address, "--public-ipv6")
    with IPRoute() as ipr:
        links = _links(ipr)
        default = _default_route_index(ipr, socket.AF_INET if need_ipv4 else socket.AF_INET6)
        reach = _by_route(ipr, links, iface_can_reach) if iface_can_reach else None

    tries: list[tuple[str, _Choice | str]] = []
    selected = bool(ifaces or patterns or iface_can_reach)
    if selected:
        tries += [(f"--iface={spec}", _by_spec(links, spec)) for spec in ifaces]
        tries += [(f"--iface-regex={p.pattern}", _by_regex(links, p)) for p in patterns]
        if iface_can_reach and reach is not None:
            tries.append((f"--iface-can-reach={iface_can_reach}", reach))
    else:
        tries.append(("default route", _unselected(links, default, public, public6, need_ipv4)))

    reasons = []
    for label, found in tries:
        choice = _settle(found, need_ipv4, need_ipv6) if isinstance(found, _Choice) else found
        if isinstance(choice, _Choice):
            return ExternalInterface(
                name=choice.link.name,
                index=choice.link.index,
                mtu=choice.link.mtu,
                ip=choice.ip,
                public_ip=public or choice.ip,
                ipv6=choice.ipv6,
                public_ipv6=public6 or choice.ipv6,
            )
        reasons.append(f"{label}: {choice}")
    # The hint: the default route's interface, else the first that could carry the traffic.
    usable = [lk for lk in links if not lk.loopback and (lk.ipv4 if need_ipv4 else lk.ipv6)]
    external = next((lk for lk in links if lk.index == default), next(iter(usable), None))
    example = f", e.g. --iface={external.name}" if external else ""
    what = (
        "failed to find interface to use that matches the interfaces and/or regexes provided"
        if selected
        else "failed to find any valid interface to use"
    )
    raise ConfigError(
        f"{what} ({'; '.join(reasons)}); name the external interface with --iface{example}"
    )


def _unselected(
    links: list[_Link],
    default: int | None,
    public: IPv4Address | None,
    public6: IPv6Address | None,
    need_ipv4: bool,
) -> _Choice | str:
    """No --iface*: the interface holding the public IP (flanneld's lookup), else the default
    route's (where flanneld would fail, as a public IP behind NAT is on no interface)."""
    held = public if need_ipv4 else public6
    holder = _holding(links, held) if held else None
    if holder is not None:
        return _Choice(holder, ip=public) if need_ipv4 else _Choice(holder, ipv6=public6)
    link = next((lk for lk in links if lk.index == default), None)
    return _Choice(link) if link else "there is no default route"


def _settle(choice: _Choice, need_ipv4: bool, need_ipv6: bool) -> _Choice | str:
    """Fill in a candidate's addresses, or say why it cannot carry traffic between nodes."""
    link = choice.link
    if link.loopback:
        return f"{link.name} is the loopback interface, which other nodes cannot reach"
    for given in (choice.ip, choice.ipv6):
        problem = address_problem(given) if given is not None else None
        if problem:
            return f"{given} {problem}"
    ip = (choice.ip or next(iter(link.ipv4), None)) if need_ipv4 else None
    ipv6 = (choice.ipv6 or next(iter(link.ipv6), None)) if need_ipv6 else None
    for needed, got, family in ((need_ipv4, ip, 4), (need_ipv6, ipv6, 6)):
        if needed and got is None:
            held = [str(a) for a in link.unusable if a.version == family]
            only = f" (only {', '.join(held)}, which other nodes cannot reach)" if held else ""
            return f"{link.name} has no usable IPv{family} address{only}"
    return _Choice(link, ip, ipv6)


def _by_spec(links: list[_Link], spec: str) -> _Choice | str:
    try:
        address = ipaddress.ip_address(spec)
    except ValueError:
        link = next((lk for lk in links if lk.name == spec), None)
        return _Choice(link) if link else "no such interface"
    link = _holding(links, address)
    if link is None:
        problem = address_problem(address)
        return f"{address} {problem}" if problem else "no interface has this address"
    if isinstance(address, IPv4Address):
        return _Choice(link, ip=address)
    return _Choice(link, ipv6=address)


def _holding(links: list[_Link], address: IPv4Address | IPv6Address) -> _Link | None:
    return next(
        (lk for lk in links if address in (*lk.ipv4, *lk.ipv6, *lk.unusable)),
        None,
    )


def _by_regex(links: list[_Link], pattern: re.Pattern[str]) -> _Choice | str:
    for link in links:
        for address in (*link.ipv4, *link.ipv6):
            if pattern.search(str(address)):
                if isinstance(address, IPv4Address):
                    return _Choice(link, ip=address)
                return _Choice(link, ipv6=address)
    for link in links:
        if pattern.search(link.name):
            return _Choice(link)
    names = ", ".join(lk.name for lk in links)
    return f"matches no address or name of the interfaces ({names})"


def _by_route(ipr: IPRoute, links: list[_Link], target: str) -> _Choice | str:
    """The interface and source address of the route the kernel would take to ``target``."""
    try:
        address = ipaddress.ip_address(target)
    except ValueError:
        return "not an IP address"
    try:
        routes = ipr.route("get", dst=str(address))
    except NetlinkError as exc:
        return f"no route to it ({exc.args[1] if len(exc.args) > 1 else exc})"
    for route in routes:
        link = next((lk for lk in links if lk.index == route.get_attr("RTA_OIF")), None)
        if link is None:
            continue
        src = route.get_attr("RTA_PREFSRC")
        source = ipaddress.ip_address(src) if src else None
        if isinstance(source, IPv4Address):
            return _Choice(link, ip=source)
        return _Choice(link, ipv6=source)
    return "no route to it"


def _compile(regex: str) -> re.Pattern[str]:
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
        address = kind(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r} is not a valid address") from None
    problem = address_problem(address)
    if problem:
        raise ConfigError(f"{flag} {value} {problem}")
    return address

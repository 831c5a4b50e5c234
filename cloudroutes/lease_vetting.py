"""Vetting leases before they become routes.

Anyone who can write under the subnets prefix (a buggy tool, a typo, an attacker) can put any
lease there. A lease is routed only when it is one this network could have handed out, and its
next hop is a peer: otherwise a single key could blackhole a subnet, or route this node's own
path to etcd away so that it never hears the correction.

``refusal(lease)`` says why a lease is refused, in one line, or None when it may be routed.
The node's own lease is never refused here: backends skip it themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import TYPE_CHECKING

from cloudroutes.config import NetworkConfig
from cloudroutes.errors import LeaseRefused
from cloudroutes.lease import NO_IPV4, Lease
from cloudroutes.routes import Entry

if TYPE_CHECKING:
    from cloudroutes.reconciler import DesiredEntries

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


@dataclass(frozen=True)
class LeaseVetting:
    """The rules one node applies to every lease it reads.

    ``own_addresses``: this node's addresses (public and interface IPs); a lease naming one as
    its next hop would send traffic back to us. ``protected``: addresses whose path must never
    be routed into a pod subnet (the etcd members). ``backend_types``: the BackendTypes this
    node's backend can route (None: any).
    """

    config: NetworkConfig
    own: Lease | None = None
    own_addresses: frozenset[Address] = frozenset()
    protected: tuple[Address, ...] = ()
    backend_types: frozenset[str] | None = None
    backend_name: str = field(default="")

    def refusal(self, lease: Lease) -> str | None:
        if self.own is not None and lease.key == self.own.key:
            return None
        if self.backend_types is not None and lease.backend_type not in self.backend_types:
            shown = lease.backend_type or "(none)"
            return (
                f"its BackendType is {shown}, but this node runs {self.backend_name or 'another'}"
                " backend; give every node of the network the same backend"
            )
        config = self.config
        parts: list[tuple[Network, Address | None, Network | None, int, Network | None]] = []
        if config.enable_ipv4 and lease.subnet is not None:
            public = lease.public_ip if lease.public_ip != NO_IPV4 else None
            own = self.own.subnet if self.own else None
            parts.append((lease.subnet, public, config.network, config.subnet_len, own))
        if config.enable_ipv6 and lease.ipv6_subnet is not None:
            own6 = self.own.ipv6_subnet if self.own else None
            parts.append(
                (
                    lease.ipv6_subnet,
                    lease.attrs.public_ipv6,
                    config.ipv6_network,
                    config.ipv6_subnet_len,
                    own6,
                )
            )
        if not parts:
            return "it has no subnet of an address family this network enables"
        for subnet, public, network, length, own_subnet in parts:
            reason = self._part_refusal(subnet, public, network, length, own_subnet)
            if reason:
                return reason
        return None

    def _part_refusal(
        self,
        subnet: Network,
        public: Address | None,
        network: Network | None,
        length: int,
        own_subnet: Network | None,
    ) -> str | None:
        # Integer arithmetic: ipaddress's own containment tests cost microseconds each, and
        # every lease is vetted on every full pass.
        if network is None or subnet.version != network.version:
            return f"its subnet {subnet} is outside the Network {network}"
        start, mask = _span(subnet)
        net_start, net_mask = _span(network)
        if subnet.prefixlen < network.prefixlen or start & net_mask != net_start:
            return f"its subnet {subnet} is outside the Network {network}"
        if subnet.prefixlen != length:
            return f"its subnet {subnet} is a /{subnet.prefixlen}, but SubnetLen is {length}"
        if own_subnet is not None and own_subnet.version == subnet.version:
            own_start, own_mask = _span(own_subnet)
            shorter = mask & own_mask
            if start & shorter == own_start & shorter:
                return f"its subnet {subnet} overlaps this node's subnet {own_subnet}"
        for address, value in self._must_reach:
            if address.version == subnet.version and value & mask == start:
                return f"its subnet {subnet} holds {address}, which this node must reach directly"
        if public is None:
            family = "PublicIP" if subnet.version == 4 else "PublicIPv6"
            return f"it has no {family} to route {subnet} to"
        why = unusable_next_hop(public)
        if why:
            return f"its next hop {public} is {why}"
        if public in self.own_addresses:
            return f"its next hop {public} is this node's own address"
        if int(public) & net_mask == net_start:
            return f"its next hop {public} lies inside the pod Network {network}"
        return None

    @cached_property
    def _must_reach(self) -> tuple[tuple[Address, int], ...]:
        return tuple((a, int(a)) for a in (*self.protected, *self.own_addresses))


def _span(network: Network) -> tuple[int, int]:
    """The network's first address and its netmask, as integers."""
    bits, prefixlen = network.max_prefixlen, network.prefixlen
    return int(network.network_address), ((1 << prefixlen) - 1) << (bits - prefixlen)


# (first address, mask, why) of IPv4 ranges that cannot be a peer's next hop.
_V4_UNUSABLE = tuple(
    (*_span(IPv4Network(net)), why)
    for net, why in (
        ("0.0.0.0/32", "unspecified"),
        ("127.0.0.0/8", "a loopback address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
    )
)


def unusable_next_hop(address: Address) -> str | None:
    """Why ``address`` cannot be a peer's next hop, or None when it can."""
    if isinstance(address, IPv4Address):
        value = int(address)
        return next((why for start, mask, why in _V4_UNUSABLE if value & mask == start), None)
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "a loopback address"
    if address.is_multicast:
        return "a multicast address"
    return None


def addresses(texts: Iterable[str | None]) -> frozenset[Address]:
    """The addresses among ``texts``; hostnames and None are left out."""
    found: set[Address] = set()
    for text in texts:
        if not text:
            continue
        try:
            found.add(ip_address(text.strip("[]")))
        except ValueError:
            continue
    return frozenset(found)


def vetted(desired: DesiredEntries, vetting: LeaseVetting) -> DesiredEntries:
    """``desired``, for leases that pass ``vetting``; a refused lease raises LeaseRefused,
    which the reconciler reports as that lease's failure."""

    def entries(lease: Lease) -> Iterable[Entry]:
        reason = vetting.refusal(lease)
        if reason is not None:
            raise LeaseRefused(reason)
        return desired(lease)

    return entries

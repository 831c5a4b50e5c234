"""Choosing this node's subnet, by flannel's rules. Pure logic: no store, no clock.

In order (flannel's ``tryAcquireLease``):

1. a lease that already carries this node's public IP is reused when it still fits the config
   (inside SubnetMin..SubnetMax, same SubnetLen; the IPv6 part likewise); one that no longer
   fits is reported as stale, for the caller to delete;
2. else the previous subnet (from subnet.env) when it fits and nobody holds it;
3. else a random pick among the first 100 free subnets, walking up from SubnetMin.

Leases are indexed as sets of integers per prefix length, so a choice costs
O(leases + candidates) however many leases exist, not O(leases x candidates).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Literal, cast

from cloudroutes.config import NetworkConfig
from cloudroutes.errors import OutOfSubnets
from cloudroutes.lease import NO_IPV4, Lease, LeaseAttrs, subnet_key

# flannel picks at random among this many free subnets, so that nodes starting together rarely
# race for the same one, while the network still fills from the bottom.
CANDIDATES = 100

Network = IPv4Network | IPv6Network
Previous = tuple[IPv4Network | None, IPv6Network | None]


@dataclass(frozen=True)
class Allocation:
    """The subnet(s) chosen for this node and what the caller must do to claim them."""

    subnet: IPv4Network | None
    ipv6_subnet: IPv6Network | None
    how: Literal["public-ip", "previous", "random"]
    # This node's existing lease (found by public IP), to be rewritten with the new attributes.
    reused: Lease | None = None
    # This node's leases that no longer fit the config: delete them before claiming.
    stale: tuple[Lease, ...] = field(default=())

    @property
    def key(self) -> str:
        return subnet_key(self.subnet, self.ipv6_subnet)


@dataclass(frozen=True)
class SubnetRange:
    """One address family's pool: subnets of ``length`` from ``first`` to ``last`` inclusive."""

    first: int
    last: int
    length: int
    bits: int

    @property
    def step(self) -> int:
        return 1 << (self.bits - self.length)

    @property
    def size(self) -> int:
        return (self.last - self.first) // self.step + 1

    def fits(self, net: Network | None) -> bool:
        return (
            net is not None
            and net.max_prefixlen == self.bits
            and net.prefixlen == self.length
            and self.first <= int(net.network_address) <= self.last
        )

    def network(self, address: int) -> Network:
        # ip_network() would read a small IPv6 address as IPv4: name the family.
        kind = IPv4Network if self.bits == 32 else IPv6Network
        return kind((address, self.length))

    def describe(self) -> str:
        first, last = self.network(self.first), self.network(self.last)
        return f"/{self.length} subnets from {first.network_address} to {last.network_address}"


def ipv4_range(config: NetworkConfig) -> SubnetRange | None:
    if not config.enable_ipv4 or config.subnet_min is None or config.subnet_max is None:
        return None
    return SubnetRange(int(config.subnet_min), int(config.subnet_max), config.subnet_len, 32)


def ipv6_range(config: NetworkConfig) -> SubnetRange | None:
    if not config.enable_ipv6 or config.ipv6_subnet_min is None or config.ipv6_subnet_max is None:
        return None
    return SubnetRange(
        int(config.ipv6_subnet_min), int(config.ipv6_subnet_max), config.ipv6_subnet_len, 128
    )


class Occupied:
    """The subnets of one family that leases hold, indexed for overlap tests.

    A candidate of length L overlaps a lease of length M when the lease lies inside it (M >= L:
    the lease masked to L equals the candidate) or contains it (M < L: the candidate masked to
    M equals the lease). One set per length makes each test a handful of set lookups.
    """

    def __init__(self, nets: Iterable[Network], length: int, bits: int) -> None:
        self._length = length
        self._bits = bits
        self._inside: set[int] = set()
        self._containing: dict[int, set[int]] = {}
        for net in nets:
            address = int(net.network_address)
            if net.prefixlen >= length:
                self._inside.add(address & _mask(length, bits))
            else:
                self._containing.setdefault(net.prefixlen, set()).add(address)

    def blocked_until(self, candidate: int) -> int | None:
        """None when the candidate subnet is free; else the first address past what blocks it."""
        for prefixlen, addresses in self._containing.items():
            base = candidate & _mask(prefixlen, self._bits)
            if base in addresses:
                # A wide lease blocks every candidate inside it: jump past it in one step.
                return base + (1 << (self._bits - prefixlen))
        if candidate in self._inside:
            return candidate + (1 << (self._bits - self._length))
        return None

    def is_free(self, net: Network) -> bool:
        return self.blocked_until(int(net.network_address)) is None


def _mask(prefixlen: int, bits: int) -> int:
    return ((1 << prefixlen) - 1) << (bits - prefixlen)


def free_candidates(pool: SubnetRange, occupied: Occupied, limit: int = CANDIDATES) -> list[int]:
    """The first ``limit`` free subnets of the pool, walking up from its first subnet."""
    found: list[int] = []
    address = pool.first
    while address <= pool.last and len(found) < limit:
        blocked_until = occupied.blocked_until(address)
        if blocked_until is None:
            found.append(address)
            address += pool.step
        else:
            address = max(address + pool.step, blocked_until)
    return found


def is_compatible(config: NetworkConfig, lease: Lease) -> bool:
    """flannel's isSubnetConfigCompat and isIPv6SubnetConfigCompat, for both parts of a lease."""
    return _part_fits(ipv4_range(config), lease.subnet) and _part_fits(
        ipv6_range(config), lease.ipv6_subnet
    )


def _part_fits(pool: SubnetRange | None, net: Network | None) -> bool:
    # A family that is switched off must be absent from the lease, or its key would not match.
    return net is None if pool is None else pool.fits(net)


def is_own(lease: Lease, attrs: LeaseAttrs) -> bool:
    """Whether a lease belongs to the node publishing ``attrs``, matched by public IP.

    IPv6-only nodes all publish PublicIP 0.0.0.0, so they are matched by PublicIPv6 instead.
    """
    if attrs.public_ip != NO_IPV4:
        return lease.attrs.public_ip == attrs.public_ip
    return attrs.public_ipv6 is not None and lease.attrs.public_ipv6 == attrs.public_ipv6


def choose_subnet(
    config: NetworkConfig,
    leases: Sequence[Lease],
    attrs: LeaseAttrs,
    previous: Previous | None = None,
    *,
    unreadable: Sequence[Lease] = (),
    rng: random.Random | None = None,
) -> Allocation:
    """Pick this node's subnet among ``leases`` (everything under ``<prefix>/subnets/``).

    ``unreadable`` are lease keys whose value does not decode: nobody can tell whose they are,
    so they are never reused, but their subnets are taken (a create there would fail).
    Raises OutOfSubnets when every subnet of the range is taken.
    """
    own = [lease for lease in leases if is_own(lease, attrs)]
    stale = tuple(lease for lease in own if not is_compatible(config, lease))
    reusable = [lease for lease in own if is_compatible(config, lease)]
    if reusable:
        found = reusable[0]
        return Allocation(found.subnet, found.ipv6_subnet, "public-ip", reused=found, stale=stale)

    # Stale leases are about to be deleted: their subnets count as free.
    stale_keys = {lease.key for lease in stale}
    others = [lease for lease in leases if lease.key not in stale_keys] + list(unreadable)
    v4_pool, v6_pool = ipv4_range(config), ipv6_range(config)
    v4_taken = _occupied(v4_pool, (lease.subnet for lease in others))
    v6_taken = _occupied(v6_pool, (lease.ipv6_subnet for lease in others))

    if previous is not None and _previous_is_free(previous, v4_pool, v6_pool, v4_taken, v6_taken):
        v4, v6 = _masked(previous)
        return Allocation(v4, v6, "previous", stale=stale)

    rng = rng or random.Random()
    v4_subnet = cast(IPv4Network | None, _pick(v4_pool, v4_taken, rng))
    v6_subnet = cast(IPv6Network | None, _pick(v6_pool, v6_taken, rng))
    return Allocation(v4_subnet, v6_subnet, "random", stale=stale)


def _occupied(pool: SubnetRange | None, nets: Iterable[Network | None]) -> Occupied | None:
    if pool is None:
        return None
    same_family = (net for net in nets if net is not None and net.max_prefixlen == pool.bits)
    return Occupied(same_family, pool.length, pool.bits)


def _masked(previous: Previous) -> Previous:
    # subnet.env holds the first host address (10.5.52.1/24); the lease is the network.
    v4, v6 = previous
    return (
        IPv4Network(v4, strict=False) if v4 is not None else None,
        IPv6Network(v6, strict=False) if v6 is not None else None,
    )


def _previous_is_free(
    previous: Previous,
    v4_pool: SubnetRange | None,
    v6_pool: SubnetRange | None,
    v4_taken: Occupied | None,
    v6_taken: Occupied | None,
) -> bool:
    v4, v6 = _masked(previous)
    if v4 is None and v6 is None:
        return False
    if not (_part_fits(v4_pool, v4) and _part_fits(v6_pool, v6)):
        return False
    v4_free = v4 is None or v4_taken is None or v4_taken.is_free(v4)
    v6_free = v6 is None or v6_taken is None or v6_taken.is_free(v6)
    return v4_free and v6_free


def _pick(pool: SubnetRange | None, taken: Occupied | None, rng: random.Random) -> Network | None:
    if pool is None or taken is None:
        return None
    candidates = free_candidates(pool, taken)
    if not candidates:
        family = "IPv6 " if pool.bits == 128 else ""
        raise OutOfSubnets(
            f"out of subnets: all {pool.size} {family}{pool.describe()} are leased; "
            f"widen the {family}Network or {family}SubnetMin/{family}SubnetMax in the network "
            "config, or delete the leases of dead nodes"
        )
    return pool.network(rng.choice(candidates))

"""Choosing a subnet by flannel's rules: reuse by public IP, previous subnet, random pick."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudroutes.config import NetworkConfig, parse_config
from cloudroutes.errors import OutOfSubnets
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.subnet.allocation import CANDIDATES, choose_subnet, is_compatible

ME = LeaseAttrs(public_ip=IPv4Address("198.18.0.1"), backend_type="host-gw")


def config(**fields: object) -> NetworkConfig:
    return parse_config(json.dumps({"Network": "10.5.0.0/16", **fields}))


def lease(subnet: str, ip: str = "198.18.1.1", ipv6_subnet: str | None = None) -> Lease:
    return Lease(
        subnet=IPv4Network(subnet),
        ipv6_subnet=IPv6Network(ipv6_subnet) if ipv6_subnet else None,
        attrs=LeaseAttrs(public_ip=IPv4Address(ip)),
        store_lease_id=7,
    )


def test_reuses_the_lease_that_carries_this_nodes_public_ip() -> None:
    mine = lease("10.5.77.0/24", ip="198.18.0.1")
    chosen = choose_subnet(config(), [lease("10.5.1.0/24"), mine], ME)
    assert chosen.how == "public-ip"
    assert chosen.reused == mine
    assert chosen.subnet == IPv4Network("10.5.77.0/24")
    assert chosen.stale == ()


def test_an_incompatible_own_lease_is_reported_stale_and_a_new_subnet_chosen() -> None:
    # SubnetLen changed from 24 to 25 since this lease was written.
    mine = lease("10.5.77.0/24", ip="198.18.0.1")
    chosen = choose_subnet(config(SubnetLen=25), [mine], ME, rng=random.Random(1))
    assert chosen.stale == (mine,)
    assert chosen.reused is None
    assert chosen.subnet is not None and chosen.subnet.prefixlen == 25


def test_an_own_lease_outside_subnet_min_max_is_stale() -> None:
    mine = lease("10.5.2.0/24", ip="198.18.0.1")
    cfg = config(SubnetMin="10.5.10.0", SubnetMax="10.5.20.0")
    assert not is_compatible(cfg, mine)
    chosen = choose_subnet(cfg, [mine], ME)
    assert chosen.stale == (mine,)
    assert chosen.subnet is not None
    assert IPv4Network("10.5.10.0/24") <= chosen.subnet <= IPv4Network("10.5.20.0/24")


def test_the_previous_subnet_is_reused_when_free() -> None:
    previous = (IPv4Network("10.5.52.1/24", strict=False), None)
    chosen = choose_subnet(config(), [lease("10.5.1.0/24")], ME, previous)
    assert chosen.how == "previous"
    assert chosen.subnet == IPv4Network("10.5.52.0/24")


def test_the_previous_subnet_is_not_taken_from_another_node() -> None:
    previous = (IPv4Network("10.5.52.0/24"), None)
    chosen = choose_subnet(config(), [lease("10.5.52.0/24")], ME, previous)
    assert chosen.how == "random"
    assert chosen.subnet != IPv4Network("10.5.52.0/24")


def test_subnets_of_unreadable_leases_are_taken_and_never_reused() -> None:
    # Two subnets; one held by a key whose value does not decode (its attrs are unknown).
    cfg = config(SubnetMin="10.5.1.0", SubnetMax="10.5.2.0")
    garbled = Lease(subnet=IPv4Network("10.5.1.0/24"), store_lease_id=7)
    for seed in range(20):
        chosen = choose_subnet(cfg, [], ME, unreadable=[garbled], rng=random.Random(seed))
        assert chosen.subnet == IPv4Network("10.5.2.0/24")
    previous = (IPv4Network("10.5.1.0/24"), None)
    assert choose_subnet(cfg, [], ME, previous, unreadable=[garbled]).how == "random"
    with pytest.raises(OutOfSubnets):
        choose_subnet(cfg, [lease("10.5.2.0/24")], ME, unreadable=[garbled])


def test_an_incompatible_previous_subnet_is_ignored() -> None:
    previous = (IPv4Network("10.9.52.0/24"), None)
    chosen = choose_subnet(config(), [], ME, previous)
    assert chosen.how == "random"


def test_random_pick_is_among_the_first_hundred_free_subnets() -> None:
    taken = [lease(f"10.5.{i}.0/24") for i in range(1, 40)]
    picks = {
        choose_subnet(config(), taken, ME, rng=random.Random(seed)).subnet for seed in range(300)
    }
    allowed = {IPv4Network(f"10.5.{i}.0/24") for i in range(40, 40 + CANDIDATES)}
    assert picks <= allowed
    assert len(picks) > 50  # uniform over the bag, not always the first one


def test_candidates_overlapping_a_wider_or_narrower_lease_are_skipped() -> None:
    # A /20 reservation covers 10.5.0.0-10.5.15.255; a /26 sits inside 10.5.17.0/24.
    wide = lease("10.5.0.0/20")
    narrow = lease("10.5.17.64/26")
    cfg = config(SubnetMax="10.5.18.0")
    picks = {choose_subnet(cfg, [wide, narrow], ME, rng=random.Random(s)).subnet for s in range(50)}
    assert picks == {IPv4Network("10.5.16.0/24"), IPv4Network("10.5.18.0/24")}


def test_out_of_subnets_says_what_is_full_and_how_to_fix_it() -> None:
    cfg = config(Network="10.5.0.0/22", SubnetLen=24)
    taken = [lease(f"10.5.{i}.0/24") for i in range(4)]
    with pytest.raises(OutOfSubnets) as err:
        choose_subnet(cfg, taken, ME)
    message = str(err.value)
    assert message.startswith("out of subnets")
    assert "10.5.1.0 to 10.5.3.0" in message
    assert "SubnetMin/SubnetMax" in message


def test_dual_stack_picks_both_families_and_reuses_both() -> None:
    cfg = config(EnableIPv6=True, IPv6Network="fc00::/48")
    chosen = choose_subnet(cfg, [lease("10.5.1.0/24", ipv6_subnet="fc00:0:0:1::/64")], ME)
    assert chosen.subnet is not None and chosen.ipv6_subnet is not None
    assert chosen.ipv6_subnet.prefixlen == 64
    assert chosen.ipv6_subnet != IPv6Network("fc00:0:0:1::/64")
    assert (
        chosen.key == f"{chosen.subnet.network_address}-24&{chosen.ipv6_subnet.network_address}-64"
    )

    mine = lease("10.5.9.0/24", ip="198.18.0.1", ipv6_subnet="fc00:0:0:9::/64")
    assert choose_subnet(cfg, [mine], ME).reused == mine


def test_an_ipv4_only_lease_is_stale_once_ipv6_is_enabled() -> None:
    cfg = config(EnableIPv6=True, IPv6Network="fc00::/48")
    mine = lease("10.5.9.0/24", ip="198.18.0.1")
    assert choose_subnet(cfg, [mine], ME).stale == (mine,)


def test_ipv6_only_nodes_are_matched_by_their_ipv6_address() -> None:
    cfg = config(EnableIPv4=False, EnableIPv6=True, IPv6Network="fc00::/48")
    me = LeaseAttrs(public_ipv6=IPv6Address("2001:db8::1"))
    other = Lease(
        subnet=None,
        ipv6_subnet=IPv6Network("fc00:0:0:1::/64"),
        attrs=LeaseAttrs(),
        store_lease_id=1,
    )
    chosen = choose_subnet(cfg, [other], me)
    assert chosen.how == "random"  # the other node's PublicIP 0.0.0.0 is not ours
    assert chosen.subnet is None and chosen.ipv6_subnet is not None
    assert chosen.key.startswith("0.0.0.0-0&fc00:")


def test_a_full_ipv6_range_is_walked_quickly_past_a_wide_reservation() -> None:
    # A /50 reservation blocks 2**14 candidates; the walk jumps over it instead of stepping.
    cfg = config(EnableIPv4=False, EnableIPv6=True, IPv6Network="fc00::/48")
    wide = Lease(subnet=None, ipv6_subnet=IPv6Network("fc00::/49"), attrs=LeaseAttrs())
    chosen = choose_subnet(cfg, [wide], LeaseAttrs(public_ipv6=IPv6Address("2001:db8::1")))
    assert chosen.ipv6_subnet is not None
    assert not chosen.ipv6_subnet.overlaps(IPv6Network("fc00::/49"))


def test_ten_thousand_leases() -> None:
    cfg = config(Network="10.0.0.0/8")
    taken = [lease(f"10.{i // 256}.{i % 256}.0/24") for i in range(256, 10_256)]
    chosen = choose_subnet(cfg, taken, ME)
    assert chosen.subnet is not None
    assert all(not chosen.subnet.overlaps(existing.subnet) for existing in taken)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    subnet_len=st.integers(min_value=24, max_value=28),
    held=st.lists(st.tuples(st.integers(0, 255), st.integers(22, 30)), max_size=40),
    seed=st.integers(0, 2**16),
)
def test_a_picked_subnet_is_free_and_in_range(
    subnet_len: int, held: list[tuple[int, int]], seed: int
) -> None:
    cfg = config(Network="10.7.0.0/22", SubnetLen=subnet_len)
    leases = [
        lease(str(IPv4Network((0x0A070000 + (n << 2), plen), strict=False))) for n, plen in held
    ]
    try:
        chosen = choose_subnet(cfg, leases, ME, rng=random.Random(seed))
    except OutOfSubnets:
        # Only when no subnet of the range is free.
        step = 1 << (32 - subnet_len)
        for address in range(int(cfg.subnet_min), int(cfg.subnet_max) + 1, step):
            candidate = IPv4Network((address, subnet_len))
            assert any(candidate.overlaps(existing.subnet) for existing in leases)
        return
    assert chosen.subnet is not None
    assert chosen.subnet.prefixlen == subnet_len
    assert cfg.subnet_min <= chosen.subnet.network_address <= cfg.subnet_max
    assert not any(chosen.subnet.overlaps(existing.subnet) for existing in leases)

"""Which leases a node routes, and the one-line reason for each it refuses."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest

from cloudroutes.config import parse_config
from cloudroutes.lease import Lease, LeaseAttrs, parse_subnet_key
from cloudroutes.lease_vetting import LeaseVetting

CONFIG = parse_config(
    '{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/48", '
    '"Backend": {"Type": "host-gw"}}'
)


def lease(key: str, public: str = "198.18.0.2", public6: str | None = "2001:db8::2") -> Lease:
    parsed = parse_subnet_key(key)
    assert parsed is not None
    return Lease(
        parsed[0],
        LeaseAttrs(
            IPv4Address(public),
            IPv6Address(public6) if public6 else None,
            backend_type="host-gw",
        ),
        ipv6_subnet=parsed[1],
    )


OWN = lease("10.5.1.0-24&fd00:5:0:1::-64", "198.18.0.1", "2001:db8::1")
VETTING = LeaseVetting(
    CONFIG,
    own=OWN,
    own_addresses=frozenset({IPv4Address("198.18.0.1"), IPv6Address("2001:db8::1")}),
    protected=(IPv4Address("10.5.9.7"),),
    backend_types=frozenset({"host-gw"}),
    backend_name="host-gw",
)


@pytest.mark.parametrize(
    ("key", "public", "reason"),
    [
        ("10.5.2.0-24&fd00:5:0:2::-64", "198.18.0.2", None),
        ("10.6.2.0-24", "198.18.0.2", "its subnet 10.6.2.0/24 is outside the Network 10.5.0.0/16"),
        ("10.5.2.0-25", "198.18.0.2", "its subnet 10.5.2.0/25 is a /25, but SubnetLen is 24"),
        ("10.5.0.0-16", "198.18.0.2", "its subnet 10.5.0.0/16 is a /16, but SubnetLen is 24"),
        (
            "10.5.9.0-24",
            "198.18.0.2",
            "its subnet 10.5.9.0/24 holds 10.5.9.7, which this node must reach directly",
        ),
        ("10.5.3.0-24", "127.0.0.1", "its next hop 127.0.0.1 is a loopback address"),
        ("10.5.3.0-24", "224.0.0.5", "its next hop 224.0.0.5 is a multicast address"),
        ("10.5.3.0-24", "255.255.255.255", "its next hop 255.255.255.255 is the broadcast address"),
        ("10.5.3.0-24", "240.0.0.1", "its next hop 240.0.0.1 is a reserved address"),
        ("10.5.3.0-24", "0.0.0.0", "it has no PublicIP to route 10.5.3.0/24 to"),
        ("10.5.3.0-24", "198.18.0.1", "its next hop 198.18.0.1 is this node's own address"),
        (
            "10.5.3.0-24",
            "10.5.7.1",
            "its next hop 10.5.7.1 lies inside the pod Network 10.5.0.0/16",
        ),
    ],
)
def test_ipv4_leases(key: str, public: str, reason: str | None) -> None:
    assert VETTING.refusal(lease(key, public)) == reason


def test_a_lease_overlapping_this_nodes_subnet_is_refused() -> None:
    assert VETTING.refusal(OWN) is None  # this node's own lease is the backend's business
    other_key = lease("10.5.1.0-24&fd00:5:0:9::-64", "198.18.0.9")
    assert VETTING.refusal(other_key) == (
        "its subnet 10.5.1.0/24 overlaps this node's subnet 10.5.1.0/24"
    )


def test_ipv6_parts_are_vetted_too() -> None:
    assert VETTING.refusal(lease("10.5.2.0-24&fd00:6::-64")) == (
        "its subnet fd00:6::/64 is outside the Network fd00:5::/48"
    )
    assert VETTING.refusal(lease("10.5.2.0-24&fd00:5:0:2::-64", public6="::1")) == (
        "its next hop ::1 is a loopback address"
    )
    assert VETTING.refusal(lease("10.5.2.0-24&fd00:5:0:2::-64", public6=None)) == (
        "it has no PublicIPv6 to route fd00:5:0:2::/64 to"
    )
    assert VETTING.refusal(lease("10.5.2.0-24&fd00:5:0:2::-64", public6="fd00:5:0:7::1")) == (
        "its next hop fd00:5:0:7::1 lies inside the pod Network fd00:5::/48"
    )
    only_v6 = Lease(
        None,
        LeaseAttrs(public_ipv6=IPv6Address("2001:db8::3"), backend_type="host-gw"),
        ipv6_subnet=IPv6Network("fd00:5:0:3::/64"),
    )
    assert VETTING.refusal(only_v6) is None


def test_another_backends_lease_is_refused_by_name() -> None:
    other = Lease(OWN.subnet, LeaseAttrs(IPv4Address("198.18.0.3"), backend_type="vxlan"))
    assert VETTING.refusal(other) == (
        "its BackendType is vxlan, but this node runs host-gw backend; give every node of the "
        "network the same backend"
    )

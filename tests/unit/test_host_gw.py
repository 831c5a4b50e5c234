"""host-gw's own logic: which routes a set of leases asks for, and what it refuses at start."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from cloudroutes.backend import BackendContext, ExternalInterface, backend_factory
from cloudroutes.config import parse_config
from cloudroutes.errors import ConfigError
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.routes import Route
from providers.host_gw import HostGwBackend
from providers.kernel import KernelRouteTable

CONFIG = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}')
NAT = (
    "your PublicIP differs from interface IP, meaning that probably you're on a NAT, "
    "which is not supported by host-gw backend"
)


def iface(**changes: object) -> ExternalInterface:
    fields: dict[str, object] = {
        "name": "eth0",
        "index": 2,
        "mtu": 1500,
        "ip": IPv4Address("198.18.0.1"),
        "public_ip": IPv4Address("198.18.0.1"),
    }
    fields.update(changes)
    return ExternalInterface(**fields)  # type: ignore[arg-type]


def lease(
    subnet: str,
    public_ip: str,
    backend_type: str = "host-gw",
    v6: tuple[str, str] | None = None,
) -> Lease:
    return Lease(
        IPv4Network(subnet),
        LeaseAttrs(
            IPv4Address(public_ip),
            IPv6Address(v6[1]) if v6 else None,
            backend_type=backend_type,
        ),
        ipv6_subnet=IPv6Network(v6[0]) if v6 else None,
    )


OWN = lease("10.5.1.0/24", "198.18.0.1")


def desired(leases: list[Lease], own: Lease = OWN) -> list[Route]:
    (binding,) = HostGwBackend(BackendContext(CONFIG, iface())).bind(own)
    return sorted(binding.desired(leases), key=lambda r: (r.destination.version, r.destination))


def test_a_route_per_peer_via_its_public_ip_on_the_external_interface() -> None:
    peers = [lease("10.5.2.0/24", "198.18.0.2"), lease("10.5.3.0/24", "198.18.0.3")]

    assert desired([OWN, *peers]) == [
        Route(IPv4Network("10.5.2.0/24"), "198.18.0.2", device="eth0"),
        Route(IPv4Network("10.5.3.0/24"), "198.18.0.3", device="eth0"),
    ]
    assert [r.lease_key for r in desired(peers)] == ["10.5.2.0-24", "10.5.3.0-24"]


def test_leases_of_other_backends_are_ignored() -> None:
    leases = [
        OWN,
        lease("10.5.2.0/24", "198.18.0.2", backend_type="vxlan"),
        lease("10.5.3.0/24", "198.18.0.3", backend_type=""),  # udp leases carry no type
        lease("10.5.4.0/24", "198.18.0.4"),
    ]

    assert desired(leases) == [Route(IPv4Network("10.5.4.0/24"), "198.18.0.4", device="eth0")]


def test_dual_stack_leases_get_an_ipv6_route_too() -> None:
    own = lease("10.5.1.0/24", "198.18.0.1", v6=("2001:2:0:1::/64", "2001:2::1"))
    peer = lease("10.5.2.0/24", "198.18.0.2", v6=("2001:2:0:2::/64", "2001:2::2"))
    v6_subnet_only = Lease(
        IPv4Network("10.5.3.0/24"),
        LeaseAttrs(IPv4Address("198.18.0.3"), backend_type="host-gw"),
        ipv6_subnet=IPv6Network("2001:2:0:3::/64"),
    )

    assert desired([own, peer, v6_subnet_only], own) == [
        Route(IPv4Network("10.5.2.0/24"), "198.18.0.2", device="eth0"),
        Route(IPv4Network("10.5.3.0/24"), "198.18.0.3", device="eth0"),
        Route(IPv6Network("2001:2:0:2::/64"), "2001:2::2", device="eth0"),
    ]


def test_behind_nat_is_refused_with_flannels_words() -> None:
    with pytest.raises(ConfigError) as caught:
        HostGwBackend(BackendContext(CONFIG, iface(public_ip=IPv4Address("203.0.113.7"))))
    assert str(caught.value) == NAT

    with pytest.raises(ConfigError, match="NAT"):
        HostGwBackend(
            BackendContext(
                CONFIG,
                iface(ipv6=IPv6Address("2001:2::1"), public_ipv6=IPv6Address("2001:2::99")),
            )
        )


def test_lease_attrs_and_mtu() -> None:
    backend = HostGwBackend(
        BackendContext(
            CONFIG,
            iface(mtu=9001, ipv6=IPv6Address("2001:2::1"), public_ipv6=IPv6Address("2001:2::1")),
        )
    )

    assert backend.mtu == 9001
    assert backend.prepare() == LeaseAttrs(
        IPv4Address("198.18.0.1"), IPv6Address("2001:2::1"), backend_type="host-gw"
    )


def test_registered_by_name_with_a_kernel_table() -> None:
    backend = backend_factory("host-gw")(BackendContext(CONFIG, iface()))
    (binding,) = backend.bind(OWN)

    assert isinstance(backend, HostGwBackend)
    assert isinstance(binding.table, KernelRouteTable)
    assert binding.table.resync_period == 10.0

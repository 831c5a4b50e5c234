"""host-gw's own logic: which routes a set of leases asks for, and what it refuses at start."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from cloudroutes.backend import BackendContext, ExternalInterface, backend_factory
from cloudroutes.config import NetworkConfig, parse_config
from cloudroutes.errors import ConfigError, LeaseRefused
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.lease_vetting import LeaseVetting, vetted
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


def desired(leases: list[Lease], own: Lease = OWN, config: NetworkConfig = CONFIG) -> list[Route]:
    """The routes of ``leases`` as the agent computes them: vetted, then host-gw's."""
    backend = HostGwBackend(BackendContext(config, iface()))
    (binding,) = backend.bind(own)
    vetting = LeaseVetting(config, own=own, backend_types=backend.accepts, backend_name="host-gw")
    routes: list[Route] = []
    for one in leases:
        with contextlib.suppress(LeaseRefused):
            routes.extend(vetted(binding.desired, vetting)(one))  # type: ignore[arg-type]
    return sorted(routes, key=lambda r: (r.destination.version, r.destination))


def test_a_route_per_peer_via_its_public_ip_on_the_external_interface() -> None:
    peers = [lease("10.5.2.0/24", "198.18.0.2"), lease("10.5.3.0/24", "198.18.0.3")]

    assert desired([OWN, *peers]) == [
        Route(IPv4Network("10.5.2.0/24"), "198.18.0.2", device="eth0"),
        Route(IPv4Network("10.5.3.0/24"), "198.18.0.3", device="eth0"),
    ]
    assert [r.lease_key for r in desired(peers)] == ["10.5.2.0-24", "10.5.3.0-24"]


def test_leases_of_other_backends_are_refused() -> None:
    leases = [
        OWN,
        lease("10.5.2.0/24", "198.18.0.2", backend_type="vxlan"),
        lease("10.5.3.0/24", "198.18.0.3", backend_type=""),  # udp leases carry no type
        lease("10.5.4.0/24", "198.18.0.4"),
    ]

    assert desired(leases) == [Route(IPv4Network("10.5.4.0/24"), "198.18.0.4", device="eth0")]


def test_dual_stack_leases_get_an_ipv6_route_too() -> None:
    own = lease("10.5.1.0/24", "198.18.0.1", v6=("fd00:5:0:1::/64", "2001:2::1"))
    peer = lease("10.5.2.0/24", "198.18.0.2", v6=("fd00:5:0:2::/64", "2001:2::2"))
    v6_subnet_only = Lease(
        IPv4Network("10.5.3.0/24"),
        LeaseAttrs(IPv4Address("198.18.0.3"), backend_type="host-gw"),
        ipv6_subnet=IPv6Network("fd00:5:0:3::/64"),
    )

    dual = parse_config(
        '{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/48", '
        '"Backend": {"Type": "host-gw"}}'
    )
    assert desired([own, peer, v6_subnet_only], own, dual) == [
        Route(IPv4Network("10.5.2.0/24"), "198.18.0.2", device="eth0"),
        Route(IPv6Network("fd00:5:0:2::/64"), "2001:2::2", device="eth0"),
    ]
    # A lease with an IPv6 subnet but no PublicIPv6 cannot be routed at all, so it is refused.


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
    # IPv6 is off in the network config: flanneld publishes no PublicIPv6 then.
    assert backend.prepare() == LeaseAttrs(IPv4Address("198.18.0.1"), backend_type="host-gw")


def test_registered_by_name_with_a_kernel_table() -> None:
    backend = backend_factory("host-gw")(BackendContext(CONFIG, iface()))
    (binding,) = backend.bind(OWN)

    assert isinstance(backend, HostGwBackend)
    assert isinstance(binding.table, KernelRouteTable)
    assert binding.table.resync_period == 10.0

"""udp's own logic: options, the lease it publishes, what each lease wants, the peer table."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from cloudroutes.backend import BackendContext, ExternalInterface, backend_factory
from cloudroutes.config import parse_config
from cloudroutes.errors import ConfigError
from cloudroutes.lease import Lease, LeaseAttrs, decode_attrs, encode_attrs
from cloudroutes.lease_vetting import LeaseVetting
from cloudroutes.routes import Action, Change, Plan, Route
from providers.udp import DEVICE, PeerTable, UdpBackend, parse_port
from providers.udp_forwarder import DEFAULT_PORT, Peer

OWN = Lease(IPv4Network("10.5.1.0/24"), LeaseAttrs(IPv4Address("198.18.0.1")))
# What flanneld's udp backend writes: no BackendType, no BackendData.
FLANNELD_LEASE = '{"PublicIP":"198.18.0.2","PublicIPv6":null}'


def iface(mtu: int = 1500) -> ExternalInterface:
    address = IPv4Address("198.18.0.1")
    return ExternalInterface("eth0", 2, mtu, address, address)


def backend(options: dict[str, Any] | None = None, **kwargs: Any) -> UdpBackend:
    body = ", ".join(f'"{k}": {v}' for k, v in (options or {}).items())
    config = parse_config(
        '{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"'
        + (", " + body if body else "")
        + "}}"
    )
    return UdpBackend(BackendContext(config, kwargs.pop("iface", iface()), **kwargs))


def peer_lease(subnet: str, value: str = FLANNELD_LEASE) -> Lease:
    return Lease(IPv4Network(subnet), decode_attrs(value))


def test_the_registry_knows_udp_and_a_config_without_backend_means_udp() -> None:
    assert backend_factory("udp") is UdpBackend
    assert parse_config('{"Network": "10.5.0.0/16"}').backend_type == "udp"


def test_port_option() -> None:
    assert backend().port == DEFAULT_PORT == 8285
    assert backend({"port": 9000}).port == 9000, "keys in any case, as flanneld reads them"
    assert parse_port(9000.0) == 9000
    for bad in ('"8285"', "0", "65536", "true", "1.5"):
        with pytest.raises(ConfigError, match=r"^udp backend: Backend.Port must be a whole"):
            backend({"Port": bad})


def test_mtu_is_the_interface_mtu_less_the_outer_headers() -> None:
    assert backend().mtu == 1472
    assert backend(iface=iface(9001)).mtu == 8973
    with pytest.raises(ConfigError, match="MTU 90 leaves less than 68"):
        backend(iface=iface(90))


def test_refuses_what_it_cannot_serve() -> None:
    config = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}')
    with pytest.raises(ConfigError, match="serves the cloud backends only"):
        UdpBackend(BackendContext(config, None, controller=True))
    dual = parse_config(
        '{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fc00::/48",'
        ' "Backend": {"Type": "udp"}}'
    )
    with pytest.raises(ConfigError, match="only IPv4 networks are supported"):
        UdpBackend(BackendContext(dual, iface()))
    no_ip = ExternalInterface("eth0", 2, 1500, None, None)
    with pytest.raises(ConfigError, match="eth0 has no IPv4 address"):
        UdpBackend(BackendContext(config, no_ip))


def test_its_lease_is_flanneld_udp_format() -> None:
    b = backend()
    attrs = LeaseAttrs(public_ip=IPv4Address("198.18.0.1"))
    assert encode_attrs(attrs) == b'{"PublicIP":"198.18.0.1","PublicIPv6":null}'
    assert b.accepts == frozenset({""})
    vetting = LeaseVetting(b._config, own=OWN, backend_types=b.accepts, backend_name="udp")
    assert vetting.refusal(peer_lease("10.5.2.0/24")) is None
    vxlan = '{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"vxlan"}'
    assert "BackendType is vxlan" in (vetting.refusal(peer_lease("10.5.2.0/24", vxlan)) or "")


def test_own_lease_wants_the_network_into_the_device_and_peers_want_a_peer_entry() -> None:
    b = backend()
    kernel, peers = b.bindings(OWN)
    assert list(kernel.desired(OWN)) == [Route(IPv4Network("10.5.0.0/16"), "", device=DEVICE)]
    assert list(peers.desired(OWN)) == []
    flanneld = peer_lease("10.5.2.0/24")
    assert list(kernel.desired(flanneld)) == []
    assert list(peers.desired(flanneld)) == [
        Route(IPv4Network("10.5.2.0/24"), "198.18.0.2", device=DEVICE)
    ]
    nowhere = peer_lease("10.5.3.0/24", '{"PublicIP":"0.0.0.0","PublicIPv6":null}')
    assert list(peers.desired(nowhere)) == []


def test_blackhole_for_own_subnet_with_ip_blackhole_route() -> None:
    config = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}')
    b = UdpBackend(BackendContext(config, iface(), blackhole_own_subnet=True))
    kernel, _ = b.bindings(OWN)
    assert Route(IPv4Network("10.5.1.0/24"), "blackhole") in set(kernel.desired(OWN))


def test_peer_table_publishes_the_whole_table_after_each_change() -> None:
    published: list[list[Peer]] = []
    table = PeerTable(published.append)
    a = Route(IPv4Network("10.5.2.0/24"), "198.18.0.2", device=DEVICE)
    b = Route(IPv4Network("10.5.3.0/24"), "198.18.0.3", device=DEVICE)
    moved = Route(IPv4Network("10.5.2.0/24"), "198.18.0.9", device=DEVICE)
    outcomes = table.apply(Plan((Change(Action.ADD, a), Change(Action.ADD, b))))
    assert all(o.ok for o in outcomes)
    assert table.observe().entries() == {a, b}
    table.apply(Plan((Change(Action.REPLACE, moved, a), Change(Action.DELETE, b))))
    assert table.observe().entries() == {moved}
    assert published[-1] == [Peer(IPv4Network("10.5.2.0/24"), IPv4Address("198.18.0.9"))]

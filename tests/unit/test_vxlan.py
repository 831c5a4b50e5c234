"""vxlan's own logic: options, the lease it publishes, the entries a lease wants, DirectRouting."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from cloudroutes.backend import BackendContext, ExternalInterface, backend_factory
from cloudroutes.config import parse_config
from cloudroutes.errors import ConfigError, LeaseRefused
from cloudroutes.lease import Lease, LeaseAttrs, decode_attrs, encode_attrs
from cloudroutes.routes import Route
from providers.vxlan import (
    VxlanBackend,
    VxlanOptions,
    lease_data,
    needs_checksum_fix,
    parse_mac,
    random_mac,
    read_mac,
    write_mac,
)
from providers.vxlan_table import VxlanPeer

OWN = Lease(IPv4Network("10.5.1.0/24"), LeaseAttrs(IPv4Address("198.18.0.1"), None, "vxlan"))
FLANNELD_LEASE = (
    '{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"6e:2f:3a:11:5c:9d"}}'
)


def iface(mtu: int = 1500) -> ExternalInterface:
    address = IPv4Address("198.18.0.1")
    return ExternalInterface("eth0", 2, mtu, address, address)


def backend(options: dict[str, Any] | None = None, **kwargs: Any) -> VxlanBackend:
    config = parse_config(
        json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", **(options or {})}})
    )
    return VxlanBackend(BackendContext(config, kwargs.pop("iface", iface())), **kwargs)


def bound(
    options: dict[str, Any] | None = None, connected: str = "198.18.0.0/24", **kwargs: Any
) -> VxlanBackend:
    """A backend as after prepare() and bind(), without touching the kernel."""
    b = backend(options, **kwargs)
    b._own = OWN
    b._connected = (IPv4Network(connected),)
    return b


def peer_lease(subnet: str, public_ip: str, data: Any) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(public_ip), None, "vxlan", data))


def test_defaults() -> None:
    b = backend()
    assert b.options == VxlanOptions(vni=1, port=0, mtu=None, gbp=False, learning=False)
    assert b.device == "flannel.1"
    assert b.mtu == 1450
    assert b.accepts == frozenset({"vxlan"})


def test_options_are_read_in_any_case() -> None:
    b = backend({"vni": 4096, "PORT": 4789, "mtu": 9001, "gbp": True, "directrouting": True})
    assert b.options == VxlanOptions(4096, 4789, 9001, True, False, True)
    assert b.device == "flannel.4096"
    assert b.mtu == 8951  # the MTU option is the underlay's, as flanneld reads it (#841)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"VNI": "1"}, "vxlan backend: Backend.VNI must be a whole number from 0 to 16777215, "
                       "not '1'; fix it in the network config"),
        ({"VNI": 1 << 24}, "Backend.VNI must be a whole number from 0 to 16777215, not 16777216"),
        ({"Port": -1}, "Backend.Port must be a whole number from 0 to 65535, not -1"),
        ({"Port": True}, "Backend.Port must be a whole number from 0 to 65535, not True"),
        ({"MTU": 100}, "Backend.MTU must be a whole number from 118 to 65535, not 100"),
        ({"GBP": "yes"}, "vxlan backend: Backend.GBP must be true or false, not 'yes'"),
        ({"DirectRouting": 1}, "Backend.DirectRouting must be true or false, not 1"),
    ],
)  # fmt: skip
def test_bad_options_are_one_config_error_line(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        backend(options)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_the_controller_is_refused() -> None:
    config = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}')
    with pytest.raises(ConfigError, match="`cloudroutes controller` serves the cloud backends"):
        VxlanBackend(BackendContext(config, None, controller=True))


def test_the_registry_knows_vxlan() -> None:
    assert backend_factory("vxlan") is VxlanBackend


def test_lease_data_is_flanneld_s_json_byte_for_byte() -> None:
    attrs = LeaseAttrs(IPv4Address("198.18.0.2"), None, "vxlan", lease_data(1, "6e:2f:3a:11:5c:9d"))
    assert encode_attrs(attrs).decode() == FLANNELD_LEASE
    assert decode_attrs(FLANNELD_LEASE) == attrs


def test_a_peer_lease_wants_one_vxlan_peer() -> None:
    b = bound()
    lease = Lease(IPv4Network("10.5.2.0/24"), decode_attrs(FLANNELD_LEASE))
    assert list(b.desired(lease)) == [
        VxlanPeer(
            IPv4Network("10.5.2.0/24"), "10.5.2.0", "6e:2f:3a:11:5c:9d", "198.18.0.2", "flannel.1"
        )
    ]
    (entry,) = b.desired(lease)
    assert entry.lease_key == "10.5.2.0-24"
    assert str(entry.route) == "10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink"


def test_own_lease_wants_nothing_or_its_blackhole() -> None:
    assert list(bound().desired(OWN)) == []
    b = bound()
    b._blackhole = True
    assert list(b.desired(OWN)) == [Route(IPv4Network("10.5.1.0/24"), "blackhole")]


def test_vtep_mac_is_read_like_go_and_refused_when_bad() -> None:
    b = bound()
    upper = peer_lease("10.5.2.0/24", "198.18.0.2", {"vni": 1, "vtepmac": "6E-2F-3A-11-5C-9D"})
    assert [e.mac for e in b.desired(upper)] == ["6e:2f:3a:11:5c:9d"]  # type: ignore[attr-defined]
    for data in (None, {"VNI": 1}, {"VtepMAC": "zz"}, {"VtepMAC": "01:00:5e:00:00:01"}, [1]):
        with pytest.raises(LeaseRefused, match=r"lease 10\.5\.2\.0-24: BackendData\.VtepMAC"):
            list(b.desired(peer_lease("10.5.2.0/24", "198.18.0.2", data)))


def test_direct_routing_chooses_a_host_gw_route_for_peers_on_the_link() -> None:
    data = {"VNI": 1, "VtepMAC": "6e:2f:3a:11:5c:9d"}
    near = peer_lease("10.5.2.0/24", "198.18.0.2", data)
    far = peer_lease("10.5.3.0/24", "192.0.2.3", data)
    direct = bound({"DirectRouting": True})
    assert list(direct.desired(near)) == [Route(IPv4Network("10.5.2.0/24"), "198.18.0.2", "eth0")]
    assert [type(e) for e in direct.desired(far)] == [VxlanPeer]
    # Without the option every peer goes over vxlan.
    assert [type(e) for e in bound().desired(near)] == [VxlanPeer]


def test_peers_and_routes_sort_together() -> None:
    peer = VxlanPeer(IPv4Network("10.5.0.0/24"), "10.5.0.0", "0a:00:00:00:00:01", "1.2.3.4", "f")
    route = Route(IPv4Network("10.5.0.0/16"), "198.18.0.2")
    assert sorted([peer, route], key=lambda e: e.sort_key()) == [route, peer]


def test_macs() -> None:
    for _ in range(50):
        mac = random_mac()
        first = int(mac[:2], 16)
        assert parse_mac(mac) == mac and first & 0x02 and not first & 0x01
    assert parse_mac("0A:58:0A:F4:00:01") == "0a:58:0a:f4:00:01"
    assert parse_mac("0a:58:0a:f4:00") is None
    assert parse_mac("0a:58-0a:f4:00:01") is None


def test_the_vtep_mac_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "vxlan-1.mac"
    assert read_mac(path) is None
    write_mac(path, "0a:58:0a:f4:00:01")
    assert read_mac(path) == "0a:58:0a:f4:00:01"
    assert [p.name for p in path.parent.iterdir()] == ["vxlan-1.mac"]  # no temp file left
    assert path.stat().st_mode & 0o777 == 0o644
    path.write_text("garbage\n")
    assert read_mac(path) is None


def test_state_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDROUTES_STATE_DIR", "/srv/node")
    assert backend({"VNI": 7}).mac_file == Path("/srv/node/vxlan-7-198.18.0.1.mac")
    assert backend(state_dir="/x").mac_file == Path("/x/vxlan-1-198.18.0.1.mac")
    monkeypatch.delenv("CLOUDROUTES_STATE_DIR")
    assert backend().mac_file == Path("/var/lib/cloudroutes/vxlan-1-198.18.0.1.mac")
    # Nodes sharing a state dir (namespaces on one host) keep a VtepMAC each.
    other = IPv4Address("198.18.0.2")
    assert backend(iface=ExternalInterface("eth0", 2, 1500, other, other)).mac_file == Path(
        "/var/lib/cloudroutes/vxlan-1-198.18.0.2.mac"
    )


@pytest.mark.parametrize(
    ("release", "needed"),
    [("4.19.0-21-amd64", True), ("5.6.19", True), ("5.7.0", False), ("6.18.44-fc", False),
     ("weird", False)],
)  # fmt: skip
def test_checksum_offload_is_turned_off_only_on_kernels_with_the_bug(
    release: str, needed: bool
) -> None:
    assert needs_checksum_fix(release) is needed


def test_an_unwritable_state_dir_is_one_config_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    b = backend(state_dir=str(blocker / "state"))  # a directory under a file cannot exist
    monkeypatch.setattr(b, "_existing_mac", lambda _vtep: None)  # no kernel in a unit test
    with pytest.raises(ConfigError) as error:
        b.prepare()
    assert str(error.value) == (
        f"cannot keep the VtepMAC in {blocker}/state/vxlan-1-198.18.0.1.mac: Not a directory; "
        "set CLOUDROUTES_STATE_DIR to a writable directory that survives reboots"
    )


def test_a_peer_with_this_node_s_vtep_mac_is_refused() -> None:
    b = bound(state_dir="/var/lib/x")
    b._macs[4] = "6e:2f:3a:11:5c:9d"
    lease = Lease(IPv4Network("10.5.2.0/24"), decode_attrs(FLANNELD_LEASE))
    with pytest.raises(LeaseRefused) as error:
        list(b.desired(lease))
    assert str(error.value) == (
        "lease 10.5.2.0-24: its VtepMAC 6e:2f:3a:11:5c:9d is this node's own; every node needs "
        "its own: delete /var/lib/x/vxlan-1-198.18.0.1.mac on one of them and restart its agent"
    )


# --- IPv6 ---------------------------------------------------------------------------------------

DUAL = '"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fc00::/48"'
V6_ONLY = '"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00::/48"'
OWN6 = Lease(
    IPv4Network("10.5.1.0/24"),
    LeaseAttrs(IPv4Address("198.18.0.1"), IPv6Address("2001:db8::1"), "vxlan"),
    ipv6_subnet=IPv6Network("fc00:0:0:1::/64"),
)
FLANNELD_DUAL_LEASE = (
    '{"PublicIP":"198.18.0.2","PublicIPv6":"2001:db8::2","BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"6e:2f:3a:11:5c:9d"},'
    '"BackendV6Data":{"VNI":1,"VtepMAC":"7a:10:c2:05:44:e1"}}'
)


def iface6(mtu: int = 1500) -> ExternalInterface:
    v4, v6 = IPv4Address("198.18.0.1"), IPv6Address("2001:db8::1")
    return ExternalInterface("eth0", 2, mtu, v4, v4, v6, v6)


def backend6(
    families: str = DUAL, options: dict[str, Any] | None = None, **kwargs: Any
) -> VxlanBackend:
    config = parse_config(
        json.dumps(
            {**json.loads("{" + families + "}"), "Backend": {"Type": "vxlan", **(options or {})}}
        )
    )
    return VxlanBackend(BackendContext(config, kwargs.pop("iface", iface6())), **kwargs)


def bound6(families: str = DUAL, options: dict[str, Any] | None = None) -> VxlanBackend:
    b = backend6(families, options)
    b._own = OWN6
    b._connected = (IPv4Network("198.18.0.0/24"), IPv6Network("2001:db8::/64"))
    b._macs = {4: "0a:00:00:00:04:01", 6: "0a:00:00:00:06:01"}
    return b


def dual_lease(value: str = FLANNELD_DUAL_LEASE) -> Lease:
    return Lease(
        IPv4Network("10.5.2.0/24"), decode_attrs(value), ipv6_subnet=IPv6Network("fc00:0:0:2::/64")
    )


def test_a_dual_stack_backend_has_a_device_per_family() -> None:
    b = backend6(state_dir="/s")
    assert [(v.version, v.device, str(v.local), v.mac_file) for v in b.vteps] == [
        (4, "flannel.1", "198.18.0.1", Path("/s/vxlan-1-198.18.0.1.mac")),
        (6, "flannel-v6.1", "2001:db8::1", Path("/s/vxlan-v6-1-2001:db8::1.mac")),
    ]
    assert [b.device_mtu(v) for v in b.vteps] == [1450, 1430]
    # subnet.env: a pod's one interface carries both families, so the IPv6 device's MTU.
    assert b.mtu == 1430
    only = backend6(V6_ONLY, {"VNI": 7, "MTU": 9000})
    assert [v.device for v in only.vteps] == ["flannel-v6.7"] and only.mtu == 8930


def test_ipv6_is_refused_without_an_address_or_with_a_small_mtu() -> None:
    with pytest.raises(ConfigError) as error:
        backend6(iface=iface())
    assert str(error.value) == (
        "vxlan backend: interface eth0 has no IPv6 address for the VTEP of flannel-v6.1; "
        "choose another with --iface or set --public-ipv6"
    )
    with pytest.raises(ConfigError) as error:
        backend6(options={"MTU": 1349})
    assert str(error.value) == (
        "vxlan backend: flannel-v6.1 would get MTU 1279, below IPv6's minimum 1280; IPv6 needs "
        "an underlay MTU (Backend.MTU or eth0's) of at least 1350"
    )
    assert backend6(options={"MTU": 1350}).mtu == 1280


def test_dual_stack_and_ipv6_only_lease_values_are_flanneld_s_byte_for_byte() -> None:
    dual = LeaseAttrs(
        IPv4Address("198.18.0.2"),
        IPv6Address("2001:db8::2"),
        "vxlan",
        lease_data(1, "6e:2f:3a:11:5c:9d"),
        lease_data(1, "7a:10:c2:05:44:e1"),
    )
    assert encode_attrs(dual).decode() == FLANNELD_DUAL_LEASE
    assert decode_attrs(FLANNELD_DUAL_LEASE) == dual
    # IPv6-only: flanneld leaves PublicIP at 0.0.0.0 and writes no BackendData.
    only = LeaseAttrs(
        public_ipv6=IPv6Address("2001:db8::2"),
        backend_type="vxlan",
        backend_v6_data=lease_data(1, "7a:10:c2:05:44:e1"),
    )
    assert encode_attrs(only).decode() == (
        '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::2","BackendType":"vxlan",'
        '"BackendV6Data":{"VNI":1,"VtepMAC":"7a:10:c2:05:44:e1"}}'
    )


def test_a_dual_stack_lease_wants_one_peer_per_family() -> None:
    b = bound6()
    lease = dual_lease()
    assert list(b.desired(lease)) == [
        VxlanPeer(
            IPv4Network("10.5.2.0/24"), "10.5.2.0", "6e:2f:3a:11:5c:9d", "198.18.0.2", "flannel.1"
        )
    ]
    (peer,) = b.desired_v6(lease)
    assert peer == VxlanPeer(
        IPv6Network("fc00:0:0:2::/64"), "fc00:0:0:2::", "7a:10:c2:05:44:e1", "2001:db8::2",
        "flannel-v6.1",
    )  # fmt: skip
    assert isinstance(peer, VxlanPeer) and peer.lease_key == "10.5.2.0-24&fc00:0:0:2::-64"
    assert str(peer.route) == "fc00:0:0:2::/64 via fc00:0:0:2:: dev flannel-v6.1 onlink"
    # A peer without IPv6 wants nothing on the IPv6 device, as flanneld.
    assert list(b.desired_v6(Lease(IPv4Network("10.5.3.0/24"), decode_attrs(FLANNELD_LEASE)))) == []


def test_a_lease_without_its_v6_vtep_mac_or_public_ipv6_is_refused_for_ipv6_only() -> None:
    b = bound6()
    v6_data = ',"BackendV6Data":{"VNI":1,"VtepMAC":"7a:10:c2:05:44:e1"}'
    no_mac = dual_lease(FLANNELD_DUAL_LEASE.replace(v6_data, ""))
    with pytest.raises(LeaseRefused) as error:
        list(b.desired_v6(no_mac))
    assert str(error.value) == (
        "lease 10.5.2.0-24&fc00:0:0:2::-64: BackendV6Data.VtepMAC None is not a unicast MAC "
        'address (flanneld writes BackendV6Data as {"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"})'
    )
    no_address = dual_lease(FLANNELD_DUAL_LEASE.replace('"2001:db8::2"', "null"))
    with pytest.raises(LeaseRefused) as error:
        list(b.desired_v6(no_address))
    assert str(error.value) == (
        "lease 10.5.2.0-24&fc00:0:0:2::-64: it has the IPv6 subnet fc00:0:0:2::/64 but no "
        "PublicIPv6, so its IPv6 peer cannot be reached over vxlan; its node must run with IPv6 "
        "on its interface (or --public-ipv6)"
    )
    # Its IPv4 peer, in the other table, is untouched by either refusal.
    for lease in (no_mac, no_address):
        assert [type(e) for e in b.desired(lease)] == [VxlanPeer]


def test_a_v6_peer_with_this_node_s_v6_vtep_mac_is_refused() -> None:
    b = bound6()
    b._macs[6] = "7a:10:c2:05:44:e1"
    with pytest.raises(LeaseRefused, match=r"its VtepMAC 7a:10:c2:05:44:e1 is this node's own"):
        list(b.desired_v6(dual_lease()))
    assert [type(e) for e in b.desired(dual_lease())] == [VxlanPeer]


def test_direct_routing_gives_a_v6_peer_on_the_link_a_plain_route() -> None:
    b = bound6(options={"DirectRouting": True})
    assert list(b.desired_v6(dual_lease())) == [
        Route(IPv6Network("fc00:0:0:2::/64"), "2001:db8::2", "eth0")
    ]
    far = dual_lease(FLANNELD_DUAL_LEASE.replace("2001:db8::2", "2001:db8:1::2"))
    assert [type(e) for e in b.desired_v6(far)] == [VxlanPeer]


def test_each_family_s_table_gets_its_own_blackhole() -> None:
    b = bound6()
    b._blackhole = True
    assert list(b.desired(OWN6)) == [Route(IPv4Network("10.5.1.0/24"), "blackhole")]
    assert list(b.desired_v6(OWN6)) == [Route(IPv6Network("fc00:0:0:1::/64"), "blackhole")]

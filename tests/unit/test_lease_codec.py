"""Lease keys and values, byte-compatible with flanneld."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudroutes.errors import ConfigError
from cloudroutes.lease import (
    LeaseAttrs,
    decode_attrs,
    encode_attrs,
    parse_subnet_key,
    subnet_key,
)

FLANNEL_VXLAN = (
    b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
)


def test_flannel_vxlan_value_round_trips_byte_for_byte() -> None:
    attrs = decode_attrs(FLANNEL_VXLAN)
    assert attrs.public_ip == IPv4Address("192.168.64.3")
    assert attrs.backend_type == "vxlan"
    assert attrs.backend_data == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
    assert encode_attrs(attrs) == FLANNEL_VXLAN


def test_empty_fields_are_omitted_like_flanneld() -> None:
    # udp and the old cloud backends leave BackendType and BackendData empty.
    assert encode_attrs(LeaseAttrs(public_ip=IPv4Address("198.18.0.1"))) == (
        b'{"PublicIP":"198.18.0.1","PublicIPv6":null}'
    )
    assert encode_attrs(
        LeaseAttrs(public_ip=IPv4Address("198.18.0.1"), backend_type="host-gw")
    ) == (b'{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"host-gw"}')


def test_unknown_backend_data_fields_survive() -> None:
    value = b'{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff","InstanceID":"i-123","Zone":{"a":1}}}'
    assert encode_attrs(decode_attrs(value)) == value


def test_value_fields_match_case_insensitively() -> None:
    attrs = decode_attrs('{"publicip":"198.18.0.3","backendtype":"host-gw"}')
    assert attrs.public_ip == IPv4Address("198.18.0.3")
    assert attrs.backend_type == "host-gw"


def test_dual_stack_value() -> None:
    value = b'{"PublicIP":"198.18.0.4","PublicIPv6":"fc00::4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}'
    attrs = decode_attrs(value)
    assert str(attrs.public_ipv6) == "fc00::4"
    assert encode_attrs(attrs) == value


@pytest.mark.parametrize("bad", [b"nope", b"[]", b'{"PublicIP":"300.1.1.1"}', b'{"BackendType":5}'])
def test_bad_values_are_one_clear_error(bad: bytes) -> None:
    with pytest.raises(ConfigError) as err:
        decode_attrs(bad, where="lease /coreos.com/network/subnets/10.5.1.0-24")
    assert str(err.value).startswith("lease /coreos.com/network/subnets/10.5.1.0-24: ")


def test_keys() -> None:
    assert subnet_key(IPv4Network("10.5.34.0/24")) == "10.5.34.0-24"
    assert (
        subnet_key(IPv4Network("10.5.34.0/24"), IPv6Network("fc00::/64"))
        == "10.5.34.0-24&fc00::-64"
    )
    assert parse_subnet_key("10.5.34.0-24") == (IPv4Network("10.5.34.0/24"), None)
    assert parse_subnet_key("/coreos.com/network/subnets/10.5.34.0-24&fc00::-64") == (
        IPv4Network("10.5.34.0/24"),
        IPv6Network("fc00::/64"),
    )
    assert parse_subnet_key("config") is None
    assert parse_subnet_key("10.5.34.7-24") is None  # host bits set: not a subnet


@given(st.integers(0, 2**24 - 1), st.integers(8, 30))
def test_key_round_trip(n: int, plen: int) -> None:
    net = IPv4Network((n << 8, 32), strict=False).supernet(new_prefix=plen)
    if net.network_address == IPv4Address(0):
        return
    assert parse_subnet_key(subnet_key(net)) == (net, None)


def test_encode_is_valid_json_with_field_order() -> None:
    attrs = LeaseAttrs(
        public_ip=IPv4Address("198.18.0.5"), backend_type="vxlan", backend_data={"VNI": 2}
    )
    assert list(json.loads(encode_attrs(attrs))) == [
        "PublicIP",
        "PublicIPv6",
        "BackendType",
        "BackendData",
    ]

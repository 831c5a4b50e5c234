"""Lease keys and values, byte-compatible with flanneld."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
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


DEEP = b"[" * 30_000 + b"]" * 30_000  # under the size limit, past the recursion limit


@pytest.mark.parametrize(
    "bad",
    [
        b"nope",
        b"[]",
        b"null",
        b'"198.18.0.1"',
        b'{"PublicIP":"300.1.1.1"}',
        b'{"PublicIP":167772161}',  # Python's IPv4Address would read 10.0.0.1
        b'{"PublicIP":true}',  # ...and 0.0.0.1
        b'{"PublicIP":null}',
        b'{"PublicIP":""}',
        b'{"PublicIP":["198.18.0.1"]}',
        b'{"PublicIP":"198.18.0.1","PublicIPv6":1}',
        b'{"PublicIP":"198.18.0.1","PublicIPv6":"fe80::1%eth0"}',
        b'{"PublicIP":"198.18.0.1","PublicIPv6":"198.18.0.1"}',
        b'{"BackendType":5}',
        b'{"BackendType":false}',
        b'{"BackendType":{}}',
        b'{"PublicIP":"198.18.0.1","BackendData":{"x":NaN}}',
        b'{"PublicIP":"198.18.0.1","BackendData":1e999}',
        b'{"PublicIP":"198.18.0.1","BackendData":' + b"7" * 5000 + b"}",
        b'{"PublicIP":"198.18.0.1","BackendData":' + b"[" * 40 + b"]" * 40 + b"}",
        DEEP,
        b'{"PublicIP":"198.18.0.1","BackendData":"' + b"x" * 70_000 + b'"}',
        b'{"PublicIP":"198.18.0.1","BackendType":"\xff"}',  # invalid UTF-8
        b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark: Go refuses it
        '{"PublicIP":"198.18.0.1"}'.encode("utf-16"),
    ],
)
def test_bad_values_are_one_clear_error(bad: bytes) -> None:
    with pytest.raises(ConfigError) as err:
        decode_attrs(bad, where="lease /coreos.com/network/subnets/10.5.1.0-24")
    message = str(err.value)
    assert message.startswith("lease /coreos.com/network/subnets/10.5.1.0-24: ")
    assert "\n" not in message and len(message) < 200


def test_absent_fields_take_flannels_zero_values() -> None:
    attrs = decode_attrs(b'{"PublicIPv6":null,"BackendData":null}')
    assert attrs == LeaseAttrs()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["PublicIP", "publicip", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data", "x"]
)
VALUES = (
    st.binary(max_size=300)
    | JSON.map(lambda doc: json.dumps(doc).encode())
    | st.dictionaries(
        FIELDS, JSON | st.ip_addresses().map(str) | st.integers(0, 2**32 - 1), max_size=6
    ).map(lambda doc: json.dumps(doc).encode())
    | st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth)
)


@settings(max_examples=400)
@given(VALUES)
def test_decoding_any_value_gives_attrs_or_one_config_error(value: bytes) -> None:
    try:
        attrs = decode_attrs(value, where="k")
    except ConfigError as err:
        assert str(err).startswith("k: ") and "\n" not in str(err)
    else:
        assert isinstance(attrs, LeaseAttrs)
        assert isinstance(attrs.public_ip, IPv4Address)
        assert attrs.public_ipv6 is None or isinstance(attrs.public_ipv6, IPv6Address)
        assert isinstance(attrs.backend_type, str)
        # What was accepted can be written back, and reads the same.
        assert decode_attrs(encode_attrs(attrs)) == attrs


def test_keys() -> None:
    assert subnet_key(IPv4Network("10.5.34.0/24")) == "10.5.34.0-24"
    assert (
        subnet_key(IPv4Network("10.5.34.0/24"), IPv6Network("fc00::/64"))
        == "10.5.34.0-24&fc00::-64"
    )
    assert parse_subnet_key("10.5.34.0-24") == (IPv4Network("10.5.34.0/24"), None)
    assert parse_subnet_key("10.5.34.0-24&fc00::-64") == (
        IPv4Network("10.5.34.0/24"),
        IPv6Network("fc00::/64"),
    )
    assert parse_subnet_key("0.0.0.0-0&fc00::-64") == (None, IPv6Network("fc00::/64"))


@pytest.mark.parametrize(
    "key",
    [
        "config",
        "foo",
        "",
        "x10.5.34.0-24",  # flannel's unanchored regex would read 10.5.34.0-24 in these
        "10.5.34.0-24/extra",
        "10.5.34.0-24x",
        "/coreos.com/network/subnets/10.5.34.0-24",
        "10.5.34.7-24",  # host bits set: not a subnet
        "10.5.34.0-33",
        "10.5.34.0-024",  # not how flanneld writes it
        "010.5.34.0-24",
        "10.5.34.0-24&fc00:0::-64",
        "10.5.34.0-24&fc00::1-64",
        "10.5.34.0-24&FC00::-64",
        "0.0.0.0-0",  # no subnet at all
        "10.5.34.0-" + "9" * 5000,
    ],
)
def test_only_exact_lease_keys_parse(key: str) -> None:
    assert parse_subnet_key(key) is None


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


KEYISH = st.text(alphabet="0123456789.-&:abcdefABx/ ", max_size=40)


@given(KEYISH | st.text(max_size=40))
def test_a_key_parses_only_when_it_is_exactly_the_key_of_what_it_parses_to(key: str) -> None:
    parsed = parse_subnet_key(key)
    assert parsed is None or subnet_key(*parsed) == key

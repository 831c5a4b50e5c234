"""The route ledger's keys, values and ownership rule, without etcd."""

from __future__ import annotations

import contextlib
import json
from ipaddress import IPv4Network, IPv6Network, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudroutes.errors import ConfigError
from cloudroutes.ledger import (
    LedgerEntry,
    decode_entry,
    encode_entry,
    entry_key,
    ledger_path,
    parse_entry_key,
    within,
)

NET = IPv4Network("10.5.3.0/24")


def test_entry_keys_name_the_destination() -> None:
    assert entry_key(NET) == "10.5.3.0-24"
    assert entry_key(IPv6Network("fc00::/64")) == "fc00::-64"
    assert parse_entry_key("10.5.3.0-24") == NET
    assert parse_entry_key("fc00::-64") == IPv6Network("fc00::/64")


@given(st.ip_addresses(), st.integers(0, 128))
def test_entry_keys_round_trip_and_never_collide(address: object, length: int) -> None:
    try:
        network = ip_network(f"{address}/{length}", strict=False)
    except ValueError:
        return  # a prefix too long for IPv4
    assert parse_entry_key(entry_key(network)) == network


@pytest.mark.parametrize(
    "text",
    ["10.5.3.0/24", "10.5.3.1-24", "10.5.3.0-", "-24", "10.5.3.0-24-1", "010.5.3.0-24",
     "FC00::-64", "fc00:0::-64", "10.5.3.0-+24", "", "a/b"],
)  # fmt: skip
def test_keys_that_are_not_exactly_an_entry_key_are_refused(text: str) -> None:
    assert parse_entry_key(text) is None


def test_cluster_and_table_are_one_key_segment_each() -> None:
    # The default cluster name is the etcd prefix itself; it must not add path levels.
    path = ledger_path("/coreos.com/network", "/coreos.com/network", "projects/p/networks/n")
    assert path == (
        "/coreos.com/network/cloudroutes/routes/%2Fcoreos.com%2Fnetwork/projects%2Fp%2Fnetworks%2Fn/"
    )
    assert ledger_path("/p", "a/b", "c") != ledger_path("/p", "a", "b/c")
    with pytest.raises(ConfigError):
        ledger_path("/p", "", "rtb-1")


def test_value_is_the_documented_json_and_round_trips() -> None:
    entry = LedgerEntry(NET, "eni-0abc", lease="10.5.3.0-24", by="node-1", written=1700000000.5)
    assert json.loads(encode_entry(entry)) == {
        "destination": "10.5.3.0/24",
        "target": "eni-0abc",
        "lease": "10.5.3.0-24",
        "written": 1700000000.5,
        "by": "node-1",
    }
    assert decode_entry(NET, encode_entry(entry)) == entry
    moving = LedgerEntry(NET, "eni-new", previous_target="eni-old", written=1.0)
    assert decode_entry(NET, encode_entry(moving)) == moving


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"destination":"10.5.4.0/24","target":"eni-1"}', "differs from the key"),
        (b'{"destination":"10.5.3.0/24"}', "target is not a string"),
        (b'{"destination":"10.5.3.0/24","target":""}', "target is not 1 to"),
        (b'{"destination":"10.5.3.0/24","target":"eni-1\\n"}', "target is not 1 to"),
        (b'{"destination":"10.5.3.0/24","target":"eni-1","written":"x"}', "not a number"),
        (b'{"destination":"10.5.3.0/24","target":"eni-1","written":true}', "not a number"),
        (b'{"destination":"10.5.3.0/24","target":"eni-1","written":-1}', "not a time"),
        (b'{"destination":"10.5.3.0/24","target":"eni-1","written":1e999}', "not a time"),
        (b'{"destination":"10.5.3.0/24","target":"eni-1","by":7}', "by is not a string"),
        (b'{"destination":"10.5.3.0/24","target":"eni-1","previous_target":""}', "previous"),
        (b'{"destination":"10.5.3.0/24","target":"' + b"x" * 5000 + b'"}', "too long"),
    ],
)
def test_unreadable_values_are_refused_with_a_reason(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        decode_entry(NET, raw)


@given(st.binary(max_size=300))
def test_any_bytes_either_decode_or_raise_value_error(raw: bytes) -> None:
    with contextlib.suppress(ValueError):  # anything else (a crash) fails the test
        decode_entry(NET, raw)


def test_a_route_is_ours_only_with_the_target_the_ledger_recorded() -> None:
    entry = LedgerEntry(NET, "eni-ours")
    assert entry.owns("eni-ours")
    # Someone else's route at a destination we recorded before a create that never happened.
    assert not entry.owns("eni-theirs")
    # A retarget cut short: the old route stays ours until the replace is done.
    moving = LedgerEntry(NET, "eni-new", previous_target="eni-old")
    assert moving.owns("eni-old") and moving.owns("eni-new")
    assert not moving.owns("eni-other")


def test_only_destinations_inside_the_network_can_be_ours() -> None:
    networks = [IPv4Network("10.5.0.0/16"), IPv6Network("fc00::/48")]
    assert within(NET, networks)
    assert within(IPv6Network("fc00:0:0:3::/64"), networks)
    assert not within(IPv4Network("10.6.3.0/24"), networks)
    assert not within(IPv4Network("10.0.0.0/8"), networks)  # wider than the Network
    assert not within(IPv6Network("fc01::/64"), networks)
    assert not within(NET, [])


def test_a_confirmed_entry_owns_its_destination_whatever_it_points_at() -> None:
    destination = IPv4Network("10.5.3.0/24")
    made = LedgerEntry(destination, "eni-1", "10.5.3.0-24", "node1", written=5.0, confirmed=True)
    raw = encode_entry(made)
    assert json.loads(raw)["confirmed"] is True
    assert decode_entry(destination, raw) == made
    assert made.owns("eni-someone-pointed-it-at")  # retargeted by hand: ours, to repair
    recorded = LedgerEntry(destination, "eni-1", "10.5.3.0-24", "node1", written=5.0)
    assert "confirmed" not in json.loads(encode_entry(recorded))
    assert not recorded.owns("eni-2")  # not made yet: a route there is someone else's
    with pytest.raises(ValueError, match="confirmed"):
        decode_entry(destination, raw.replace(b"true", b'"yes"'))

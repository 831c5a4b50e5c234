"""Choosing the external interface and public IP as flanneld does, in a real namespace."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import pytest

from cloudroutes.lab.netns import Netns, link_veth
from tests.conftest import needs_root

pytestmark = [needs_root]

PROBE = """
import json, sys
from cloudroutes.errors import ConfigError
from cloudroutes.interface import choose_interface
args = json.loads(sys.argv[1])
try:
    i = choose_interface(**args)
    print(json.dumps({"name": i.name, "ip": str(i.ip), "public_ip": str(i.public_ip), "mtu": i.mtu}))
except ConfigError as exc:
    print(json.dumps({"error": str(exc)}))
"""


@pytest.fixture
def node(netns: Callable[[str], Netns]) -> Netns:
    """A node with eth0 (198.18.1.5, default route) and eth1 (198.19.7.5, MTU 9000)."""
    ns, peer = netns("ifn"), netns("ifp")
    link_veth(ns, "eth0", peer, "p0")
    link_veth(ns, "eth1", peer, "p1")
    ns.ip("addr", "add", "198.18.1.5/24", "dev", "eth0")
    ns.ip("addr", "add", "198.18.1.6/24", "dev", "eth0")
    ns.ip("addr", "add", "198.19.7.5/24", "dev", "eth1")
    ns.ip("link", "set", "eth1", "mtu", "9000")
    ns.ip("route", "add", "default", "via", "198.18.1.1", "dev", "eth0", "onlink")
    return ns


def choose(ns: Netns, **args: object) -> dict[str, object]:
    result = ns.run(sys.executable, "-c", PROBE, json.dumps(args))
    return json.loads(result.stdout)


def test_default_route_interface_and_its_first_address(node: Netns) -> None:
    assert choose(node) == {
        "name": "eth0",
        "ip": "198.18.1.5",
        "public_ip": "198.18.1.5",
        "mtu": 1500,
    }


def test_iface_by_name_or_address_in_order(node: Netns) -> None:
    assert choose(node, ifaces=["eth1"])["name"] == "eth1"
    assert choose(node, ifaces=["eth1"])["mtu"] == 9000
    picked = choose(node, ifaces=["nope0", "198.18.1.6"])
    assert (picked["name"], picked["ip"]) == ("eth0", "198.18.1.6")


def test_iface_regex_matches_addresses_then_names(node: Netns) -> None:
    assert choose(node, iface_regex=r"^198\.19\.")["name"] == "eth1"
    assert choose(node, iface_regex="th1$")["name"] == "eth1"


def test_public_ip_overrides_interface_ip(node: Netns) -> None:
    picked = choose(node, public_ip="192.0.2.10")
    assert (picked["ip"], picked["public_ip"]) == ("198.18.1.5", "192.0.2.10")


def test_nothing_matches_is_one_clear_error(node: Netns) -> None:
    error = choose(node, ifaces=["nope0"])["error"]
    assert error == (
        "failed to find any valid interface to use (tried nope0); name one with --iface or --iface-regex"
    )
    assert "not a valid regular expression" in choose(node, iface_regex="(")["error"]

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
    print(json.dumps({"name": i.name, "ip": str(i.ip), "public_ip": str(i.public_ip), "mtu": i.mtu,
                      "ipv6": str(i.ipv6)}))
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
        "ipv6": "None",  # IPv6 is looked up only when the network enables it, as in flanneld
    }


def test_iface_by_name_or_address_in_order(node: Netns) -> None:
    assert choose(node, ifaces=["eth1"])["name"] == "eth1"
    assert choose(node, ifaces=["eth1"])["mtu"] == 9000
    picked = choose(node, ifaces=["nope0", "198.18.1.6"])
    assert (picked["name"], picked["ip"]) == ("eth0", "198.18.1.6")


def test_iface_regex_matches_addresses_then_names(node: Netns) -> None:
    assert choose(node, iface_regex=r"^198\.19\.")["name"] == "eth1"
    assert choose(node, iface_regex="th1$")["name"] == "eth1"


def test_each_iface_regex_in_turn_after_the_ifaces(node: Netns) -> None:
    picked = choose(node, iface_regex=["^nothing$", r"^198\.18\.1\.6$"])
    assert (picked["name"], picked["ip"]) == ("eth0", "198.18.1.6")
    assert choose(node, ifaces=["eth1"], iface_regex=["eth0"])["name"] == "eth1"
    assert choose(node, ifaces=["nope0"], iface_regex=["nothing", "th1$"])["name"] == "eth1"


def test_iface_can_reach_takes_the_kernels_route_and_source(node: Netns) -> None:
    node.ip("addr", "add", "198.19.8.5/24", "dev", "eth1")
    node.ip("route", "add", "192.0.2.0/24", "dev", "eth1", "src", "198.19.8.5")
    picked = choose(node, iface_can_reach="192.0.2.77")
    assert (picked["name"], picked["ip"], picked["public_ip"]) == (
        "eth1",
        "198.19.8.5",
        "198.19.8.5",
    )
    assert choose(node, iface_can_reach="203.0.113.9")["name"] == "eth0"  # the default route
    assert choose(node, ifaces=["eth0"], iface_can_reach="192.0.2.77")["name"] == "eth0"
    assert choose(node, iface_can_reach="2001:db8::1")["error"] == (
        "failed to find interface to use that matches the interfaces and/or regexes provided "
        "(--iface-can-reach=2001:db8::1: no route to it (Network is unreachable)); "
        "name the external interface with --iface, e.g. --iface=eth0"
    )


def test_public_ip_overrides_interface_ip(node: Netns) -> None:
    picked = choose(node, public_ip="192.0.2.10")
    assert (picked["name"], picked["ip"], picked["public_ip"]) == (
        "eth0",
        "198.18.1.5",
        "192.0.2.10",
    )
    # Without --iface, the interface holding the public IP is the one (flanneld's lookup).
    picked = choose(node, public_ip="198.19.7.5")
    assert (picked["name"], picked["ip"]) == ("eth1", "198.19.7.5")


def test_the_loopback_interface_is_skipped_then_refused_with_the_fix(node: Netns) -> None:
    node.ip("link", "set", "lo", "up")
    assert choose(node, ifaces=["lo", "eth1"])["name"] == "eth1"
    assert choose(node, ifaces=["lo"])["error"] == (
        "failed to find interface to use that matches the interfaces and/or regexes provided "
        "(--iface=lo: lo is the loopback interface, which other nodes cannot reach); "
        "name the external interface with --iface, e.g. --iface=eth0"
    )
    assert choose(node, ifaces=["127.0.0.1"])["error"] == (
        "failed to find interface to use that matches the interfaces and/or regexes provided "
        "(--iface=127.0.0.1: lo is the loopback interface, which other nodes cannot reach); "
        "name the external interface with --iface, e.g. --iface=eth0"
    )


def test_an_interface_with_only_a_loopback_address_is_refused(
    node: Netns, netns: Callable[[str], Netns]
) -> None:
    link_veth(node, "dummy0", netns("ifq"), "q0")
    node.ip("addr", "add", "127.0.0.5/32", "dev", "dummy0")
    assert choose(node, ifaces=["dummy0"])["error"] == (
        "failed to find interface to use that matches the interfaces and/or regexes provided "
        "(--iface=dummy0: dummy0 has no usable IPv4 address (only 127.0.0.5, which other nodes "
        "cannot reach)); name the external interface with --iface, e.g. --iface=eth0"
    )
    assert choose(node, public_ip="127.0.0.5")["error"] == (
        "--public-ip 127.0.0.5 is a loopback address, which other nodes cannot reach"
    )


def test_nothing_matches_is_one_clear_error(node: Netns) -> None:
    error = choose(node, ifaces=["nope0"], iface_regex=["^x"])["error"]
    assert error == (
        "failed to find interface to use that matches the interfaces and/or regexes provided "
        "(--iface=nope0: no such interface; --iface-regex=^x: matches no address or name of the "
        "interfaces (lo, eth0, eth1)); name the external interface with --iface, e.g. --iface=eth0"
    )
    assert "not a valid regular expression" in choose(node, iface_regex="(")["error"]

"""Masquerade and forward rules in real namespaces, with iptables and with nftables.

Every rule is applied inside a namespace the test made; the machine's own rules are never read
or changed. Who masqueraded what is observed at the receiver, by the packet counter of an
``iptables -A INPUT -s <address>`` rule there.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

import pytest

from cloudroutes.lab.netns import Netns, link_veth
from cloudroutes.masq import (
    IptablesRules,
    MasqError,
    MasqSpec,
    NftRules,
    Rules,
    masquerade_rules,
)
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]

N = IPv4Network("10.5.0.0/16")
SPEC = MasqSpec(N, IPv4Network("10.5.52.0/24"))
MOVED = MasqSpec(N, IPv4Network("10.5.53.0/24"))  # the same node after a subnet change
DUAL = MasqSpec(N, SPEC.subnet, IPv6Network("fc00::/48"), IPv6Network("fc00:0:0:34::/64"))


@dataclass(frozen=True)
class Variant:
    """What differs between iptables and nftables: how a user lists and edits rules."""

    nftables: bool

    def rules(self, node: Netns, spec: MasqSpec) -> Rules:
        return masquerade_rules(spec, nftables=self.nftables, masq=True, netns=node.name)

    def listing(self, node: Netns) -> list[str]:
        """Every rule of the namespace, as `iptables-save` / `nft list ruleset` shows it."""
        if self.nftables:
            return _nonblank(node.run("nft", "list", "ruleset").stdout)
        lines = []
        for tool in ("iptables-save", "ip6tables-save"):
            for table in ("nat", "filter"):
                saved = node.run(tool, "-t", table).stdout.splitlines()
                lines += [line for line in saved if line.startswith("-A ")]
        return lines

    def expected(self, rules: Rules) -> list[str]:
        """Our rules as that listing shows them, alone in a fresh namespace."""
        if isinstance(rules, NftRules):
            return [line for text in rules.tables.values() for line in _nonblank(text)]
        assert isinstance(rules, IptablesRules)  # chains come v4 before v6, nat before filter
        return [line for chain in rules.chains for line in (chain.jump, *chain.lines)]

    def delete_third_masq_rule(self, node: Netns) -> None:
        if self.nftables:
            listed = node.run("nft", "-a", "list", "chain", "ip", "flannel-ipv4", "postrtg").stdout
            handles = re.findall(r"comment \"flanneld masq\" # handle (\d+)", listed)
            node.run("nft", "delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", handles[2])
        else:
            node.run("iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3")

    def add_operator_rule(self, node: Netns) -> str:
        """A rule an operator keeps for the underlay; returns it as the listing shows it."""
        if self.nftables:
            node.run(
                "nft",
                "-f",
                "-",
                input="table ip operator {\n chain post {\n"
                "  type nat hook postrouting priority srcnat; policy accept;\n"
                "  ip saddr 198.18.0.0/24 masquerade\n }\n}\n",
            )
            return "ip saddr 198.18.0.0/24 masquerade"
        node.run(
            "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "198.18.0.0/24", "-j", "MASQUERADE"
        )
        return "-A POSTROUTING -s 198.18.0.0/24 -j MASQUERADE"


def _nonblank(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


VARIANTS = [pytest.param(Variant(False), id="iptables"), pytest.param(Variant(True), id="nft")]


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> Variant:
    return request.param


@pytest.fixture
def node(netns: Callable[[str], Netns]) -> Netns:
    return netns("mqn")


def test_apply_shows_flannels_rules_in_order(variant: Variant, node: Netns) -> None:
    rules = variant.rules(node, DUAL)
    rules.apply()
    listing = variant.listing(node)
    assert listing == variant.expected(rules)
    if variant.nftables:
        masq_v4 = 'ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random comment "flanneld masq"'
        masq_v6 = 'ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade fully-random comment "flanneld masq"'
    else:  # iptables 1.8.9 supports --random-fully, so it must be there
        masq_v4 = '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully'
        masq_v6 = '-A FLANNEL-POSTRTG -s fc00::/48 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully'
    assert masq_v4 in listing and masq_v6 in listing
    assert rules.is_intact()


def test_fully_random_disabled_masquerades_plainly(variant: Variant, node: Netns) -> None:
    # --ip-masq-fully-random-disable, as the agent passes it.
    rules = masquerade_rules(
        SPEC, nftables=variant.nftables, masq=True, random_fully=False, netns=node.name
    )
    rules.apply()
    listing = variant.listing(node)
    if variant.nftables:
        masq = 'ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade comment "flanneld masq"'
    else:
        masq = '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE'
    assert masq in listing
    assert not [line for line in listing if "random" in line]
    assert rules.is_intact()


def test_apply_twice_keeps_one_copy(variant: Variant, node: Netns) -> None:
    rules = variant.rules(node, SPEC)
    rules.apply()
    rules.apply()
    assert variant.listing(node) == variant.expected(rules)


def test_a_rule_deleted_by_hand_is_seen_and_the_repair_restores_exactly_the_set(
    variant: Variant, node: Netns
) -> None:
    rules = variant.rules(node, SPEC)
    rules.apply()
    variant.delete_third_masq_rule(node)
    assert not rules.is_intact()
    assert rules.broken() == (
        ["nft table ip flannel-ipv4"] if variant.nftables else ["iptables nat FLANNEL-POSTRTG"]
    )
    rules.apply()
    assert variant.listing(node) == variant.expected(rules)
    assert rules.is_intact()


def test_keep_repairs_in_the_background_and_says_so(
    variant: Variant, node: Netns, caplog: pytest.LogCaptureFixture
) -> None:
    rules = variant.rules(node, SPEC)
    rules.apply()
    stop = threading.Event()
    keeper = threading.Thread(target=rules.keep, args=(stop, 0.05), daemon=True)
    with caplog.at_level(logging.WARNING, logger="cloudroutes.masq"):
        keeper.start()
        try:
            variant.delete_third_masq_rule(node)
            assert _eventually(lambda: variant.listing(node) == variant.expected(rules))
        finally:
            stop.set()
            keeper.join()
    assert len(caplog.messages) == 1
    assert caplog.messages[0].startswith("rebuilt masquerade/forward rules: ")


def test_removal_after_a_subnet_change_leaves_other_rules_alone(
    variant: Variant, node: Netns
) -> None:
    old = variant.rules(node, SPEC)
    old.apply()
    operator = variant.add_operator_rule(node)
    old.remove()
    assert variant.listing(node).count(operator) == 1
    assert not [line for line in variant.listing(node) if "flanneld" in line]

    old.apply()
    new = variant.rules(node, MOVED)
    old.remove()  # before the new set: both share the mark rule
    new.apply()
    listing = variant.listing(node)
    assert listing.count(operator) == 1
    ours = [line for line in listing if "flanneld" in line]
    assert ours == [line for line in variant.expected(new) if "flanneld" in line]
    assert not [line for line in listing if "10.5.52.0/24" in line]
    assert new.is_intact()


def _eventually(check: Callable[[], bool], tries: int = 200) -> bool:
    """Poll a condition a bounded number of times (the keeper runs in its own thread)."""
    for _ in range(tries):
        if check():
            return True
        time.sleep(0.05)
    return False


# ---- the data path: who arrives with which source address ------------------------------------
@dataclass(frozen=True)
class Topology:
    """pod 10.5.52.2 and peer pod 10.5.53.2 behind node; outside 198.18.0.2 on the node's eth0."""

    node: Netns
    pod: Netns
    peer: Netns
    outside: Netns


@pytest.fixture
def topo(netns: Callable[[str], Netns]) -> Topology:
    t = Topology(netns("mqn"), netns("mqp"), netns("mqq"), netns("mqo"))
    for ns, node_if, node_addr, addr in (
        (t.pod, "vpod", "10.5.52.1/24", "10.5.52.2/24"),
        (t.peer, "vpeer", "10.5.53.1/24", "10.5.53.2/24"),
        (t.outside, "eth0", "198.18.0.1/24", "198.18.0.2/24"),
    ):
        link_veth(ns, "eth0", t.node, node_if)
        t.node.ip("addr", "add", node_addr, "dev", node_if)
        ns.ip("addr", "add", addr, "dev", "eth0")
    t.pod.ip("route", "add", "default", "via", "10.5.52.1")
    t.peer.ip("route", "add", "default", "via", "10.5.53.1")
    # The outside host can route back to pods, so only the counters tell NAT from no NAT.
    t.outside.ip("route", "add", "10.5.0.0/16", "via", "198.18.0.1")
    t.node.sysctl("net.ipv4.ip_forward", "1")
    for ns, sources in ((t.outside, OUTSIDE_SEES), (t.peer, PEER_SEES)):
        for source in sources:
            ns.run("iptables", "-A", "INPUT", "-p", "icmp", "-s", source, "-j", "ACCEPT")
    return t


OUTSIDE_SEES = ("10.5.52.2", "198.18.0.1")  # the pod itself, or the node masquerading it
PEER_SEES = ("10.5.52.2", "10.5.53.1")


def seen(ns: Netns) -> dict[str, int]:
    """ICMP packets that arrived in ns, by source address (the observer rules' counters)."""
    counted = {}
    for line in ns.run("iptables-save", "-c", "-t", "filter").stdout.splitlines():
        found = re.match(r"\[(\d+):\d+\] -A INPUT -s ([\d.]+)/32 -p icmp -j ACCEPT$", line)
        if found:
            counted[found[2]] = int(found[1])
    return counted


def test_pods_are_masqueraded_to_the_outside_but_not_to_other_pods(
    variant: Variant, topo: Topology
) -> None:
    # Without rules the outside host sees the pod's own address: the observer works.
    assert topo.pod.ping("198.18.0.2")
    assert seen(topo.outside) == {"10.5.52.2": 1, "198.18.0.1": 0}

    variant.rules(topo.node, SPEC).apply()
    assert topo.pod.ping("198.18.0.2")
    assert seen(topo.outside) == {"10.5.52.2": 1, "198.18.0.1": 1}
    assert topo.pod.ping("10.5.53.2")
    assert seen(topo.peer) == {"10.5.52.2": 1, "10.5.53.1": 0}


def test_forward_rules_let_pod_traffic_through_a_drop_policy(topo: Topology) -> None:
    topo.node.run("iptables", "-P", "FORWARD", "DROP")
    assert not topo.pod.ping("198.18.0.2")
    masquerade_rules(SPEC, nftables=False, masq=False, forward=True, netns=topo.node.name).apply()
    assert topo.pod.ping("198.18.0.2")
    assert topo.pod.ping("10.5.53.2")


@pytest.mark.parametrize("nftables", [False, True], ids=["iptables", "nft"])
def test_a_failing_tool_reads_as_one_line(nftables: bool) -> None:
    rules = masquerade_rules(SPEC, nftables=nftables, masq=True, random_fully=True, netns="mqgone")
    with pytest.raises(MasqError) as err:
        rules.apply()
    first = "iptables-save -t nat" if not nftables else "nft -f -"
    assert str(err.value) == (
        f'{first} failed: Cannot open network namespace "mqgone": No such file or directory'
    )

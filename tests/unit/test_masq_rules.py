"""Golden text of the masquerade and forward rules (flannel.md §5), and how tool errors read."""

from __future__ import annotations

import logging
import stat
import threading
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from cloudroutes.errors import CloudroutesError, ConfigError
from cloudroutes.masq import (
    MasqError,
    MasqSpec,
    MasqToolMissing,
    Rules,
    Runner,
    iptables_chains,
    masquerade_rules,
    nft_removal_script,
    nft_script,
    nft_tables,
    removal_payload,
    restore_payload,
    supports_random_fully,
)

N, P = IPv4Network("10.5.0.0/16"), IPv4Network("10.5.52.0/24")
N6, P6 = IPv6Network("fc00::/48"), IPv6Network("fc00:0:0:34::/64")
SPEC = MasqSpec(N, P)
DUAL = MasqSpec(N, P, N6, P6)

NAT_RANDOM_FULLY = """\
*nat
:FLANNEL-POSTRTG - [0:0]
-I POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.5.52.0/24 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.52.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.52.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
"""

# The jump is already there: the payload only (re)declares, and so flushes, our chain.
NAT_PLAIN_NO_JUMP = """\
*nat
:FLANNEL-POSTRTG - [0:0]
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.5.52.0/24 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.52.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.52.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE
-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE
COMMIT
"""

FILTER = """\
*filter
:FLANNEL-FWD - [0:0]
-I FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
COMMIT
"""

NAT6 = """\
*nat
:FLANNEL-POSTRTG - [0:0]
-I POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fc00:0:0:34::/64 -d fc00::/48 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fc00::/48 -d fc00:0:0:34::/64 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s fc00::/48 -d fc00:0:0:34::/64 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fc00::/48 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s fc00::/48 -d fc00::/48 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
"""

FILTER6 = """\
*filter
:FLANNEL-FWD - [0:0]
-I FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s fc00::/48 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d fc00::/48 -m comment --comment "flanneld forward" -j ACCEPT
COMMIT
"""

NFT_DUAL = """\
table ip flannel-ipv4
delete table ip flannel-ipv4
table ip flannel-ipv4 {
	chain postrtg {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 return comment "flanneld masq"
		ip saddr 10.5.52.0/24 ip daddr 10.5.0.0/16 return comment "flanneld masq"
		ip saddr 10.5.0.0/16 ip daddr 10.5.52.0/24 return comment "flanneld masq"
		ip saddr != 10.5.0.0/16 ip daddr 10.5.52.0/24 return comment "flanneld masq"
		ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random comment "flanneld masq"
		ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random comment "flanneld masq"
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		ip saddr 10.5.0.0/16 accept comment "flanneld forward"
		ip daddr 10.5.0.0/16 accept comment "flanneld forward"
	}
}
table ip6 flannel-ipv6
delete table ip6 flannel-ipv6
table ip6 flannel-ipv6 {
	chain postrtg {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 return comment "flanneld masq"
		ip6 saddr fc00:0:0:34::/64 ip6 daddr fc00::/48 return comment "flanneld masq"
		ip6 saddr fc00::/48 ip6 daddr fc00:0:0:34::/64 return comment "flanneld masq"
		ip6 saddr != fc00::/48 ip6 daddr fc00:0:0:34::/64 return comment "flanneld masq"
		ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade fully-random comment "flanneld masq"
		ip6 saddr != fc00::/48 ip6 daddr fc00::/48 masquerade fully-random comment "flanneld masq"
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		ip6 saddr fc00::/48 accept comment "flanneld forward"
		ip6 daddr fc00::/48 accept comment "flanneld forward"
	}
}
"""


def payloads(spec: MasqSpec, **kw: bool) -> list[str]:
    return [restore_payload(c, add_jump=True) for c in iptables_chains(spec, **kw)]


def test_iptables_nat_and_filter_with_random_fully() -> None:
    assert payloads(SPEC, masq=True, forward=True, random_fully=True) == [NAT_RANDOM_FULLY, FILTER]


def test_iptables_nat_without_random_fully_and_with_the_jump_already_there() -> None:
    (nat,) = iptables_chains(SPEC, masq=True, forward=False, random_fully=False)
    assert restore_payload(nat, add_jump=False) == NAT_PLAIN_NO_JUMP


def test_dual_stack_uses_ip6tables_and_ff00_for_ipv6() -> None:
    chains = iptables_chains(DUAL, masq=True, forward=True, random_fully=True)
    assert [c.ipv6 for c in chains] == [False, False, True, True]
    got = [restore_payload(c, add_jump=True) for c in chains]
    assert got == [NAT_RANDOM_FULLY, FILTER, NAT6, FILTER6]


def test_forward_only_and_nothing() -> None:
    assert payloads(SPEC, masq=False, forward=True, random_fully=True) == [FILTER]
    assert payloads(SPEC, masq=False, forward=False, random_fully=True) == []


def test_nft_script_dual_stack() -> None:
    assert nft_script(nft_tables(DUAL, masq=True, forward=True)) == NFT_DUAL


def test_nft_script_forward_only() -> None:
    # The IPv4 part of the dual-stack golden text without its postrtg chain.
    v4 = NFT_DUAL[: NFT_DUAL.index("table ip6")]
    forward_only = v4[: v4.index("\tchain postrtg")] + v4[v4.index("\tchain forward") :]
    assert nft_script(nft_tables(SPEC, masq=False, forward=True)) == forward_only
    assert nft_tables(SPEC, masq=False, forward=False) == {}


def test_nft_removal_deletes_only_our_tables() -> None:
    tables = nft_tables(DUAL, masq=True, forward=True)
    assert nft_removal_script(list(tables)) == (
        "table ip flannel-ipv4\ndelete table ip flannel-ipv4\n"
        "table ip6 flannel-ipv6\ndelete table ip6 flannel-ipv6\n"
    )


def saved_nat(*extra: str, chain_rules: list[str] | None = None) -> str:
    """A table as iptables-save prints it, holding our set (or the given chain rules)."""
    (nat,) = iptables_chains(SPEC, masq=True, forward=False, random_fully=True)
    lines = nat.lines if chain_rules is None else chain_rules
    return "\n".join(
        [
            "*nat",
            ":POSTROUTING ACCEPT [0:0]",
            ":FLANNEL-POSTRTG - [0:0]",
            nat.jump,
            *extra,
            *lines,
            "COMMIT",
            "",
        ]
    )


def test_removal_deletes_our_rules_the_jump_and_the_chain_and_nothing_else() -> None:
    (nat,) = iptables_chains(SPEC, masq=True, forward=False, random_fully=True)
    operator = "-A POSTROUTING -s 198.18.0.0/24 -j MASQUERADE"
    payload = removal_payload(nat, saved_nat(operator))
    assert payload == "\n".join(
        [
            "*nat",
            *("-D" + line[2:] for line in nat.lines),
            '-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
            "-X FLANNEL-POSTRTG",
            "COMMIT",
            "",
        ]
    )
    assert operator[2:] not in payload


def test_removal_keeps_the_chain_when_someone_else_uses_it() -> None:
    (nat,) = iptables_chains(SPEC, masq=True, forward=False, random_fully=True)
    foreign = "-A FLANNEL-POSTRTG -s 198.18.0.0/24 -j RETURN"
    payload = removal_payload(nat, saved_nat(chain_rules=[*nat.lines[:2], foreign]))
    assert payload == "\n".join(
        ["*nat", *("-D" + line[2:] for line in nat.lines[:2]), "COMMIT", ""]
    )
    referenced = saved_nat("-A OTHER -j FLANNEL-POSTRTG")
    assert "-X FLANNEL-POSTRTG" not in (removal_payload(nat, referenced) or "")


def test_removal_of_a_set_that_is_not_there_does_nothing() -> None:
    (nat,) = iptables_chains(SPEC, masq=True, forward=False, random_fully=True)
    assert removal_payload(nat, "*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subnet": P}, "masquerade rules for the subnet 10.5.52.0/24 need its network"),
        (
            {"network": N, "subnet": IPv4Network("10.6.1.0/24")},
            "the subnet 10.6.1.0/24 is not inside the network 10.5.0.0/16",
        ),
        ({}, "masquerade rules need an IPv4 or an IPv6 network"),
        (
            {"network": N, "subnet": P, "ipv6_network": N6, "ipv6_subnet": P},
            "the network fc00::/48 and IPv6 subnet 10.5.52.0/24 must be IPv6",
        ),
    ],
)
def test_spec_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        MasqSpec(**kwargs)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_a_network_without_a_lease_yet_gives_no_rules() -> None:
    spec = MasqSpec(network=N)
    assert iptables_chains(spec, masq=True, forward=True, random_fully=True) == []
    assert nft_tables(spec, masq=True, forward=True) == {}


# ---- tool errors, with stand-in binaries on PATH ----------------------------------------------
@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put scripts named like the tools first on an otherwise empty PATH."""
    monkeypatch.setenv("PATH", str(tmp_path))

    def make(name: str, script: str) -> None:
        path = tmp_path / name
        path.write_text("#!/bin/sh\n" + script + "\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    return make


def test_missing_binary_is_one_line(fake_bin) -> None:
    with pytest.raises(MasqToolMissing) as err:
        masquerade_rules(SPEC, nftables=True, masq=True)
    assert str(err.value) == "nft not found: install the nftables package"
    with pytest.raises(
        CloudroutesError, match=r"^iptables not found: install the iptables package$"
    ):
        masquerade_rules(SPEC, nftables=False, masq=True)
    # No rules wanted, no tool needed.
    assert masquerade_rules(SPEC, nftables=False, masq=False, forward=False).is_intact()


def test_a_failing_restore_names_the_command_and_its_first_error_line(fake_bin) -> None:
    fake_bin("iptables", "echo 'iptables v1.8.9 (nf_tables)'")
    fake_bin("iptables-save", "echo '*nat'")
    fake_bin(
        "iptables-restore", "echo 'iptables-restore: line 3 failed' >&2; echo more >&2; exit 1"
    )
    rules = masquerade_rules(SPEC, nftables=False, masq=True, forward=False, random_fully=True)
    with pytest.raises(MasqError) as err:
        rules.apply()
    assert (
        str(err.value)
        == "iptables-restore --noflush --wait failed: iptables-restore: line 3 failed"
    )


def test_permission_denied_reads_as_one_line(fake_bin) -> None:
    fake_bin("nft", "echo 'Error: Could not process rule: Operation not permitted' >&2; exit 1")
    rules = masquerade_rules(SPEC, nftables=True, masq=True)
    with pytest.raises(MasqError) as err:
        rules.apply()
    assert (
        str(err.value) == "nft -f - failed: Error: Could not process rule: Operation not permitted"
    )


@pytest.mark.parametrize(
    ("version", "expected"),
    [("iptables v1.8.9 (nf_tables)", True), ("iptables v1.6.2", True), ("iptables v1.6.1", False)],
)
def test_random_fully_follows_the_iptables_version(fake_bin, version: str, expected: bool) -> None:
    fake_bin("iptables", f"echo '{version}'")
    # Unwrapped: the real function remembers its answer for the rest of the process.
    assert supports_random_fully.__wrapped__(Runner()) is expected


# ---- the keep loop -----------------------------------------------------------------------------
class Flaky(Rules):
    """Broken on the first check, intact after one repair; stops the loop on the second check."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__(Runner())
        self.stop, self.applied, self.checks = stop, 0, 0

    def apply(self) -> None:
        self.applied += 1

    def broken(self) -> list[str]:
        self.checks += 1
        if self.checks == 2:
            self.stop.set()
        return ["iptables nat FLANNEL-POSTRTG"] if self.applied == 0 else []

    def remove(self) -> None:
        raise AssertionError("keep never removes")


def test_keep_repairs_once_and_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()
    rules = Flaky(stop)
    with caplog.at_level(logging.WARNING, logger="cloudroutes.masq"):
        rules.keep(stop, resync=0)
    assert rules.applied == 1
    assert caplog.messages == [
        "rebuilt masquerade/forward rules: iptables nat FLANNEL-POSTRTG changed"
    ]


def test_nft_without_fully_random_when_disabled() -> None:
    # --ip-masq-fully-random-disable: flanneld's nftables rules say plain "masquerade".
    plain = nft_script(nft_tables(DUAL, masq=True, forward=True, random_fully=False))
    assert plain == NFT_DUAL.replace("masquerade fully-random", "masquerade")
    assert "fully-random" not in plain

"""Masquerade and forward rules, the same as flanneld's (flannel.md §5), in iptables or nftables.

The agent builds one ``Rules`` object with ``masquerade_rules()``, calls ``apply()`` once, then
runs ``keep()`` in a thread: every ``--iptables-resync`` seconds it checks that every rule is
still there, in order, and rebuilds the whole set when one is not. When the network or the
subnet changed since the last run, the agent first calls ``remove()`` on the rules of the old
spec (read from the old subnet.env), then ``apply()`` on the new ones: the mark rule is the same
in both sets, so removing the old set after applying the new one would take it away.

The rule text is produced by pure functions (``iptables_chains``, ``restore_payload``,
``nft_script``) so it can be golden-tested. Rule lines are written exactly as ``iptables-save``
and ``nft list`` print them, so the same text serves as payload and as the expected listing.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import subprocess
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from cloudroutes.errors import CloudroutesError, ConfigError

log = logging.getLogger(__name__)

MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"
# kube-proxy marks packets it will masquerade itself; flannel returns early to avoid double NAT.
KUBE_PROXY_MARK = "0x4000/0x4000"
TOOL_TIMEOUT = 30.0  # --wait blocks on the xtables lock; never hang the agent forever
DEFAULT_RESYNC = 5.0  # flannel's --iptables-resync

Net = IPv4Network | IPv6Network


class MasqError(CloudroutesError):
    """iptables or nft refused or failed: the message names the command and its error."""


class MasqToolMissing(MasqError):
    """iptables or nft is not installed."""


@dataclass(frozen=True)
class MasqSpec:
    """What the rules are for: the Network and this node's subnet, per address family.

    A network without a subnet (no lease yet) gives no rules for that family.
    """

    network: IPv4Network | None = None
    subnet: IPv4Network | None = None
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None

    def __post_init__(self) -> None:
        for net, sub, version, name in (
            (self.network, self.subnet, 4, "subnet"),
            (self.ipv6_network, self.ipv6_subnet, 6, "IPv6 subnet"),
        ):
            if sub is None:
                continue
            if net is None:
                raise ConfigError(f"masquerade rules for the {name} {sub} need its network")
            if net.version != version or sub.version != version:
                raise ConfigError(f"the network {net} and {name} {sub} must be IPv{version}")
            if not sub.subnet_of(net):  # type: ignore[arg-type]
                raise ConfigError(f"the {name} {sub} is not inside the network {net}")
        if self.network is None and self.ipv6_network is None:
            raise ConfigError("masquerade rules need an IPv4 or an IPv6 network")

    def families(self) -> list[tuple[Net, Net]]:
        pairs = [(self.network, self.subnet), (self.ipv6_network, self.ipv6_subnet)]
        return [(n, s) for n, s in pairs if n is not None and s is not None]


# ---- the rules, family- and tool-neutral -------------------------------------------------------
# A match is (source, destination); "!" in front negates an address, None matches anything.
Match = tuple[str | None, str | None]


def _masq_matches(network: Net, subnet: Net) -> list[tuple[Match, bool]]:
    """flannel's rules 2-6 as (match, masquerade?); rule 1 (the mark) is tool-specific."""
    n, p = str(network), str(subnet)
    multicast = "224.0.0.0/4" if network.version == 4 else "ff00::/8"
    return [
        ((p, n), False),  # pod to pod: keep the pod's address
        ((n, p), False),
        ((f"!{n}", p), False),  # from outside to our pods (e.g. NodePort): not ours to NAT
        ((n, f"!{multicast}"), True),  # pods to the world
        ((f"!{n}", n), True),  # the host to pods on other nodes
    ]


def _forward_matches(network: Net) -> list[Match]:
    return [(str(network), None), (None, str(network))]


# ---- iptables ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class IptChain:
    """One chain of ours in one table, and the jump to it from a built-in chain."""

    ipv6: bool
    table: str  # "nat" | "filter"
    parent: str  # "POSTROUTING" | "FORWARD"
    name: str  # "FLANNEL-POSTRTG" | "FLANNEL-FWD"
    comment: str
    rules: tuple[str, ...]  # each as iptables-save prints it after "-A <name> "

    @property
    def jump(self) -> str:
        return f'-A {self.parent} -m comment --comment "{self.comment}" -j {self.name}'

    @property
    def lines(self) -> list[str]:
        return [f"-A {self.name} {rule}" for rule in self.rules]

    @property
    def label(self) -> str:
        return f"{'ip6tables' if self.ipv6 else 'iptables'} {self.table} {self.name}"


def _ipt_match(match: Match) -> str:
    parts = []
    for flag, addr in zip(("-s", "-d"), match, strict=True):
        if addr is not None:
            parts.append(f"! {flag} {addr[1:]}" if addr.startswith("!") else f"{flag} {addr}")
    return " ".join(parts)


def iptables_chains(
    spec: MasqSpec, *, masq: bool, forward: bool, random_fully: bool
) -> list[IptChain]:
    """Our chains for each family in the spec: nat FLANNEL-POSTRTG, filter FLANNEL-FWD."""
    chains = []
    masquerade = "MASQUERADE --random-fully" if random_fully else "MASQUERADE"
    for network, subnet in spec.families():
        ipv6 = network.version == 6
        if masq:
            comment = f'-m comment --comment "{MASQ_COMMENT}"'
            rules = [f"-m mark --mark {KUBE_PROXY_MARK} {comment} -j RETURN"]
            for match, nat in _masq_matches(network, subnet):
                rules.append(f"{_ipt_match(match)} {comment} -j {masquerade if nat else 'RETURN'}")
            chains.append(
                IptChain(ipv6, "nat", "POSTROUTING", "FLANNEL-POSTRTG", MASQ_COMMENT, tuple(rules))
            )
        if forward:
            comment = f'-m comment --comment "{FORWARD_COMMENT}"'
            rules = [f"{_ipt_match(m)} {comment} -j ACCEPT" for m in _forward_matches(network)]
            chains.append(
                IptChain(ipv6, "filter", "FORWARD", "FLANNEL-FWD", FORWARD_COMMENT, tuple(rules))
            )
    return chains


def restore_payload(chain: IptChain, *, add_jump: bool) -> str:
    """The iptables-restore --noflush input that (re)builds one chain of ours.

    With --noflush, declaring a user chain creates it or flushes it (iptables-legacy and -nft
    alike), so the payload is idempotent; the jump is inserted only when it is missing.
    """
    lines = [f"*{chain.table}", f":{chain.name} - [0:0]"]
    if add_jump:
        lines.append("-I" + chain.jump[2:])  # -I: our chain goes before any other rule
    lines += [*chain.lines, "COMMIT", ""]
    return "\n".join(lines)


def removal_payload(chain: IptChain, saved: str) -> str | None:
    """The input that deletes exactly our rules from a table as ``iptables-save -t`` printed it.

    The chain and its jump go too once nothing else is left in it or points at it; any other
    rule stays. None when there is nothing to delete.
    """
    present = saved.splitlines()
    ours = set(chain.lines)
    in_chain = [line for line in present if line.startswith(f"-A {chain.name} ")]
    deletes = ["-D" + line[2:] for line in in_chain if line in ours]
    # Drop the chain only when nothing else is in it and only our own jumps point at it.
    refs = [line for line in present if re.search(rf" -[jg] {re.escape(chain.name)}( |$)", line)]
    empty = all(line in ours for line in in_chain)
    if empty and f":{chain.name} " in saved and all(line == chain.jump for line in refs):
        deletes += ["-D" + line[2:] for line in refs] + [f"-X {chain.name}"]
    if not deletes:
        return None
    return "\n".join([f"*{chain.table}", *deletes, "COMMIT", ""])


# ---- nftables ----------------------------------------------------------------------------------
def _nft_match(match: Match, family: str) -> str:
    parts = []
    for key, addr in zip(("saddr", "daddr"), match, strict=True):
        if addr is not None:
            negated = addr.startswith("!")
            parts.append(f"{family} {key} {'!= ' if negated else ''}{addr.lstrip('!')}")
    return " ".join(parts)


def nft_tables(
    spec: MasqSpec, *, masq: bool, forward: bool, random_fully: bool = True
) -> dict[str, str]:
    """Our tables, keyed "ip flannel-ipv4" / "ip6 flannel-ipv6", each as `nft list` prints it."""
    tables = {}
    masquerade = "masquerade fully-random" if random_fully else "masquerade"
    for network, subnet in spec.families():
        family = "ip" if network.version == 4 else "ip6"
        chains = []
        if masq:
            comment = f'comment "{MASQ_COMMENT}"'
            rules = [f"meta mark & 0x00004000 == 0x00004000 return {comment}"]  # kube-proxy's
            for match, nat in _masq_matches(network, subnet):
                verdict = masquerade if nat else "return"
                rules.append(f"{_nft_match(match, family)} {verdict} {comment}")
            chains.append(("postrtg", "type nat hook postrouting priority srcnat", rules))
        if forward:
            comment = f'comment "{FORWARD_COMMENT}"'
            rules = [f"{_nft_match(m, family)} accept {comment}" for m in _forward_matches(network)]
            chains.append(("forward", "type filter hook forward priority filter", rules))
        if chains:
            name = f"{family} flannel-ipv{network.version}"
            lines = [f"table {name} {{"]
            for i, (chain, hook, rules) in enumerate(chains):
                if i:
                    lines.append("")  # nft prints a blank line between chains
                lines += [f"\tchain {chain} {{", f"\t\t{hook}; policy accept;"]
                lines += [f"\t\t{rule}" for rule in rules] + ["\t}"]
            tables[name] = "\n".join([*lines, "}", ""])
    return tables


def nft_script(tables: Mapping[str, str]) -> str:
    """An `nft -f -` script that replaces our tables in one transaction.

    "table X" first creates X if it is missing, so that "delete table X" cannot fail.
    """
    return "".join(f"table {n}\ndelete table {n}\n{text}" for n, text in tables.items())


def nft_removal_script(tables: Sequence[str]) -> str:
    """An `nft -f -` script that deletes our tables (they hold nothing but our rules)."""
    return "".join(f"table {n}\ndelete table {n}\n" for n in tables)


# ---- running the tools -------------------------------------------------------------------------
@dataclass(frozen=True)
class Runner:
    """Runs iptables or nft, in a network namespace when given one; failures become one line."""

    netns: str | None = None

    def __call__(self, *cmd: str, stdin: str | None = None) -> str:
        shown = " ".join(cmd)
        self.require(cmd[0])
        try:
            proc = subprocess.run(
                [*(("ip", "netns", "exec", self.netns) if self.netns else ()), *cmd],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=TOOL_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise MasqError(f"{shown} did not finish in {TOOL_TIMEOUT:g} s") from None
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if ln.strip()), "")
            raise MasqError(f"{shown} failed: {first or f'exit status {proc.returncode}'}")
        return proc.stdout

    @staticmethod
    def require(tool: str) -> None:
        # `ip netns exec` sees the same files, so looking here is enough for both cases.
        if shutil.which(tool) is None:
            package = "nftables" if tool == "nft" else "iptables"
            raise MasqToolMissing(f"{tool} not found: install the {package} package")


@functools.cache
def supports_random_fully(runner: Runner) -> bool:
    """iptables knows MASQUERADE --random-fully from 1.6.2 on (flannel checks the same)."""
    found = re.search(r"v(\d+)\.(\d+)\.(\d+)", runner("iptables", "--version"))
    return found is not None and tuple(map(int, found.groups())) >= (1, 6, 2)


# ---- the common interface ----------------------------------------------------------------------
class Rules(ABC):
    """One set of masquerade/forward rules that can be applied, checked, kept and removed."""

    def __init__(self, runner: Runner) -> None:
        self.run = runner

    @abstractmethod
    def apply(self) -> None:
        """(Re)build the whole set; applying twice leaves one copy."""

    @abstractmethod
    def broken(self) -> list[str]:
        """The parts (chains or tables) whose rules are missing, extra or out of order."""

    @abstractmethod
    def remove(self) -> None:
        """Delete exactly these rules; rules that are not ours stay."""

    def is_intact(self) -> bool:
        return not self.broken()

    def keep(self, stop: threading.Event, resync: float = DEFAULT_RESYNC) -> None:
        """Re-check every ``resync`` seconds until ``stop`` is set; rebuild when broken."""
        while not stop.wait(resync):
            try:
                broken = self.broken()
                if broken:
                    self.apply()
                    log.warning("rebuilt masquerade/forward rules: %s changed", ", ".join(broken))
            except MasqError as exc:  # keep trying: the next round may succeed
                log.error("cannot keep masquerade/forward rules: %s", exc)


class IptablesRules(Rules):
    def __init__(self, chains: Sequence[IptChain], runner: Runner) -> None:
        super().__init__(runner)
        self.chains = list(chains)

    def _save(self, chain: IptChain) -> str:
        return self.run("ip6tables-save" if chain.ipv6 else "iptables-save", "-t", chain.table)

    def _restore(self, chain: IptChain, payload: str) -> None:
        tool = "ip6tables-restore" if chain.ipv6 else "iptables-restore"
        self.run(tool, "--noflush", "--wait", stdin=payload)

    def apply(self) -> None:
        for chain in self.chains:
            add_jump = chain.jump not in self._save(chain).splitlines()
            self._restore(chain, restore_payload(chain, add_jump=add_jump))

    def broken(self) -> list[str]:
        broken = []
        for chain in self.chains:
            saved = self._save(chain).splitlines()
            lines = [line for line in saved if line.startswith(f"-A {chain.name} ")]
            if lines != chain.lines or chain.jump not in saved:
                broken.append(chain.label)
        return broken

    def remove(self) -> None:
        for chain in self.chains:
            payload = removal_payload(chain, self._save(chain))
            if payload:
                self._restore(chain, payload)


class NftRules(Rules):
    def __init__(self, tables: Mapping[str, str], runner: Runner) -> None:
        super().__init__(runner)
        self.tables = dict(tables)

    def apply(self) -> None:
        if self.tables:
            self.run("nft", "-f", "-", stdin=nft_script(self.tables))

    def broken(self) -> list[str]:
        if not self.tables:
            return []
        present = set(self.run("nft", "list", "tables").splitlines())
        broken = []
        for name, expected in self.tables.items():
            listed = (
                self.run("nft", "list", "table", *name.split())
                if f"table {name}" in present
                else ""
            )
            if _nonblank(listed) != _nonblank(expected):
                broken.append(f"nft table {name}")
        return broken

    def remove(self) -> None:
        if self.tables:
            self.run("nft", "-f", "-", stdin=nft_removal_script(list(self.tables)))


def _nonblank(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def masquerade_rules(
    spec: MasqSpec,
    *,
    nftables: bool,
    masq: bool,
    forward: bool = True,
    random_fully: bool | None = None,
    netns: str | None = None,
) -> Rules:
    """The rules the agent installs: masquerade when ``--ip-masq``, forward when
    ``--iptables-forward-rules``, with nft when the config says ``EnableNFTables``.

    ``random_fully`` None asks iptables whether it supports --random-fully (once per netns);
    False (``--ip-masq-fully-random-disable``) masquerades without it, in nftables too.
    ``netns`` runs the tools in that namespace (tests and the demo).
    Raises MasqToolMissing at once when rules are wanted and the tool is not installed.
    """
    runner = Runner(netns)
    if masq or forward:
        runner.require("nft" if nftables else "iptables")
    if nftables:
        tables = nft_tables(
            spec, masq=masq, forward=forward, random_fully=random_fully is not False
        )
        return NftRules(tables, runner)
    if random_fully is None:
        random_fully = masq and supports_random_fully(runner)
    chains = iptables_chains(spec, masq=masq, forward=forward, random_fully=random_fully)
    return IptablesRules(chains, runner)

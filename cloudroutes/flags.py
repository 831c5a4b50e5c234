"""flanneld's flags, each also read from ``FLANNELD_<FLAG_UPPER_SNAKE>`` as flanneld does.

Flags win over the environment; the environment wins over defaults; an empty variable counts
as unset (flanneld's flagutil skips those too). Go's flag package accepts ``-flag`` as well as
``--flag``, and booleans as ``--flag``, ``--flag=true`` or ``--flag=false``; so do we, so
existing unit files and manifests work unchanged.

Every flag of flanneld's main.go parses. Each value is checked here, where it is resolved, so a
bad one is refused in one line before anything is taken or written. A flag cloudroutes does not
act on carries the reason, which the agent says once when the flag is set.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloudroutes import __version__
from cloudroutes.errors import ConfigError

# Why a value is refused ("must be ..."), or None when it is fine.
Check = Callable[[Any], str | None]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def in_range(low: int, high: int, unit: str) -> Check:
    def check(value: int) -> str | None:
        return None if low <= value <= high else f"must be {low} to {high} {unit}"

    return check


def at_least(low: int, unit: str) -> Check:
    def check(value: int) -> str | None:
        return None if value >= low else f"must be at least {low} {unit}"

    return check


def port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number from 0 to 65535 (0: off)"


def regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"is not a valid regular expression ({exc})"
    return None


def address_problem(
    value: str | ipaddress.IPv4Address | ipaddress.IPv6Address, version: int | None = None
) -> str | None:
    """Why ``value`` cannot be an address other nodes reach this one at, or None when it can."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        kind = {4: "an IPv4", 6: "an IPv6", None: "an IP"}[version]
        return f"is not {kind} address"
    if version is not None and address.version != version:
        return f"is not an IPv{version} address"
    if address.is_unspecified:
        return "is the unspecified address; give this node's own unicast address"
    if address.is_loopback:
        return "is a loopback address, which other nodes cannot reach"
    if address.is_multicast:
        return "is a multicast address; give a unicast address"
    if isinstance(address, ipaddress.IPv4Address) and address.is_reserved:
        return "is a reserved address (240.0.0.0/4); give a unicast address"
    return None


def ip_literal(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "is not an IP address such as 198.18.0.1"
    return None


@dataclass(frozen=True)
class Flag:
    name: str
    help: str
    default: Any = None
    type: Callable[[str], Any] = str
    repeat: bool = False
    secret: bool = False
    check: Check | None = None
    env_list: bool = False  # FLANNELD_<NAME> holds several values, comma-separated
    ignored: str | None = None  # why cloudroutes does not act on this flag

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "FLANNELD_" + self.name.replace("-", "_").upper()


ETCD_FLAGS = (
    Flag(
        "etcd-endpoints", "comma-separated etcd URLs", "http://127.0.0.1:4001,http://127.0.0.1:2379"
    ),
    Flag("etcd-prefix", "etcd prefix of the network", "/coreos.com/network"),
    Flag("etcd-keyfile", "TLS key file for etcd"),
    Flag("etcd-certfile", "TLS certificate file for etcd"),
    Flag("etcd-cafile", "TLS CA file for etcd"),
    Flag("etcd-username", "etcd user name"),
    Flag("etcd-password", "etcd password (prefer FLANNELD_ETCD_PASSWORD)", secret=True),
)

_KUBE = "it is used only with --kube-subnet-mgr, which cloudroutes does not support yet"
_KLOG = "cloudroutes logs at INFO; use `cloudroutes --debug agent` for more"

AGENT_FLAGS = (
    Flag(
        "iface",
        "interface (name or address) for inter-node traffic; repeatable, tried in order",
        repeat=True,
        env_list=True,
    ),
    Flag(
        "iface-regex",
        "regex matched against interface addresses, then names; repeatable, after --iface",
        repeat=True,
        check=regex,
    ),
    Flag(
        "iface-can-reach",
        "use the interface the kernel routes this address through (ip route get)",
        check=ip_literal,
    ),
    Flag(
        "public-ip",
        "IPv4 address other nodes use to reach this one",
        check=lambda v: address_problem(v, 4),
    ),
    Flag(
        "public-ipv6",
        "IPv6 address other nodes use to reach this one",
        check=lambda v: address_problem(v, 6),
    ),
    Flag("subnet-file", "where to write the node's subnet", "/run/flannel/subnet.env"),
    Flag(
        "state-dir",
        "where backends keep what survives reboots, e.g. vxlan's VtepMAC (cloudroutes only)",
        "/var/lib/cloudroutes",
    ),
    Flag(
        "subnet-lease-renew-margin",
        "renew the lease this many minutes before expiry (1 to 1439)",
        60,
        int,
        check=in_range(1, 1439, "minutes"),
    ),
    Flag(
        "subnet-lease-ttl",
        "lease TTL in seconds (flanneld: 86400)",
        86400,
        int,
        check=at_least(1, "second"),
    ),
    Flag("ip-masq", "install masquerade rules for traffic leaving the network", False, parse_bool),
    Flag(
        "ip-masq-fully-random-disable",
        "masquerade without --random-fully (fully-random in nftables)",
        False,
        parse_bool,
    ),
    Flag(
        "iptables-resync",
        "re-check the iptables rules every N seconds",
        5,
        int,
        check=at_least(1, "second"),
    ),
    Flag("iptables-forward-rules", "add FORWARD accept rules for the network", True, parse_bool),
    Flag(
        "ip-blackhole-route",
        "add a blackhole route for this node's own subnet",
        False,
        parse_bool,
    ),
    Flag("healthz-ip", "address of /healthz, /readyz and /metrics", "0.0.0.0"),
    Flag(
        "healthz-port",
        "port of /healthz, /readyz and /metrics (0: off)",
        0,
        int,
        check=port,
    ),
    Flag(
        "kube-subnet-mgr",
        "take leases from Kubernetes Nodes (not yet supported)",
        False,
        parse_bool,
    ),
    Flag("kube-api-url", "Kubernetes API server URL", ignored=_KUBE),
    Flag("kubeconfig-file", "kubeconfig file location", ignored=_KUBE),
    Flag(
        "kube-annotation-prefix",
        "Kubernetes annotation prefix",
        "flannel.alpha.coreos.com",
        ignored=_KUBE,
    ),
    Flag(
        "set-node-network-unavailable",
        "set NodeNetworkUnavailable after ready",
        True,
        parse_bool,
        ignored=_KUBE,
    ),
    Flag(
        "net-config-path",
        "net-conf.json for --kube-subnet-mgr",
        "/etc/kube-flannel/net-conf.json",
        ignored=_KUBE,
    ),
    # klog's flags, which flanneld copies onto its own flag set.
    Flag("v", "klog log level", 0, int, ignored=_KLOG),
    Flag("vmodule", "klog per-file log levels", ignored=_KLOG),
    Flag("log_backtrace_at", "klog: log a stack trace at file:line", ignored=_KLOG),
)


class _Version(argparse.Action):
    """``--version`` (also ``-version``, ``--version=true``): print the version and exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL", default=False)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if values:
            # stdout, unlike flanneld's stderr: `$(cloudroutes --version)` should just work.
            print(f"cloudroutes {__version__}")
            parser.exit(0)


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", "-version", action=_Version, help="print version and exit")


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    for flag in flags:
        kwargs: dict[str, Any] = {"dest": flag.dest, "help": flag.help, "default": None}
        if flag.type is parse_bool:
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        elif flag.repeat:
            kwargs.update(action="append", type=flag.type)
        else:
            kwargs.update(type=flag.type)
        parser.add_argument(f"--{flag.name}", f"-{flag.name}", **kwargs)


def resolve(
    namespace: argparse.Namespace, flags: Sequence[Flag], env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Fill every flag not given on the command line from FLANNELD_* or its default.

    Raises ConfigError, naming the flag or variable, for a value that fails the flag's check.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for flag in flags:
        value = getattr(namespace, flag.dest, None)
        from_env = value is None and bool(env.get(flag.env))
        if from_env:
            raw = env[flag.env]
            try:
                if flag.repeat:
                    parts = raw.split(",") if flag.env_list else [raw]
                    value = [flag.type(v) for v in parts if v]
                else:
                    value = flag.type(raw)
            except (ValueError, argparse.ArgumentTypeError):
                shown = "(hidden)" if flag.secret else repr(raw)
                raise ConfigError(
                    f"environment {flag.env}={shown} is not valid for --{flag.name}"
                ) from None
        if value is None:
            value = [] if flag.repeat else flag.default
        elif flag.check is not None:
            for item in value if flag.repeat else [value]:
                problem = flag.check(item)
                if problem:
                    shown = "(hidden)" if flag.secret else str(item)
                    where = f"{flag.env}={shown} (--{flag.name})" if from_env else (
                        f"--{flag.name} {shown}")  # fmt: skip
                    raise ConfigError(f"{where} {problem}")
        values[flag.dest] = value
    return values


def given(
    namespace: argparse.Namespace, flags: Sequence[Flag], env: Mapping[str, str] | None = None
) -> list[Flag]:
    """The flags set on the command line or in the environment, in declaration order."""
    env = os.environ if env is None else env
    return [f for f in flags if getattr(namespace, f.dest, None) is not None or env.get(f.env)]


def ignored_notices(flags: Sequence[Flag]) -> list[str]:
    """One line for each flag that cloudroutes parses but does not act on."""
    return [f"--{f.name} is ignored: {f.ignored}" for f in flags if f.ignored]


# `cloudroutes controller` serves health endpoints like the agent, and takes nothing else of it.
CONTROLLER_FLAGS = tuple(f for f in AGENT_FLAGS if f.name in ("healthz-ip", "healthz-port"))

"""flanneld's flags, each also read from ``FLANNELD_<FLAG_UPPER_SNAKE>`` as flanneld does.

Flags win over the environment; the environment wins over defaults. Go's flag package accepts
``-flag`` as well as ``--flag``, and booleans as ``--flag``, ``--flag=true`` or ``--flag=false``;
so do we, so existing unit files and manifests work unchanged.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloudroutes.errors import ConfigError


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class Flag:
    name: str
    help: str
    default: Any = None
    type: Callable[[str], Any] = str
    repeat: bool = False
    secret: bool = False

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

AGENT_FLAGS = (
    Flag("iface", "interface (name or address) for inter-node traffic; repeatable", repeat=True),
    Flag("iface-regex", "regex matched against interface addresses, then names"),
    Flag("public-ip", "IPv4 address other nodes use to reach this one"),
    Flag("public-ipv6", "IPv6 address other nodes use to reach this one"),
    Flag("subnet-file", "where to write the node's subnet", "/run/flannel/subnet.env"),
    Flag("subnet-lease-renew-margin", "renew the lease this many minutes before expiry", 60, int),
    Flag("subnet-lease-ttl", "lease TTL in seconds (flanneld: 86400)", 86400, int),
    Flag("ip-masq", "install masquerade rules for traffic leaving the network", False, parse_bool),
    Flag("iptables-resync", "re-check the iptables rules every N seconds", 5, int),
    Flag("iptables-forward-rules", "add FORWARD accept rules for the network", True, parse_bool),
    Flag("healthz-ip", "address of /healthz, /readyz and /metrics", "0.0.0.0"),
    Flag("healthz-port", "port of /healthz, /readyz and /metrics (0: off)", 0, int),
    Flag(
        "kube-subnet-mgr",
        "take leases from Kubernetes Nodes (not yet supported)",
        False,
        parse_bool,
    ),
    Flag(
        "net-config-path", "net-conf.json for --kube-subnet-mgr", "/etc/kube-flannel/net-conf.json"
    ),
)


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
    """Fill every flag not given on the command line from FLANNELD_* or its default."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for flag in flags:
        value = getattr(namespace, flag.dest, None)
        if value is None and flag.env in env:
            raw = env[flag.env]
            try:
                value = [v for v in raw.split(",") if v] if flag.repeat else flag.type(raw)
            except (ValueError, argparse.ArgumentTypeError):
                shown = "(hidden)" if flag.secret else repr(raw)
                raise ConfigError(
                    f"environment {flag.env}={shown} is not valid for --{flag.name}"
                ) from None
        if value is None:
            value = [] if flag.repeat else flag.default
        values[flag.dest] = value
    return values

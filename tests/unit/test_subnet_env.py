"""subnet.env in flannel's exact format, written atomically."""

from __future__ import annotations

import os
import stat
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from cloudroutes.subnet_env import (
    SubnetEnv,
    read_previous,
    read_subnet_env,
    write_subnet_env,
)


def test_golden_ipv4(tmp_path: Path) -> None:
    path = tmp_path / "run" / "flannel" / "subnet.env"
    env = SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.52.0/24"), 1450, True)
    write_subnet_env(path, env)
    assert path.read_text() == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.52.1/24\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=true\n"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert os.listdir(path.parent) == ["subnet.env"]  # no temp file left behind


def test_golden_dual_stack(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    env = SubnetEnv(
        IPv4Network("10.5.0.0/16"),
        IPv4Network("10.5.52.0/24"),
        1500,
        False,
        ipv6_network=IPv6Network("fc00::/48"),
        ipv6_subnet=IPv6Network("fc00:0:0:7::/64"),
    )
    write_subnet_env(path, env)
    assert path.read_text() == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.52.1/24\n"
        "FLANNEL_IPV6_NETWORK=fc00::/48\n"
        "FLANNEL_IPV6_SUBNET=fc00:0:0:7::1/64\n"
        "FLANNEL_MTU=1500\n"
        "FLANNEL_IPMASQ=false\n"
    )
    assert read_previous(path) == env


def test_rewrite_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    write_subnet_env(
        path, SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.1.0/24"), 1500, True)
    )
    write_subnet_env(
        path, SubnetEnv(IPv4Network("10.6.0.0/16"), IPv4Network("10.6.9.0/24"), 1400, False)
    )
    assert read_subnet_env(path) == {
        "FLANNEL_NETWORK": "10.6.0.0/16",
        "FLANNEL_SUBNET": "10.6.9.1/24",
        "FLANNEL_MTU": "1400",
        "FLANNEL_IPMASQ": "false",
    }


def test_missing_or_damaged_file_gives_no_previous_subnet(tmp_path: Path) -> None:
    assert read_previous(tmp_path / "none") is None
    bad = tmp_path / "bad.env"
    bad.write_text("FLANNEL_SUBNET=garbage\n")
    assert read_previous(bad) is None

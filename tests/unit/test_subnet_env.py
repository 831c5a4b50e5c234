"""subnet.env in flannel's exact format, written atomically."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from cloudroutes.errors import ConfigError
from cloudroutes.subnet_env import (
    SubnetEnv,
    check_subnet_file,
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


def test_sources_cleanly_in_a_shell(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    env = SubnetEnv(
        IPv4Network("10.5.0.0/16"),
        IPv4Network("10.5.52.0/24"),
        1450,
        True,
        ipv6_network=IPv6Network("fc00::/48"),
        ipv6_subnet=IPv6Network("fc00:0:0:7::/64"),
    )
    write_subnet_env(path, env)
    script = (
        'set -eu; set -a; . "$1"; set +a; '
        'echo "$FLANNEL_NETWORK $FLANNEL_SUBNET $FLANNEL_IPV6_NETWORK $FLANNEL_IPV6_SUBNET '
        '$FLANNEL_MTU $FLANNEL_IPMASQ"; env | grep -c ^FLANNEL_'
    )
    result = subprocess.run(
        ["bash", "-c", script, "bash", str(path)], capture_output=True, text=True, check=True
    )
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "10.5.0.0/16 10.5.52.1/24 fc00::/48 fc00:0:0:7::1/64 1450 true",
        "6",  # exported by `set -a`, as Docker's and the CNI plugin's wrappers rely on
    ]


def test_a_quoted_or_exported_file_still_gives_the_previous_subnet(tmp_path: Path) -> None:
    # flanneld reads the file with godotenv, which accepts these; so must a node switching over.
    path = tmp_path / "subnet.env"
    path.write_text(
        "# written by hand\n"
        'export FLANNEL_NETWORK="10.5.0.0/16"\n'
        "FLANNEL_SUBNET='10.5.52.1/24'\n"
        "FLANNEL_MTU = 1450\n"
        "FLANNEL_IPMASQ=true\n"
    )
    assert read_previous(path) == SubnetEnv(
        IPv4Network("10.5.0.0/16"), IPv4Network("10.5.52.0/24"), 1450, True
    )


@pytest.mark.parametrize(
    ("make", "given", "message"),
    [
        (
            lambda d: (d / "run").mkdir(),
            "run",
            "--subnet-file {d}/run is a directory; give a file path such as "
            "/run/flannel/subnet.env",
        ),
        (
            lambda d: None,
            "new/",
            "--subnet-file {d}/new/ is a directory; give a file path such as "
            "/run/flannel/subnet.env",
        ),
        (
            lambda d: (d / "flannel").write_text(""),
            "flannel/deeper/subnet.env",
            "--subnet-file {d}/flannel/deeper/subnet.env: {d}/flannel is not a directory, so "
            "the file cannot be created; give a file path such as /run/flannel/subnet.env",
        ),
        (
            lambda d: os.mkfifo(d / "fifo"),
            "fifo",
            "--subnet-file {d}/fifo is not a regular file; give a file path such as "
            "/run/flannel/subnet.env",
        ),
    ],
)
def test_a_subnet_file_that_cannot_be_written_is_refused_untouched(
    tmp_path: Path, make: Callable[[Path], object], given: str, message: str
) -> None:
    make(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError) as err:
        check_subnet_file(f"{tmp_path}/{given}")
    assert str(err.value) == message.format(d=tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created


def test_a_writable_subnet_file_passes_and_creates_nothing(tmp_path: Path) -> None:
    check_subnet_file(tmp_path / "run" / "flannel" / "subnet.env")
    (tmp_path / "subnet.env").write_text("FLANNEL_MTU=1500\n")
    check_subnet_file(tmp_path / "subnet.env")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subnet.env"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a read-only mount")
def test_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    # A mount namespace of its own, so the read-only mount never shows outside this test.
    probe = (
        "from cloudroutes.errors import ConfigError\n"
        "from cloudroutes.subnet_env import check_subnet_file\n"
        "import sys\n"
        "try:\n"
        "    check_subnet_file(sys.argv[1])\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    script = 'mount -t tmpfs -o ro tmpfs "$1" && exec "$2" -c "$3" "$1/flannel/subnet.env"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(tmp_path), sys.executable, probe],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout == (
        f"--subnet-file {tmp_path}/flannel/subnet.env: cannot write in {tmp_path} (read-only or "
        "no permission); make it writable for the agent or choose another path\n"
    )

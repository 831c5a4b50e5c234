"""``cloudroutes docker-opts``: flannel's mk-docker-opts.sh output from subnet.env."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cloudroutes.cli import main

SUBNET_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"


@pytest.fixture
def subnet_file(tmp_path: Path) -> Path:
    path = tmp_path / "subnet.env"
    path.write_text(SUBNET_ENV)
    return path


def docker_opts(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["docker-opts", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_prints_the_daemon_options(subnet_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # flannel masquerades (IPMASQ=true), so Docker must not.
    assert docker_opts(capsys, "--subnet-file", str(subnet_file)) == (
        0,
        "--bip=10.1.17.1/24 --ip-masq=false --mtu=1472\n",
        "",
    )


def test_docker_masquerades_when_flannel_does_not(
    subnet_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subnet_file.write_text(SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=false"))
    assert docker_opts(capsys, "-f", str(subnet_file))[1] == (
        "--bip=10.1.17.1/24 --ip-masq=true --mtu=1472\n"
    )
    assert docker_opts(capsys, "-f", str(subnet_file), "-m")[1] == "--bip=10.1.17.1/24 --mtu=1472\n"


def test_env_file_as_mk_docker_opts_writes_it(
    subnet_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "run" / "docker_opts.env"
    assert docker_opts(capsys, "-f", str(subnet_file), "-d", str(target)) == (0, "", "")
    assert target.read_text() == (
        'DOCKER_OPT_BIP="--bip=10.1.17.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'DOCKER_OPTS=" --bip=10.1.17.1/24 --ip-masq=false --mtu=1472"\n'
    )
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["docker_opts.env"]


def test_combined_key_keeps_its_current_value(
    subnet_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_NETWORK_OPTIONS", "--iptables=false")
    assert docker_opts(capsys, "-f", str(subnet_file), "-c", "-k", "DOCKER_NETWORK_OPTIONS")[1] == (
        'DOCKER_NETWORK_OPTIONS="--iptables=false  --bip=10.1.17.1/24 --ip-masq=false --mtu=1472"\n'
    )


def test_reads_a_hand_written_subnet_env(
    subnet_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subnet_file.write_text('# by hand\nexport FLANNEL_SUBNET="10.9.3.1/24"\nFLANNEL_MTU=1450\n')
    assert docker_opts(capsys, "-f", str(subnet_file))[1] == "--bip=10.9.3.1/24 --mtu=1450\n"


def test_missing_subnet_env_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = docker_opts(capsys, "-f", str(tmp_path / "subnet.env"))
    assert (status, out) == (1, "")
    assert err == (
        f"cloudroutes: error: subnet file {tmp_path / 'subnet.env'} does not exist: the agent "
        "writes it once this node holds a lease; start 'cloudroutes agent' or give the right "
        "--subnet-file\n"
    )


def test_bad_ipmasq_is_one_line(subnet_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subnet_file.write_text(SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=yes"))
    status, out, err = docker_opts(capsys, "-f", str(subnet_file))
    assert (status, out) == (1, "")
    assert err.count("\n") == 1
    assert "FLANNEL_IPMASQ=yes is not true or false" in err


def test_unwritable_env_file_is_one_line(
    subnet_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, _, err = docker_opts(capsys, "-f", str(subnet_file), "-d", str(blocker / "opts.env"))
    assert status == 1
    assert err.startswith(
        f"cloudroutes: error: cannot write the Docker env file {blocker}/opts.env"
    )
    assert err.count("\n") == 1

"""The command line as an operator meets it: flanneld's flags, --version, and one-line refusals
that come before anything is taken from etcd or written (no etcd is running here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cloudroutes import __version__

CLI = str(Path(sys.executable).with_name("cloudroutes"))
NO_ETCD = "--etcd-endpoints=http://127.0.0.1:9"  # nothing listens: reaching it would fail


def cli(*args: str, env: dict[str, str] | None = None, input: str | None = None):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, env=env, input=input, timeout=60
    )


@pytest.mark.parametrize("argv", [["--version"], ["-version"], ["agent", "--version"],
                                  ["agent", "-version=true", "--iface=eth9"]])  # fmt: skip
def test_version_prints_and_exits_0(argv: list[str]) -> None:
    result = cli(*argv)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"cloudroutes {__version__}\n",
        "",
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--healthz-port=70000"],
            "--healthz-port 70000 must be a port number from 0 to 65535 (0: off)",
        ),
        (["-iptables-resync=0"], "--iptables-resync 0 must be at least 1 second"),
        (
            ["--subnet-lease-renew-margin", "1440"],
            "--subnet-lease-renew-margin 1440 must be 1 to 1439 minutes",
        ),
        (
            ["--public-ip=127.0.0.1"],
            "--public-ip 127.0.0.1 is a loopback address, which other nodes cannot reach",
        ),
        (
            ["--iface-regex=("],
            "--iface-regex ( is not a valid regular expression (missing ), unterminated subpattern at position 0)",
        ),
        (
            ["--kube-subnet-mgr"],
            "--kube-subnet-mgr is not supported yet; use etcd (--etcd-endpoints)",
        ),
        (
            ["--subnet-file=/"],
            "--subnet-file / is a directory; give a file path such as /run/flannel/subnet.env",
        ),
        (
            ["--healthz-port=x"],
            "argument --healthz-port/-healthz-port: invalid int value: 'x'; see 'cloudroutes agent --help'",
        ),
        (["--ifac=eth0"], "unrecognized arguments: --ifac=eth0; see 'cloudroutes --help'"),
    ],
)
def test_agent_refuses_a_bad_flag_in_one_line_before_anything(
    argv: list[str], message: str
) -> None:
    result = cli("agent", NO_ETCD, *argv)
    assert result.returncode in (1, 2)
    assert result.stderr == f"cloudroutes: error: {message}\n"
    assert result.stdout == ""


def test_a_bad_environment_value_is_refused_naming_the_variable() -> None:
    env = {"PATH": "/usr/bin:/bin", "FLANNELD_HEALTHZ_PORT": "99999"}
    result = cli("agent", NO_ETCD, env=env)
    assert result.returncode == 1
    assert result.stderr == (
        "cloudroutes: error: FLANNELD_HEALTHZ_PORT=99999 (--healthz-port) must be a port number "
        "from 0 to 65535 (0: off)\n"
    )


def test_a_subnet_file_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    (tmp_path / "flannel").write_text("")
    result = cli("agent", NO_ETCD, f"--subnet-file={tmp_path}/flannel/subnet.env")
    assert result.returncode == 1
    assert result.stderr == (
        f"cloudroutes: error: --subnet-file {tmp_path}/flannel/subnet.env: {tmp_path}/flannel is "
        "not a directory, so the file cannot be created; give a file path such as "
        "/run/flannel/subnet.env\n"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            None,
            "{f}: cannot read: No such file or directory; give flannel's net-conf JSON file, or - for stdin",
        ),
        (
            "{",
            "{f}: not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        ('"10.5.0.0/16"', '{f}: not a JSON object; write one such as {{"Network": "10.5.0.0/16"}}'),
        (
            '{"Network": "10.5.0.0/16", "Backend": {"Type": "no-such"}}',
            "invalid network config ({f}): unknown backend type: no-such (this build knows ",
        ),
        (
            '{"Network": "0.0.0.0/0", "Backend": {"Type": "host-gw"}}',
            "invalid network config ({f}): please define a correct Network parameter in the flannel config",
        ),
        (
            '{"Network": "10.5.0.0/16", "SubnetMin": "10.5.9.0", "SubnetMax": "10.5.2.0", "Backend": {"Type": "host-gw"}}',
            "invalid network config ({f}): SubnetMin 10.5.9.0 is above SubnetMax 10.5.2.0, which leaves no subnet to lease; swap them or widen the range",
        ),
        (
            '{"Network": "127.0.0.0/16", "Backend": {"Type": "host-gw"}}',
            "invalid network config ({f}): Network 127.0.0.0/16 overlaps the loopback range 127.0.0.0/8",
        ),
    ],
)
def test_config_set_checks_the_file_before_contacting_etcd(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "net-conf.json"
    if content is not None:
        path.write_text(content)
    result = cli("config", "set", str(path), NO_ETCD)
    assert result.returncode == 1
    assert result.stderr.startswith("cloudroutes: error: " + message.format(f=path))
    assert result.stderr.count("\n") == 1

"""The files in deploy/ as an operator installs them: systemd restarts the agent on any exit,
`systemctl reload` sends the SIGHUP the agent handles, and every place that names the route
protocol agrees with the others."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloudroutes.node_lock import ROUTE_PROTOCOL
from providers.kernel import RTPROT_CLOUDROUTES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "cloudroutes.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_restarts_the_agent_on_any_exit_and_never_gives_up() -> None:
    parsed = unit()
    service = parsed["Service"]
    assert service["Restart"] == "always"
    assert float(service["RestartSec"]) > 0
    # Exit 0 (a deleted lease) and 1 (a lease etcd lost and another node took) both restart.
    assert "RestartPreventExitStatus" not in service
    assert parsed["Unit"]["StartLimitIntervalSec"] == "0"


def test_systemctl_reload_sends_sighup() -> None:
    assert unit()["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("cloudroutes")
    text = UNIT.read_text().replace("/usr/local/bin/cloudroutes", str(cli))
    (tmp_path / "cloudroutes.service").write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "cloudroutes.service")],
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in result.stderr.splitlines() if "cloudroutes.service" in ln]
    assert result.returncode == 0 and lines == [], result.stderr


def test_route_protocol_is_the_same_everywhere() -> None:
    number, name = (DEPLOY / "rt_protos.conf").read_text().splitlines()[-1].split()
    assert (int(number), name) == (ROUTE_PROTOCOL, "cloudroutes")
    assert RTPROT_CLOUDROUTES == ROUTE_PROTOCOL

"""``cloudroutes install-cni``: the plugin a node's runtime starts for every pod.

The lab's clusters (and so the demo and every pod e2e test) run the plugin as this command
installs it; these tests cover the command itself and what the runtime's environment cannot do
to the installed plugin.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

CLI = str(Path(sys.executable).with_name("cloudroutes"))
CONF = {"cniVersion": "1.0.0", "name": "pods", "type": "flannel"}


def install(bin_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "install-cni", "--bin-dir", str(bin_dir)], capture_output=True, text=True
    )


def plugin(path: Path, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path)], input=stdin, env=env, capture_output=True, text=True)


def test_install_cni_writes_an_executable_flannel_that_answers_the_runtime(
    tmp_path: Path,
) -> None:
    result = install(tmp_path)
    assert result.returncode == 0, result.stderr
    target = tmp_path / "flannel"
    assert result.stdout == f"installed {target}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["flannel"]  # no temporary file left

    answer = plugin(target, {"CNI_COMMAND": "VERSION"})
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["supportedVersions"][-1] == "1.1.0"
    # Without subnet.env an ADD is flannel's error, in CNI JSON.
    env = {
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/none",
        "CNI_IFNAME": "eth0", "CNI_PATH": str(tmp_path),
    }  # fmt: skip
    conf = dict(CONF, subnetFile=str(tmp_path / "missing.env"), dataDir=str(tmp_path / "d"))
    failed = plugin(target, env, json.dumps(conf))
    assert failed.returncode == 1 and failed.stderr == ""
    assert json.loads(failed.stdout)["msg"].startswith("failed to load flannel 'subnet.env' file")


def test_the_runtime_environment_cannot_change_what_the_plugin_runs(tmp_path: Path) -> None:
    """A runtime passes its own environment on: PYTHONPATH, PYTHONSTARTUP, a user site or a
    module beside the plugin must not replace a line of it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    assert install(bin_dir).returncode == 0
    trap = tmp_path / "trap"
    for where in (trap / "cloudroutes", bin_dir / "cloudroutes"):
        where.mkdir(parents=True)
        (where / "__init__.py").write_text("raise SystemExit('the wrong cloudroutes ran')\n")
    (trap / "sitecustomize.py").write_text("raise SystemExit('sitecustomize ran')\n")
    (bin_dir / "json.py").write_text("raise SystemExit('the wrong json ran')\n")
    startup = tmp_path / "startup.py"
    startup.write_text("raise SystemExit('PYTHONSTARTUP ran')\n")
    env = {
        "CNI_COMMAND": "VERSION",
        "PYTHONPATH": str(trap),
        "PYTHONSTARTUP": str(startup),
        "PYTHONINSPECT": "1",
        "PYTHONUSERBASE": str(trap),
        "HOME": str(trap),
    }
    answer = plugin(bin_dir / "flannel", env)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert json.loads(answer.stdout)["cniVersion"] == "1.1.0"


def test_installing_again_replaces_the_plugin_in_place(tmp_path: Path) -> None:
    target = tmp_path / "flannel"
    target.write_text("#!/bin/sh\necho old flannel\n")
    os.chmod(target, 0o700)
    assert install(tmp_path).returncode == 0
    assert "cloudroutes install-cni" in target.read_text()
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flannel"]


def test_a_missing_plugin_directory_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "opt" / "cni" / "bin"
    result = install(missing)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"cloudroutes: error: install-cni: --bin-dir {missing} is not a directory; create it, "
        "or pass the directory your runtime's CNI_PATH names (containerd: bin_dir in its CNI "
        "config)\n"
    )
    assert not (tmp_path / "opt").exists()

"""CNI latency: ADD and DEL through the ``flannel`` plugin against its bridge delegate alone.

The plugin is the one ``cloudroutes install-cni`` writes, as a node runs it.

Same run, same node namespace, same pod namespace, same delegate config (the one the plugin
saved): the difference is what the plugin adds to every pod start, an interpreter starting,
subnet.env read, the config written and fsynced. Both are timed from inside the node namespace
(a helper process runs there), interleaved round by round so load on the machine hits both.
"""

from __future__ import annotations

import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import Figure
from cloudroutes.cni_install import install_plugin
from cloudroutes.lab.netns import Netns, unique_name

SYSTEM_PLUGINS = "/usr/lib/cni"
REPO = str(Path(__file__).resolve().parents[1])


def run(short: bool = False) -> Iterator[Figure]:
    rounds = 5 if short else 30
    # pip byte-compiles an installed plugin; a checkout run with PYTHONDONTWRITEBYTECODE would
    # otherwise compile the plugin's modules on every start.
    for module in ("__init__.py", "cni.py", "cni_json.py", "cni_delegate.py"):
        compileall.compile_file(str(Path(REPO, "cloudroutes", module)), quiet=1)
    node, pod = Netns(unique_name("bn")), Netns(unique_name("bp"))
    try:
        with tempfile.TemporaryDirectory(prefix="cni-bench-") as root:
            Path(root, "bin").mkdir()
            install_plugin(Path(root, "bin"))
            helper = node.run(
                "env",
                f"PYTHONPATH={REPO}",
                sys.executable,
                "-c",
                f"import bench.cni_latency as b; b.time_in_node({root!r}, {pod.path!r}, {rounds})",
                timeout=600,
            )
            times = json.loads(helper.stdout)
    finally:
        pod.delete()
        node.delete()
    bare = min(times["python"])
    yield Figure(
        "flannel VERSION: the plugin's own start (best)",
        min(times["flannel VERSION"]),
        baseline=bare,
        baseline_name="the bare interpreter's start, python -IS -c pass",
    )
    for verb in ("ADD", "DEL"):
        ours, bridge = times[f"flannel {verb}"], times[f"bridge {verb}"]
        yield Figure(
            f"CNI {verb} through flannel (best of {rounds})",
            min(ours),
            baseline=min(bridge),
            baseline_name="bridge alone",
        )
        yield Figure(
            f"CNI {verb} through flannel (median of {rounds})",
            statistics.median(ours),
            baseline=statistics.median(bridge),
            baseline_name="bridge alone",
        )
        # No plugin in Python can beat its interpreter's start: what ours adds beyond that.
        yield Figure(
            f"CNI {verb} through flannel (best of {rounds})",
            min(ours),
            baseline=min(bridge) + bare,
            baseline_name="bridge alone + the bare interpreter's start",
        )


def time_in_node(root: str, pod_netns: str, rounds: int) -> None:
    """Run inside the node namespace: print every call's wall time, per plugin and verb."""
    subnet_file = Path(root, "subnet.env")
    subnet_file.write_text(
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=true\n"
    )
    data_dir = Path(root, "flannel")
    conf = json.dumps(
        {
            "cniVersion": "0.3.1",
            "name": "cni-bench",
            "type": "flannel",
            "subnetFile": str(subnet_file),
            "dataDir": str(data_dir),
            "ipam": {"dataDir": str(Path(root, "ipam"))},
        }
    ).encode()
    flannel = str(Path(root, "bin", "flannel"))
    environ = dict(
        os.environ,
        CNI_NETNS=pod_netns,
        CNI_IFNAME="eth0",
        CNI_PATH=f"{SYSTEM_PLUGINS}:{root}/bin",
    )

    def call(plugin: str, verb: str, container_id: str, stdin: bytes, *args: str) -> float:
        env = dict(environ, CNI_COMMAND=verb, CNI_CONTAINERID=container_id)
        started = time.perf_counter()
        done = subprocess.run([plugin, *args], input=stdin, env=env, capture_output=True)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{plugin} {verb}: {done.stdout.decode()} {done.stderr.decode()}")
        return elapsed

    # The first ADD makes cni0; its saved config is the bridge's config for the baseline.
    call(flannel, "ADD", "warm", conf)
    delegate = (data_dir / "warm").read_bytes()
    call(flannel, "DEL", "warm", conf)
    bridge = f"{SYSTEM_PLUGINS}/bridge"
    times: dict[str, list[float]] = {}
    for i in range(rounds):
        for name, plugin, stdin in (("flannel", flannel, conf), ("bridge", bridge, delegate)):
            for verb in ("ADD", "DEL"):
                elapsed = call(plugin, verb, f"{name}-{i}", stdin)
                times.setdefault(f"{name} {verb}", []).append(elapsed)
        times.setdefault("flannel VERSION", []).append(call(flannel, "VERSION", "-", b""))
        python = call(sys.executable, "-", "-", b"", "-IS", "-c", "pass")
        times.setdefault("python", []).append(python)
    print(json.dumps(times))

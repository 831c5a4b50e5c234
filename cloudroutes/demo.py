"""``cloudroutes demo``: a small cluster on this machine, in network namespaces.

Topology: one switch namespace with a bridge, an etcd "machine" and N nodes plugged into it on
198.18.0.0/24 (a documentation range: nothing leaves the machine). Each node runs a real agent.
Once every node has written subnet.env, its FLANNEL_SUBNET gateway address goes on a ``cni0``
bridge, as Docker or the CNI bridge plugin would put it, and every node pings every other
node's gateway address from its own: the routes the agents programmed carry that traffic.
Everything is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cloudroutes.errors import CloudroutesError, ConfigError
from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.lab.netns import Netns, Underlay, unique_name
from cloudroutes.subnet_env import read_subnet_env

NETWORK = "10.5.0.0/16"
ETCD_ADDRESS = "198.18.0.254"


@dataclass
class DemoNode:
    name: str
    ns: Netns
    address: str
    run_dir: Path
    agent: subprocess.Popen[bytes] | None = None

    @property
    def subnet_file(self) -> Path:
        return self.run_dir / "subnet.env"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "agent.log"


class Demo:
    def __init__(self, backend: str, nodes: int) -> None:
        self.backend = backend
        self.node_count = nodes
        self.workdir = Path(tempfile.mkdtemp(prefix="cloudroutes-demo-"))
        self.switch: Underlay | None = None
        self.etcd_ns: Netns | None = None
        self.etcd: EtcdCluster | None = None
        self.nodes: list[DemoNode] = []
        self.cli = str(Path(sys.executable).with_name("cloudroutes"))

    def run(self) -> bool:
        self._build()
        self._configure()
        self._start_agents()
        self._wait_ready()
        ok = self._ping_matrix()
        self._show()
        return ok

    # --- steps --------------------------------------------------------------------------

    def _build(self) -> None:
        say(f"building {self.node_count} nodes and an etcd machine on 198.18.0.0/24")
        self.switch = Underlay("crsw")
        self.etcd_ns = Netns(unique_name("cretcd"))
        self.switch.plug(self.etcd_ns, "eth0", f"{ETCD_ADDRESS}/24")
        self.etcd = EtcdCluster(host=ETCD_ADDRESS, netns=self.etcd_ns.name).start()
        for i in range(1, self.node_count + 1):
            ns = Netns(unique_name(f"crn{i}-"))
            address = f"198.18.0.{i}"
            self.switch.plug(ns, "eth0", f"{address}/24")
            ns.sysctl("net.ipv4.ip_forward", "1")
            run_dir = self.workdir / f"node{i}"
            run_dir.mkdir()
            self.nodes.append(DemoNode(f"node{i}", ns, address, run_dir))

    def _configure(self) -> None:
        config = f'{{"Network": "{NETWORK}", "Backend": {{"Type": "{self.backend}"}}}}'
        say(f"network config: {config}")
        assert self.etcd_ns is not None and self.etcd is not None
        result = self.etcd_ns.run(
            self.cli, "config", "set", "-", f"--etcd-endpoints={self.etcd.endpoint}",
            input=config, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise ConfigError(result.stderr.strip())

    def _start_agents(self) -> None:
        assert self.etcd is not None
        for node in self.nodes:
            say(f"{node.name}: starting agent (log {node.log_file})")
            with node.log_file.open("wb") as log:
                node.agent = node.ns.popen(
                    [
                        self.cli, "agent",
                        f"--etcd-endpoints={self.etcd.endpoint}",
                        "--iface=eth0",
                        f"--subnet-file={node.subnet_file}",
                        "--ip-masq",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while not node.subnet_file.exists():
                if node.agent is not None and node.agent.poll() is not None:
                    raise DemoFailed(f"{node.name}'s agent exited:\n{tail(node.log_file)}")
                if time.monotonic() > deadline:
                    raise DemoFailed(f"{node.name} wrote no subnet.env:\n{tail(node.log_file)}")
                time.sleep(0.1)
            env = read_subnet_env(node.subnet_file)
            gateway = env["FLANNEL_SUBNET"]
            say(f"{node.name}: FLANNEL_SUBNET={gateway} MTU={env['FLANNEL_MTU']}")
            node.ns.ip("link", "add", "cni0", "type", "bridge")
            node.ns.ip("addr", "add", gateway, "dev", "cni0")
            node.ns.ip("link", "set", "cni0", "up")

    def _ping_matrix(self, timeout: float = 30) -> bool:
        gateways = {n.name: read_subnet_env(n.subnet_file)["FLANNEL_SUBNET"].split("/")[0]
                    for n in self.nodes}  # fmt: skip
        say("pinging every node's subnet gateway from every other node's")
        ok = True
        for src in self.nodes:
            for dst in self.nodes:
                if src is dst:
                    continue
                deadline = time.monotonic() + timeout
                while True:
                    result = src.ns.run(
                        "ping", "-c", "1", "-W", "1", "-I", gateways[src.name],
                        gateways[dst.name], check=False,
                    )  # fmt: skip
                    if result.returncode == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                passed = result.returncode == 0
                ok &= passed
                mark = "ok  " if passed else "FAIL"
                say(f"  {mark} {src.name} {gateways[src.name]} -> {dst.name} {gateways[dst.name]}")
        return ok

    def _show(self) -> None:
        assert self.etcd_ns is not None and self.etcd is not None
        say("leases in etcd:")
        print(self.etcd_ns.run(self.cli, "leases", f"--etcd-endpoints={self.etcd.endpoint}").stdout)
        for node in self.nodes:
            say(f"{node.name}: kernel routes (the agent's carry its own proto number)")
            print(node.ns.ip("route", "show"), end="")

    def cleanup(self) -> None:
        for node in self.nodes:
            if node.agent is not None and node.agent.poll() is None:
                node.agent.terminate()
                try:
                    node.agent.wait(5)
                except subprocess.TimeoutExpired:
                    node.agent.kill()
        for node in self.nodes:
            node.ns.delete()
        if self.etcd is not None:
            self.etcd.close()
        if self.etcd_ns is not None:
            self.etcd_ns.delete()
        if self.switch is not None:
            self.switch.delete()
        shutil.rmtree(self.workdir, ignore_errors=True)


class DemoFailed(CloudroutesError):
    pass


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_demo(*, backend: str, nodes: int, keep: bool) -> int:
    if os.geteuid() != 0:
        raise ConfigError("the demo builds network namespaces and needs root; run it with sudo")
    if nodes < 2:
        raise ConfigError("--nodes must be at least 2 for nodes to reach each other")
    demo = Demo(backend, nodes)

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        ok = demo.run()
        if keep:
            say("cluster is up; press Ctrl-C to tear it down")
            signal.pause()
        say("all pings passed" if ok else "some pings failed")
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        say("cleaning up")
        demo.cleanup()

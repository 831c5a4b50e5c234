"""A cluster of nodes on one machine: a switch, an etcd machine and N nodes, each a namespace.

Every node is plugged into the switch on 198.18.0.0/24 (a documentation range: nothing leaves
the machine) and runs a real ``cloudroutes agent``. Once a node has written subnet.env, its
FLANNEL_SUBNET gateway address goes on a ``cni0`` bridge, as Docker or the CNI bridge plugin
would put it. The demo and the end-to-end tests both build their clusters with this.

With ``backend="aws-vpc"`` the cluster also gets a fake AWS (cloudroutes.lab.aws.AwsLab): a
"cloud" namespace on the switch holds the EC2 endpoint (a counting proxy in front of moto) and
one IMDS stub per node, each node is an instance of a VPC whose addresses are the nodes'
underlay addresses, and each agent runs with its own instance's environment and nothing from
the host's AWS configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudroutes.errors import CloudroutesError
from cloudroutes.lab.aws import AwsLab, LabInstance
from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.lab.netns import Netns, Underlay, unique_name
from cloudroutes.lab.process import stop_process
from cloudroutes.subnet_env import read_subnet_env

ETCD_ADDRESS = "198.18.0.254"
# The fake AWS's endpoints (EC2 and every node's IMDS), as a cloud's sit on the instance's network.
CLOUD_ADDRESS = "198.18.0.253"
AWS_VPC = "aws-vpc"

# GET a URL from inside a node: prints the status code (0 when nothing answered), then the body.
_HTTP_GET = """
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
        code, body = response.status, response.read().decode()
except urllib.error.HTTPError as exc:
    code, body = exc.code, exc.read().decode()
except OSError as exc:
    code, body = 0, str(exc)
print(code)
print(body, end="")
"""


class ClusterError(CloudroutesError):
    pass


def node_address(i: int) -> str:
    """Node i's underlay address (1-based)."""
    return f"198.18.0.{i}"


@dataclass
class LabNode:
    name: str
    ns: Netns
    address: str
    run_dir: Path
    agent: subprocess.Popen[bytes] | None = None
    agent_args: list[str] = field(default_factory=list)
    # The EC2 instance this node is, in an aws-vpc cluster.
    instance: LabInstance | None = None

    @property
    def subnet_file(self) -> Path:
        return self.run_dir / "subnet.env"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "agent.log"

    def subnet_env(self) -> dict[str, str]:
        return read_subnet_env(self.subnet_file)

    @property
    def gateway(self) -> str:
        """This node's FLANNEL_SUBNET address, without the prefix length."""
        return self.subnet_env()["FLANNEL_SUBNET"].split("/")[0]

    @property
    def subnet(self) -> str:
        value = self.subnet_env()["FLANNEL_SUBNET"]
        address, _, plen = value.partition("/")
        last = address.rsplit(".", 1)[0]
        return f"{last}.0/{plen}" if plen == "24" else value

    @property
    def agent_running(self) -> bool:
        return self.agent is not None and self.agent.poll() is None

    def http_get(self, port: int, path: str) -> tuple[int, str]:
        """GET ``path`` from the agent's health port inside the node: (status, body)."""
        result = self.ns.run(sys.executable, "-c", _HTTP_GET, f"http://127.0.0.1:{port}{path}")
        code, _, body = result.stdout.partition("\n")
        return int(code), body

    def status(self, port: int) -> dict[str, Any]:
        """The agent's /status; {} while it does not answer."""
        code, body = self.http_get(port, "/status")
        return json.loads(body) if code == 200 else {}

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(no log)"


class LabCluster:
    def __init__(
        self, nodes: int = 3, *, network: str = "10.5.0.0/16", backend: str = "host-gw",
        etcd_members: int = 1, backend_options: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """``backend_options`` go into the network config's Backend object (an aws-vpc
        cluster's default to Mode "node" and its VPC's main route table)."""
        self.node_count = nodes
        self.network = network
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self.etcd_members = etcd_members
        self.workdir = Path(tempfile.mkdtemp(prefix="cloudroutes-lab-"))
        self.switch: Underlay | None = None
        self.etcd_hosts: list[Netns] = []
        self.etcd: EtcdCluster | None = None
        self.nodes: list[LabNode] = []
        self.cli = str(Path(sys.executable).with_name("cloudroutes"))
        self.cloud_host: Netns | None = None
        self.aws: AwsLab | None = None

    # --- building -----------------------------------------------------------------------

    def build(self) -> LabCluster:
        self.switch = Underlay("crsw")
        # All etcd members share one "machine" namespace, each on its own port, so a test can
        # stop the member an agent talks to and see it move to another.
        host = Netns(unique_name("cretcd"))
        self.etcd_hosts.append(host)
        self.switch.plug(host, "eth0", f"{ETCD_ADDRESS}/24")
        self.etcd = EtcdCluster(size=self.etcd_members, host=ETCD_ADDRESS, netns=host.name).start()
        if self.backend == AWS_VPC:
            self._build_aws()
        for i in range(1, self.node_count + 1):
            self.add_node(i)
        return self

    def _build_aws(self) -> None:
        assert self.switch is not None
        self.cloud_host = Netns(unique_name("craws"))
        self.switch.plug(self.cloud_host, "eth0", f"{CLOUD_ADDRESS}/24")
        addresses = [node_address(i) for i in range(1, self.node_count + 1)]
        self.aws = AwsLab(addresses, tables=1, host=CLOUD_ADDRESS, netns=self.cloud_host.name)
        self.aws.start()

    def add_node(self, i: int) -> LabNode:
        assert self.switch is not None
        instance = None
        if self.aws is not None:
            assert self.aws.vpc is not None
            if not 1 <= i <= len(self.aws.vpc.instances):
                raise ClusterError(f"node{i} has no instance in the lab's VPC; build it with more")
            instance = self.aws.vpc.instances[i - 1]
        ns = Netns(unique_name(f"crn{i}-"))
        address = node_address(i)
        self.switch.plug(ns, "eth0", f"{address}/24")
        ns.sysctl("net.ipv4.ip_forward", "1")
        run_dir = self.workdir / f"node{i}"
        run_dir.mkdir(exist_ok=True)
        node = LabNode(f"node{i}", ns, address, run_dir, instance=instance)
        self.nodes.append(node)
        return node

    def wipe_etcd(self) -> None:
        """Stop etcd, delete its data and start it empty, as after losing or rebuilding it."""
        assert self.etcd is not None
        self.etcd.stop()
        for member in self.etcd.members:
            shutil.rmtree(member.data_dir, ignore_errors=True)
        self.etcd.start()

    def etcdctl_ns(self) -> Netns:
        return self.etcd_hosts[0]

    @property
    def endpoints(self) -> str:
        assert self.etcd is not None
        return ",".join(self.etcd.endpoints)

    def cli_in_etcd_host(
        self, *args: str, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.etcdctl_ns().run(
            self.cli, *args, f"--etcd-endpoints={self.endpoints}", input=input, check=False
        )

    def etcd_get_prefix(self, prefix: str) -> dict[str, str]:
        """Every key under ``prefix`` and its value, as etcdctl on the etcd machine reads them."""
        assert self.etcd is not None
        lines = self.etcd.etcdctl("get", "--prefix", prefix).splitlines()
        return dict(zip(lines[0::2], lines[1::2], strict=False))

    @property
    def route_table_id(self) -> str:
        """The VPC route table the agents of an aws-vpc cluster keep."""
        assert self.aws is not None and self.aws.vpc is not None, "an aws-vpc cluster, built"
        return self.aws.vpc.main_route_table_id

    def backend_config(self) -> dict[str, Any]:
        """The network config's Backend object."""
        backend: dict[str, Any] = {"Type": self.backend}
        if self.aws is not None:
            backend.update(Mode="node", RouteTableID=self.route_table_id)
        backend.update(self.backend_options)
        return backend

    def set_config(self, config: str | None = None) -> None:
        text = config or json.dumps({"Network": self.network, "Backend": self.backend_config()})
        result = self.cli_in_etcd_host("config", "set", "-", input=text)
        if result.returncode != 0:
            raise ClusterError(result.stderr.strip())

    # --- agents -------------------------------------------------------------------------

    def start_agent(self, node: LabNode, *extra: str, iface: str | None = "eth0") -> None:
        """Start the node's agent; ``iface=None`` leaves the choice to ``extra`` flags."""
        args = [
            self.cli, "agent",
            f"--etcd-endpoints={self.endpoints}",
            *([f"--iface={iface}"] if iface else []),
            f"--subnet-file={node.subnet_file}",
            *extra,
        ]  # fmt: skip
        node.agent_args = list(extra)
        with node.log_file.open("ab") as log:
            node.agent = node.ns.popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=self.agent_env(node)
            )

    def agent_env(self, node: LabNode) -> dict[str, str]:
        """The node's agent environment: this process's, and in an aws-vpc cluster its
        instance's endpoints instead of any AWS_* setting of the host (region and credentials
        then come from its IMDS, as on an instance)."""
        env = dict(os.environ)
        if self.aws is None:
            return env
        return self.aws.node_env(self.nodes.index(node), env)

    def stop_agent(self, node: LabNode, *, kill: bool = False) -> int | None:
        if node.agent is None:
            return None
        code = stop_process(node.agent, kill=kill)
        node.agent = None
        return code

    def wait_ready(self, node: LabNode, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not node.subnet_file.exists():
            if node.agent is not None and node.agent.poll() is not None:
                raise ClusterError(f"{node.name}'s agent exited:\n{node.log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.name} wrote no subnet.env:\n{node.log_tail()}")
            time.sleep(0.1)

    def attach_gateway(self, node: LabNode) -> None:
        """Put FLANNEL_SUBNET on cni0, as Docker or the CNI bridge plugin would."""
        address = node.subnet_env()["FLANNEL_SUBNET"]
        if not node.ns.ip("link", "show", "cni0", check=False):
            node.ns.ip("link", "add", "cni0", "type", "bridge")
            node.ns.ip("link", "set", "cni0", "up")
        node.ns.ip("addr", "flush", "dev", "cni0")
        node.ns.ip("addr", "add", address, "dev", "cni0")

    def start(self, *extra: str) -> LabCluster:
        """Write the config, start every agent, and wait until every node is ready."""
        self.set_config()
        for node in self.nodes:
            self.start_agent(node, *extra)
        for node in self.nodes:
            self.wait_ready(node)
            self.attach_gateway(node)
        return self

    def ping(self, src: LabNode, dst: LabNode, timeout: float = 20) -> bool:
        """Ping dst's gateway from src's gateway address, retrying until routes converge."""
        deadline = time.monotonic() + timeout
        while True:
            result = src.ns.run(
                "ping", "-c", "1", "-W", "1", "-I", src.gateway, dst.gateway, check=False
            )
            if result.returncode == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def routes(self, node: LabNode) -> str:
        return node.ns.ip("route", "show")

    # --- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        for node in self.nodes:
            self.stop_agent(node)
        for node in self.nodes:
            node.ns.delete()
        if self.etcd is not None:
            self.etcd.close()
        for host in self.etcd_hosts:
            host.delete()
        if self.aws is not None:
            self.aws.stop()
        if self.cloud_host is not None:
            self.cloud_host.delete()
        if self.switch is not None:
            self.switch.delete()
        shutil.rmtree(self.workdir, ignore_errors=True)

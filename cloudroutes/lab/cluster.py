"""A cluster of nodes on one machine: a switch, an etcd machine and N nodes, each a namespace.

Every node is plugged into the switch on 198.18.0.0/24 (a documentation range: nothing leaves
the machine) and runs a real ``cloudroutes agent``. Once a node has written subnet.env, either
its FLANNEL_SUBNET gateway address goes on a ``cni0`` bridge, as Docker would put it
(``attach_gateway``), or pods join it: namespaces given their eth0 by the installed ``flannel``
CNI plugin, run inside the node as a runtime would (``add_pod``). The demo and the end-to-end
tests both build their clusters with this.

With ``ipv6=True`` the network is dual-stack: every node also gets 2001:db8::<i>/64 on eth0 (a
documentation range; ``nodad``, so the address is usable at once rather than after duplicate
address detection) and IPv6 forwarding (a pod's IPv6 packets cross the node), the network
config enables IPv6 with ``IPV6_NETWORK``, cni0 gets FLANNEL_IPV6_SUBNET's address too, and
pods get an IPv6 address as well. ``ipv4=False`` with it makes the network IPv6-only (the
underlay keeps its IPv4 addresses, which the agents reach etcd by).

With a cloud backend (aws-vpc, ali-vpc, gce) the cluster also gets that cloud's fake: a "cloud"
namespace on the switch holds the API endpoint (a counting proxy in front of the fake) and one
metadata server per node, each node is an instance whose address is its underlay address, and
each agent runs with its own instance's environment and nothing from the host's configuration
for that cloud. What differs between the clouds is a ``CloudFake`` (one small class each);
the cluster does the same with all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_interface, ip_network
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from cloudroutes.cni_install import install_plugin
from cloudroutes.errors import CloudroutesError
from cloudroutes.lab.alibaba import AlibabaLab
from cloudroutes.lab.aws import AwsLab
from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.lab.fault_proxy import FaultProxy
from cloudroutes.lab.gce import GceLab
from cloudroutes.lab.netns import Netns, Underlay, delete_netns, unique_name
from cloudroutes.lab.process import stop_process
from cloudroutes.subnet_env import read_subnet_env

ETCD_ADDRESS = "198.18.0.254"
# The pods' IPv6 network of a dual-stack cluster (unique local addresses, never routed out).
IPV6_NETWORK = "fc00::/48"
# Where Debian's containernetworking-plugins (bridge, host-local) are.
SYSTEM_CNI_PLUGINS = "/usr/lib/cni"
# A pod's CNI calls wait this long at most: a plugin never takes seconds.
CNI_TIMEOUT = 30.0
IPERF_PORT = 5201
# A fake cloud's endpoints (its API and every node's metadata server), as a cloud's sit on the
# instance's network.
CLOUD_ADDRESS = "198.18.0.253"
AWS_VPC = "aws-vpc"
ALI_VPC = "ali-vpc"
GCE = "gce"

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


def node_address6(i: int) -> str:
    """Node i's IPv6 underlay address in a dual-stack cluster (1-based)."""
    return f"2001:db8::{i}"


@dataclass
class LabNode:
    name: str
    ns: Netns
    address: str
    run_dir: Path
    agent: subprocess.Popen[bytes] | None = None
    agent_args: list[str] = field(default_factory=list)
    # The instance this node is, in a cloud backend's cluster.
    machine: CloudMachine | None = None
    # Its IPv6 underlay address, in a dual-stack cluster.
    address6: str = ""

    @property
    def subnet_file(self) -> Path:
        return self.run_dir / "subnet.env"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "agent.log"

    def subnet_env(self) -> dict[str, str]:
        return read_subnet_env(self.subnet_file)

    @property
    def cni_conf(self) -> dict[str, Any]:
        """The node's CNI network config: flannel's plugin reading this node's subnet.env, its
        data (the saved delegate configs, host-local's leases) in the node's run directory, as
        on the node's own disk, so the lab leaves nothing in /var/lib/cni."""
        return {
            "cniVersion": "0.3.1",
            "name": "cloudroutes-lab",
            "type": "flannel",
            "subnetFile": str(self.subnet_file),
            "dataDir": str(self.run_dir / "cni" / "flannel"),
            "ipam": {"dataDir": str(self.run_dir / "cni" / "networks")},
        }

    @property
    def gateway(self) -> str:
        """This node's FLANNEL_SUBNET address, without the prefix length."""
        return self.subnet_env()["FLANNEL_SUBNET"].split("/")[0]

    @property
    def gateway6(self) -> str:
        """This node's FLANNEL_IPV6_SUBNET address, without the prefix length."""
        return self.subnet_env()["FLANNEL_IPV6_SUBNET"].split("/")[0]

    @property
    def subnet6(self) -> str:
        """This node's IPv6 lease subnet, e.g. fc00:0:0:2::/64."""
        value = self.subnet_env()["FLANNEL_IPV6_SUBNET"]
        return str(ip_interface(value).network)

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


@dataclass(frozen=True)
class LabPod:
    """A pod: a namespace whose eth0 the flannel CNI plugin made, on its node's cni0."""

    name: str  # how the demo calls it, e.g. "node1-pod2"
    node: LabNode
    ns: Netns  # its name is the pod's CNI container id
    address: str  # its IPv4 address, without the prefix length
    address6: str = ""  # its IPv6 address in a dual-stack cluster


def iperf(src: Netns, dst: Netns, source: str, target: str, seconds: float) -> float:
    """Bits per second received in one iperf3 TCP run from ``source`` in src to ``target`` in
    dst; raises ClusterError when iperf3 gives no figure."""
    server = dst.popen(
        ["iperf3", "-s", "-1", "-B", target, "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        report: dict[str, Any] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            result = src.run(
                "iperf3", "-J", "-c", target, "-B", source, "-p", str(IPERF_PORT),
                "-t", str(seconds), check=False, timeout=seconds + 30,
            )  # fmt: skip
            try:
                report = json.loads(result.stdout or "{}")
            except ValueError:
                report = {}
            received = report.get("end", {}).get("sum_received")
            if result.returncode == 0 and received:
                return float(received["bits_per_second"])
            time.sleep(0.1)  # the server is not listening yet
        error = report.get("error") or "no report"
        raise ClusterError(f"iperf3 from {source} to {target} failed: {error}")
    finally:
        server.kill()
        server.wait()


# --- the clouds --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CloudMachine:
    """The instance a node of a cloud cluster is."""

    target: str  # what its lease's route points at, as the cloud lists it
    shown: str  # how the demo introduces it, e.g. "instance i-0abc, ENI eni-0def"


@dataclass(frozen=True)
class CloudRoute:
    """One route of the cloud's table, as the fake holds it (read without an agent call)."""

    name: str  # "-" where the cloud names no routes (EC2)
    destination: str
    target: str  # a CloudMachine.target for a route to an instance, else the cloud's own hop
    state: str
    made_by_cloud: str  # "" for a route made through the API, else who made it: "AWS (...)"
    ledger_target: str  # what the ledger records for this route when it is cloudroutes'
    marked: bool | None  # it carries the cluster's marker; None: the cloud has no markers


class CloudFake(Protocol):
    """What a cluster needs of one cloud's fake; everything else is the same for every cloud."""

    backend: str
    what: str  # "a fake AWS (moto, IMDS)", for the demo
    listing: str  # the API call that lists the table, for the demo
    modules: tuple[str, ...]  # what the fake and the agents import (the cloud's SDK)
    proxy: FaultProxy | None  # in front of the API, counting the agents' calls

    def start(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def table_id(self) -> str:
        """The route table the agents keep (their ledger's table id)."""
        ...

    def machine(self, i: int) -> CloudMachine: ...

    def node_env(self, i: int, base: dict[str, str]) -> dict[str, str]:
        """Node i's agent environment: ``base`` without the host's settings for this cloud,
        with the lab's endpoints; credentials come from its metadata server."""
        ...

    def backend_config(self) -> dict[str, Any]:
        """The Backend options a cluster of this cloud starts with."""
        ...

    def routes(self, cluster: str) -> list[CloudRoute]:
        """Every route of the table, and whether it carries ``cluster``'s marker."""
        ...


class _Lab(Protocol):
    proxy: FaultProxy | None

    def start(self) -> object: ...

    def stop(self) -> None: ...


LabT = TypeVar("LabT", bound=_Lab)


class _Started(Generic[LabT]):
    """A cloud's lab as the cluster starts and stops it; the proxy counts the agents' calls."""

    def __init__(self, lab: LabT) -> None:
        self.lab = lab

    @property
    def proxy(self) -> FaultProxy | None:
        return self.lab.proxy

    def start(self) -> None:
        self.lab.start()

    def stop(self) -> None:
        self.lab.stop()


class AwsFake(_Started[AwsLab]):
    backend = AWS_VPC
    what = "a fake AWS (moto, IMDS)"
    listing = "DescribeRouteTables"
    modules = ("moto", "boto3")

    def __init__(self, addresses: Sequence[str], host: str, netns: str) -> None:
        super().__init__(AwsLab(addresses, tables=1, host=host, netns=netns))

    @property
    def table_id(self) -> str:
        assert self.lab.vpc is not None, "started"
        return self.lab.vpc.main_route_table_id

    def machine(self, i: int) -> CloudMachine:
        assert self.lab.vpc is not None, "started"
        instance = self.lab.vpc.instances[i]
        shown = f"instance {instance.instance_id}, ENI {instance.eni_id}"
        return CloudMachine(instance.eni_id, shown)

    def node_env(self, i: int, base: dict[str, str]) -> dict[str, str]:
        return self.lab.node_env(i, base)

    def backend_config(self) -> dict[str, Any]:
        return {"Mode": "node", "RouteTableID": self.table_id}

    def routes(self, cluster: str) -> list[CloudRoute]:
        listing = self.lab.admin().describe_route_tables(RouteTableIds=[self.table_id])
        out = []
        for route in listing["RouteTables"][0]["Routes"]:
            eni = route.get("NetworkInterfaceId", "")
            hop = eni or route.get("InstanceId") or route.get("GatewayId") or "?"
            origin = route.get("Origin", "?")
            out.append(
                CloudRoute(
                    name="-",
                    destination=route.get("DestinationCidrBlock")
                    or route.get("DestinationIpv6CidrBlock", "?"),
                    target=hop,
                    state=route.get("State", "?"),
                    made_by_cloud="" if origin == "CreateRoute" else f"AWS ({origin})",
                    ledger_target=eni,
                    marked=None,
                )
            )
        return out


class AlibabaFake(_Started[AlibabaLab]):
    backend = ALI_VPC
    what = "a fake Alibaba Cloud (VPC API, ECS metadata)"
    listing = "DescribeRouteEntryList"
    modules = ("aliyunsdkcore", "aliyunsdkvpc")
    # What may carry a host's Alibaba credentials into an agent.
    HOST_ENV = ("ACCESS_KEY_", "ALIBABA_CLOUD_", "ALICLOUD_", "CLOUDROUTES_ALIYUN_")

    def __init__(self, addresses: Sequence[str], host: str, netns: str) -> None:
        super().__init__(AlibabaLab(addresses, host=host, netns=netns))

    @property
    def table_id(self) -> str:
        assert self.lab.vpc is not None, "started"
        return self.lab.vpc.route_table_id

    def machine(self, i: int) -> CloudMachine:
        assert self.lab.vpc is not None, "started"
        instance = self.lab.vpc.instances[i].instance_id
        return CloudMachine(instance, f"instance {instance}")

    def node_env(self, i: int, base: dict[str, str]) -> dict[str, str]:
        from providers.ali_vpc import ENDPOINT_ENV, METADATA_ENV

        endpoints = self.lab.node(i)
        env = {k: v for k, v in base.items() if not k.startswith(self.HOST_ENV)}
        env[METADATA_ENV] = endpoints.metadata_url
        env[ENDPOINT_ENV] = endpoints.api_url
        return env

    def backend_config(self) -> dict[str, Any]:
        # No RouteTableIDs: the agents find their vRouter's table, as on a one-table VPC.
        return {"Mode": "node"}

    def routes(self, cluster: str) -> list[CloudRoute]:
        from providers.ali_route_table import Markers

        ours = Markers(cluster).name
        return [
            CloudRoute(
                name=entry.name or "-",
                destination=entry.destination,
                target=entry.next_hop_id or entry.next_hop_type,
                state=entry.status,
                made_by_cloud="" if entry.kind == "Custom" else f"Alibaba ({entry.kind})",
                ledger_target=entry.next_hop_id if entry.next_hop_type == "Instance" else "",
                marked=entry.name == ours,
            )
            for entry in self.lab.api.entries(self.table_id, kind=None)
        ]


class GceFake(_Started[GceLab]):
    backend = GCE
    what = "a fake GCE (Compute API, metadata servers)"
    listing = "routes.list"
    modules = ("google.cloud.compute_v1", "google.auth")

    def __init__(self, addresses: Sequence[str], host: str, netns: str) -> None:
        super().__init__(GceLab(addresses, host=host, netns=netns))

    @property
    def table_id(self) -> str:
        assert self.lab.project is not None, "started"
        return self.lab.project.network_path

    def machine(self, i: int) -> CloudMachine:
        assert self.lab.project is not None, "started"
        instance = self.lab.project.instances[i]
        return CloudMachine(instance.path, f"instance {instance.name}")

    def node_env(self, i: int, base: dict[str, str]) -> dict[str, str]:
        from providers.gce import API_ENDPOINT_VARIABLE

        # GceLab.node_env leaves the API endpoint out: the agents reach it through the proxy.
        env = self.lab.node_env(i, {k: v for k, v in base.items() if k != API_ENDPOINT_VARIABLE})
        env[API_ENDPOINT_VARIABLE] = self.lab.api_url
        return env

    def backend_config(self) -> dict[str, Any]:
        return {"Mode": "node"}

    def routes(self, cluster: str) -> list[CloudRoute]:
        from providers.gce_api import cluster_mark, resource_path, route_name
        from providers.gce_route_table import ledger_target

        assert self.lab.project is not None, "started"
        mark = f"cloudroutes cluster={cluster_mark(cluster)}"
        out = []
        for route in self.lab.api.routes(self.lab.project.project_id):
            name, destination = str(route["name"]), str(route["destRange"])
            instance = resource_path(str(route.get("nextHopInstance", "")))
            hop = next((str(v) for k, v in route.items() if k.startswith("nextHop")), "?")
            warnings = ",".join(str(w.get("code")) for w in route.get("warnings", []))
            kind = "the subnet's route" if route.get("routeType") == "SUBNET" else "default route"
            own = name.startswith("default-route-")  # GCE's own routes for the network
            canonical = route_name(cluster, ip_network(destination))
            out.append(
                CloudRoute(
                    name=name,
                    destination=destination,
                    target=instance or hop.rsplit("/", 1)[-1],
                    state=warnings or "active",
                    made_by_cloud=f"GCE ({kind})" if own else "",
                    ledger_target=ledger_target(instance, name, canonical) if instance else "",
                    marked=mark in str(route.get("description", "")),
                )
            )
        return out


CLOUDS: dict[str, type[AwsFake] | type[AlibabaFake] | type[GceFake]] = {
    AWS_VPC: AwsFake,
    ALI_VPC: AlibabaFake,
    GCE: GceFake,
}


class LabCluster:
    def __init__(
        self, nodes: int = 3, *, network: str = "10.5.0.0/16", backend: str = "host-gw",
        etcd_members: int = 1, backend_options: Mapping[str, Any] | None = None,
        ipv6: bool = False, ipv4: bool = True,
    ) -> None:  # fmt: skip
        """``backend_options`` go into the network config's Backend object (a cloud
        cluster's default to Mode "node", and its route table where the cloud needs one);
        ``ipv6`` makes the cluster dual-stack, and without ``ipv4`` IPv6-only (the module doc)."""
        if not (ipv4 or ipv6):
            raise ClusterError("a lab network needs IPv4 or IPv6 (ipv4=False needs ipv6=True)")
        self.node_count = nodes
        self.network = network
        self.ipv6 = ipv6
        self.ipv4 = ipv4
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self.etcd_members = etcd_members
        self.workdir = Path(tempfile.mkdtemp(prefix="cloudroutes-lab-"))
        self.switch: Underlay | None = None
        self.etcd_hosts: list[Netns] = []
        self.etcd: EtcdCluster | None = None
        self.nodes: list[LabNode] = []
        self.pods: list[LabPod] = []
        self.cli = str(Path(sys.executable).with_name("cloudroutes"))
        # The runtime's plugin path: the system's plugins, then flannel as install-cni puts it.
        plugins = self.workdir / "cni-bin"
        plugins.mkdir()
        install_plugin(plugins)
        self.cni_path = f"{SYSTEM_CNI_PLUGINS}:{plugins}"
        self.cloud_host: Netns | None = None
        self.cloud: CloudFake | None = None
        # Every namespace name, recorded before it is made: a Ctrl-C between `ip netns add`
        # and the assignment that would track it must not leave the namespace behind.
        self._names: list[str] = []

    # --- building -----------------------------------------------------------------------

    def _name(self, prefix: str) -> str:
        name = unique_name(prefix)
        self._names.append(name)
        return name

    def build(self) -> LabCluster:
        self.switch = Underlay(self._name("crsw"))
        # All etcd members share one "machine" namespace, each on its own port, so a test can
        # stop the member an agent talks to and see it move to another.
        host = Netns(self._name("cretcd"))
        self.etcd_hosts.append(host)
        self.switch.plug(host, "eth0", f"{ETCD_ADDRESS}/24")
        self.etcd = EtcdCluster(size=self.etcd_members, host=ETCD_ADDRESS, netns=host.name).start()
        if self.backend in CLOUDS:
            self._build_cloud()
        for i in range(1, self.node_count + 1):
            self.add_node(i)
        return self

    def _build_cloud(self) -> None:
        assert self.switch is not None
        self.cloud_host = Netns(self._name("crcloud"))
        self.switch.plug(self.cloud_host, "eth0", f"{CLOUD_ADDRESS}/24")
        addresses = [node_address(i) for i in range(1, self.node_count + 1)]
        cloud = CLOUDS[self.backend](addresses, CLOUD_ADDRESS, self.cloud_host.name)
        cloud.start()  # stops what it started if it fails: close() need not know
        self.cloud = cloud

    def add_node(self, i: int) -> LabNode:
        assert self.switch is not None
        machine = None
        if self.cloud is not None:
            if not 1 <= i <= self.node_count:
                raise ClusterError(
                    f"node{i} has no instance in the lab's cloud; build it with more"
                )
            machine = self.cloud.machine(i - 1)
        ns = Netns(self._name(f"crn{i}-"))
        address = node_address(i)
        self.switch.plug(ns, "eth0", f"{address}/24")
        ns.sysctl("net.ipv4.ip_forward", "1")
        address6 = ""
        if self.ipv6:
            address6 = node_address6(i)
            ns.ip("addr", "add", f"{address6}/64", "dev", "eth0", "nodad")
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")
        run_dir = self.workdir / f"node{i}"
        run_dir.mkdir(exist_ok=True)
        node = LabNode(f"node{i}", ns, address, run_dir, machine=machine, address6=address6)
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
        """The route table the agents of a cloud cluster keep (GCE: their network's path)."""
        assert self.cloud is not None, "a cloud backend's cluster, built"
        return self.cloud.table_id

    def backend_config(self) -> dict[str, Any]:
        """The network config's Backend object."""
        backend: dict[str, Any] = {"Type": self.backend}
        if self.cloud is not None:
            backend.update(self.cloud.backend_config())
        backend.update(self.backend_options)
        return backend

    def network_config(self) -> dict[str, Any]:
        """The network config the cluster starts with."""
        config: dict[str, Any] = {"Network": self.network} if self.ipv4 else {"EnableIPv4": False}
        if self.ipv6:
            config.update(EnableIPv6=True, IPv6Network=IPV6_NETWORK)
        config["Backend"] = self.backend_config()
        return config

    def set_config(self, config: str | None = None) -> None:
        text = config or json.dumps(self.network_config())
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
            # Each node's state (vxlan's VtepMAC) in its own directory, as on its own disk.
            f"--state-dir={node.run_dir}",
            *extra,
        ]  # fmt: skip
        node.agent_args = list(extra)
        with node.log_file.open("ab") as log:
            node.agent = node.ns.popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=self.agent_env(node)
            )

    def agent_env(self, node: LabNode) -> dict[str, str]:
        """The node's agent environment: this process's, and in a cloud cluster its instance's
        endpoints instead of the host's settings for that cloud (region and credentials then
        come from its metadata server, as on an instance)."""
        env = dict(os.environ)
        if self.cloud is None:
            return env
        return self.cloud.node_env(self.nodes.index(node), env)

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
        """Put FLANNEL_SUBNET (and FLANNEL_IPV6_SUBNET) on cni0, as Docker or the CNI bridge
        plugin would."""
        env = node.subnet_env()
        if not node.ns.ip("link", "show", "cni0", check=False):
            node.ns.ip("link", "add", "cni0", "type", "bridge")
            node.ns.ip("link", "set", "cni0", "up")
        # Global addresses only: without its link-local address the node's neighbour
        # solicitations for its IPv6 pods go unanswered.
        node.ns.ip("addr", "flush", "dev", "cni0", "scope", "global")
        address = env.get("FLANNEL_SUBNET")
        if address:
            node.ns.ip("addr", "add", address, "dev", "cni0")
        address6 = env.get("FLANNEL_IPV6_SUBNET")
        if address6:
            node.ns.ip("addr", "add", address6, "dev", "cni0", "nodad")

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
        return _ping_until(src.ns, ("-I", src.gateway, dst.gateway), timeout)

    def ping6(self, src: LabNode, dst: LabNode, timeout: float = 20) -> bool:
        """Ping dst's IPv6 gateway from src's over IPv6, retrying until routes converge."""
        return _ping_until(src.ns, ("-6", "-I", src.gateway6, dst.gateway6), timeout)

    def ping_pod(self, src: LabPod, dst: LabPod, timeout: float = 20) -> bool:
        """Ping dst pod from src pod, retrying until routes converge."""
        return _ping_until(src.ns, (dst.address,), timeout)

    def ping_pod6(self, src: LabPod, dst: LabPod, timeout: float = 20) -> bool:
        """Ping dst pod's IPv6 address from src pod, retrying until routes converge."""
        return _ping_until(src.ns, ("-6", dst.address6), timeout)

    # --- pods -----------------------------------------------------------------------------

    def cni(self, node: LabNode, command: str, container: str) -> subprocess.CompletedProcess[str]:
        """Run the flannel plugin inside ``node`` for the pod namespace ``container``, as a
        runtime would: found in CNI_PATH, the node's config on stdin."""
        plugin = shutil.which("flannel", path=self.cni_path)
        if plugin is None:
            raise ClusterError(
                f"no flannel CNI plugin in {self.cni_path}; run cloudroutes install-cni"
            )
        env = (
            f"CNI_COMMAND={command}", f"CNI_CONTAINERID={container}",
            f"CNI_NETNS=/var/run/netns/{container}", "CNI_IFNAME=eth0",
            f"CNI_PATH={self.cni_path}",
        )  # fmt: skip
        return node.ns.run(
            "env", *env, plugin, input=json.dumps(node.cni_conf), check=False, timeout=CNI_TIMEOUT
        )

    def add_pod(self, node: LabNode, name: str) -> LabPod:
        """A new pod on ``node`` (it must be ready), attached by the CNI plugin's ADD."""
        ns = Netns(self._name(f"crp{self.nodes.index(node) + 1}-"))
        try:
            result = self.cni(node, "ADD", ns.name)
            try:
                answer = json.loads(result.stdout)
            except ValueError:
                answer = {}
            try:
                addresses = [str(ip["address"]).split("/")[0] for ip in answer["ips"]]
            except (KeyError, TypeError):
                addresses = []
            address = next((a for a in addresses if ":" not in a), "")
            address6 = next((a for a in addresses if ":" in a), "")
            if result.returncode != 0 or not (address or address6):
                why = answer.get("msg") if isinstance(answer, dict) else None
                said = str(why or result.stderr.strip() or result.stdout.strip() or "no answer")
                raise ClusterError(
                    f"CNI ADD of {name} on {node.name} failed: {said.splitlines()[-1]}"
                )
        except BaseException:
            self._release(node, ns)
            raise
        pod = LabPod(name, node, ns, address, address6)
        self.pods.append(pod)
        return pod

    def remove_pod(self, pod: LabPod) -> None:
        """The CNI plugin's DEL (the bridge port and host-local's lease go), then the pod."""
        self.pods.remove(pod)
        self._release(pod.node, pod.ns)

    def _release(self, node: LabNode, ns: Netns) -> None:
        try:
            self.cni(node, "DEL", ns.name)
        except (subprocess.TimeoutExpired, ClusterError):
            pass  # the namespace goes anyway, and the node's directory with the lab
        finally:
            ns.delete()

    def routes(self, node: LabNode) -> str:
        return node.ns.ip("route", "show")

    # --- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        while self.pods:  # the newest first, as a runtime tears down
            self.remove_pod(self.pods[-1])
        for node in self.nodes:
            self.stop_agent(node)
        for node in self.nodes:
            node.ns.delete()
        if self.etcd is not None:
            self.etcd.close()
        for host in self.etcd_hosts:
            host.delete()
        if self.cloud is not None:
            self.cloud.stop()
        if self.cloud_host is not None:
            self.cloud_host.delete()
        if self.switch is not None:
            self.switch.delete()
        for name in self._names:  # those made but not yet tracked when an interrupt came
            delete_netns(name)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _ping_until(ns: Netns, args: Sequence[str], timeout: float) -> bool:
    """One-packet pings inside ``ns`` until one is answered or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if ns.run("ping", "-c", "1", "-W", "1", *args, check=False).returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)

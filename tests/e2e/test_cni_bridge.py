"""The installed ``flannel`` plugin with Debian's real bridge and host-local, in namespaces.

A "node" namespace has a subnet.env; pods are namespaces. The plugin is found in CNI_PATH (the
system's plugins and this venv's bin) and run inside the node, as a runtime would.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable
from ipaddress import ip_interface, ip_network
from pathlib import Path

import pytest

from cloudroutes.lab.netns import Netns
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]

SYSTEM_PLUGINS = "/usr/lib/cni"
CNI_PATH = f"{SYSTEM_PLUGINS}:{Path(sys.executable).parent}"
SUBNET = "10.1.17.0/24"
MTU = 1400

needs_plugins = pytest.mark.skipif(
    not os.path.exists(f"{SYSTEM_PLUGINS}/bridge"), reason="needs containernetworking-plugins"
)


def find_in_cni_path(name: str) -> str:
    for directory in CNI_PATH.split(":"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError(f"{name} is not in CNI_PATH {CNI_PATH}: is the package installed?")


class Node:
    """A node namespace with flannel's files in a directory of its own."""

    def __init__(self, ns: Netns, root: Path) -> None:
        self.ns = ns
        self.subnet_file = root / "run" / "flannel" / "subnet.env"
        self.subnet_file.parent.mkdir(parents=True)
        self.subnet_file.write_text(
            f"FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU={MTU}\n"
            "FLANNEL_IPMASQ=true\n"
        )
        self.data_dir = root / "cni" / "flannel"
        self.ipam_dir = root / "ipam"
        self.conf = {
            "cniVersion": "0.3.1",
            "name": f"cni-{ns.name}",
            "type": "flannel",
            "subnetFile": str(self.subnet_file),
            "dataDir": str(self.data_dir),
            # host-local's leases stay in this test's directory, not /var/lib/cni/networks.
            "ipam": {"dataDir": str(self.ipam_dir)},
        }
        self.plugin = find_in_cni_path("flannel")

    def cni(self, command: str, pod: Netns, container_id: str) -> tuple[int, str]:
        result = self.ns.run(
            "env",
            f"CNI_COMMAND={command}",
            f"CNI_CONTAINERID={container_id}",
            f"CNI_NETNS={pod.path}",
            "CNI_IFNAME=eth0",
            f"CNI_PATH={CNI_PATH}",
            self.plugin,
            input=json.dumps(self.conf),
            check=False,
        )
        assert "Traceback" not in result.stderr
        return result.returncode, result.stdout

    def add(self, pod: Netns, container_id: str) -> dict[str, object]:
        status, out = self.cni("ADD", pod, container_id)
        assert status == 0, out
        answer: dict[str, object] = json.loads(out)
        return answer


@pytest.fixture
def node(netns: Callable[[str], Netns], tmp_path: Path) -> Node:
    return Node(netns("cn"), tmp_path)


def pod_address(pod: Netns) -> str:
    (eth0,) = json.loads(pod.ip("-j", "-4", "addr", "show", "dev", "eth0"))
    info = eth0["addr_info"][0]
    return f"{info['local']}/{info['prefixlen']}"


@needs_plugins
def test_pods_get_addresses_from_the_node_subnet_and_reach_each_other(
    node: Node, netns: Callable[[str], Netns]
) -> None:
    pod_a, pod_b = netns("cp"), netns("cp")
    answer = node.add(pod_a, "pod-a")
    node.add(pod_b, "pod-b")

    ips = answer["ips"]
    assert isinstance(ips, list) and ips[0]["gateway"] == "10.1.17.1"
    address_a, address_b = pod_address(pod_a), pod_address(pod_b)
    assert ips[0]["address"] == address_a
    assert {ip_interface(address_a).network, ip_interface(address_b).network} == {
        ip_network(SUBNET)
    }
    assert "inet 10.1.17.1/24" in node.ns.ip("addr", "show", "dev", "cni0")
    assert "10.1.0.0/16 via 10.1.17.1" in pod_a.ip("route")
    (link,) = json.loads(pod_a.ip("-j", "link", "show", "dev", "eth0"))
    assert link["mtu"] == MTU

    assert pod_a.ping(address_b.split("/")[0])
    assert pod_b.ping(address_a.split("/")[0])

    saved = node.data_dir / "pod-a"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert stat.S_IMODE(node.data_dir.stat().st_mode) == 0o700
    delegate = json.loads(saved.read_text())
    assert delegate["type"] == "bridge" and delegate["mtu"] == MTU


@needs_plugins
def test_del_removes_the_pod_network_and_is_idempotent(
    node: Node, netns: Callable[[str], Netns]
) -> None:
    pod = netns("cp")
    node.add(pod, "pod-a")
    address = pod_address(pod).split("/")[0]
    ipam_lease = node.ipam_dir / str(node.conf["name"]) / address
    assert (node.data_dir / "pod-a").exists() and ipam_lease.exists()

    assert node.cni("DEL", pod, "pod-a") == (0, "")
    assert not (node.data_dir / "pod-a").exists()
    assert "eth0" not in pod.ip("link", "show")
    assert not ipam_lease.exists()  # host-local gave the address back
    assert node.cni("DEL", pod, "pod-a") == (0, "")


@needs_plugins
def test_missing_subnet_env_answers_flannels_error(
    node: Node, netns: Callable[[str], Netns]
) -> None:
    node.subnet_file.unlink()
    status, out = node.cni("ADD", netns("cp"), "pod-a")
    assert status == 1
    answer = json.loads(out)
    assert answer["msg"] == (
        f"failed to load flannel 'subnet.env' file: open {node.subnet_file}: no such file or "
        "directory. Check the flannel pod log for this node."
    )
    assert "cni0" not in node.ns.ip("link", "show")


@needs_plugins
def test_dual_stack_pod(node: Node, netns: Callable[[str], Netns]) -> None:
    node.subnet_file.write_text(
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:10::/48\nFLANNEL_IPV6_SUBNET=fd00:10:0:17::1/64\n"
        f"FLANNEL_MTU={MTU}\nFLANNEL_IPMASQ=true\n"
    )
    pod = netns("cp")
    answer = node.add(pod, "pod-a")
    addresses = [ip_interface(ip["address"]) for ip in answer["ips"]]  # type: ignore[attr-defined]
    assert [a.network for a in addresses] == [
        ip_network(SUBNET),
        ip_network("fd00:10:0:17::/64"),
    ]
    assert f"inet6 {addresses[1]}" in pod.ip("-6", "addr", "show", "dev", "eth0")
    assert "fd00:10::/48 via fd00:10:0:17::1" in pod.ip("-6", "route")

"""Mixed clusters: cloudroutes nodes and flanneld nodes in one etcd, each reading the other's
leases.

Our leases are read here as flannel reads them, by a decoder written in this file from flannel's
rules (its key regex, its lease fields in their order, vxlan's BackendData) and compared byte for
byte with what flanneld's Go encoder writes for the same values. A flanneld node is then made by
hand (its device, its lease in flanneld's exact bytes, its kernel entries toward our nodes) and
our nodes must program it as flanneld would, so that the gateways reach each other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest

from cloudroutes.lab.cluster import LabCluster, LabNode
from tests.conftest import needs_root
from tests.wait import wait_for

pytestmark = [needs_root, pytest.mark.slow]

PREFIX = "/coreos.com/network"
OURS = 2  # cloudroutes nodes in each cluster; a test may add a flanneld node after them
DEVICE = "flannel.1"
# flannel's subnet key regex (subnet.ParseSubnetKey), searched in the key's last part.
KEY = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")
# flannel's LeaseAttrs fields, in the order its encoder writes them.
FIELDS = ("PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data")
MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")  # what Go's net.ParseMAC takes
FLANNELD_SUBNET = IPv4Network("10.5.200.0/24")
FLANNELD_MAC = "0a:f1:00:00:00:c8"


@dataclass(frozen=True)
class VxlanData:
    vni: int
    vtep_mac: str


@dataclass(frozen=True)
class FlannelLease:
    """A lease as flanneld holds it after reading it from etcd."""

    subnet: IPv4Network
    public_ip: IPv4Address
    public_ipv6: str | None
    backend_type: str
    vxlan: VxlanData | None


def decode(key: str, value: str) -> FlannelLease:
    """flanneld's reading of one lease: fails on anything flanneld would refuse or need, or
    that its encoder never writes (an empty BackendType)."""
    match = KEY.search(key.rsplit("/", 1)[-1])
    assert match and match[3] is None, f"{key}: not an IPv4 subnet key flannel parses"
    subnet = IPv4Network(f"{match[1]}/{match[2]}")
    pairs = json.loads(value, object_pairs_hook=list)
    names = [name for name, _ in pairs]
    assert set(names) <= set(FIELDS), f"{key}: fields flannel does not know: {names}"
    assert names == sorted(names, key=FIELDS.index), f"{key}: not in flannel's order: {names}"
    fields = dict(pairs)
    public_ip = fields.get("PublicIP")
    assert isinstance(public_ip, str), f"{key}: PublicIP missing or not a string"
    public_ipv6 = fields.get("PublicIPv6")
    assert public_ipv6 is None or isinstance(public_ipv6, str), f"{key}: PublicIPv6"
    backend_type = fields.get("BackendType", "")
    assert isinstance(backend_type, str) and ("BackendType" not in fields or backend_type), (
        f"{key}: BackendType must be a non-empty string or left out"
    )
    vxlan = None
    if backend_type == "vxlan":
        data = fields.get("BackendData")
        assert isinstance(data, list), f"{key}: vxlan lease without BackendData"
        assert [name for name, _ in data] == ["VNI", "VtepMAC"], f"{key}: BackendData {data}"
        vni, mac = dict(data)["VNI"], dict(data)["VtepMAC"]
        assert type(vni) is int and 0 < vni < 1 << 24, f"{key}: VNI {vni!r}"
        assert isinstance(mac, str) and MAC.fullmatch(mac), f"{key}: VtepMAC {mac!r}"
        vxlan = VxlanData(vni, mac)
    return FlannelLease(subnet, IPv4Address(public_ip), public_ipv6, backend_type, vxlan)


def go_encode(lease: FlannelLease) -> str:
    """The bytes flanneld's encoding/json writes for ``lease`` (omitempty on BackendType and
    BackendData, vxlan's BackendData as its vxlanLeaseAttrs struct, the MAC as
    net.HardwareAddr.String writes it)."""
    value: dict[str, object] = {"PublicIP": str(lease.public_ip), "PublicIPv6": lease.public_ipv6}
    if lease.backend_type:
        value["BackendType"] = lease.backend_type
    if lease.vxlan is not None:
        value["BackendData"] = {"VNI": lease.vxlan.vni, "VtepMAC": lease.vxlan.vtep_mac.lower()}
    return json.dumps(value, separators=(",", ":"))


def lease_of(cluster: LabCluster, node: LabNode) -> tuple[str, str]:
    """The key and value of ``node``'s lease, as etcd holds them."""
    key = f"{PREFIX}/subnets/{node.subnet.replace('/', '-')}"
    leases = cluster.etcd_get_prefix(f"{PREFIX}/subnets/")
    assert key in leases, f"{node.name}'s lease {key} in {sorted(leases)}"
    return key, leases[key]


def device_mac(node: LabNode) -> str:
    match = re.search(r"link/ether (\S+)", node.ns.ip("link", "show", DEVICE))
    assert match, f"{DEVICE} on {node.name}"
    return match[1]


def one_line(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def host_gw() -> Iterator[LabCluster]:
    lab = LabCluster(OURS, backend="host-gw").build()
    try:
        yield lab.start()
    finally:
        lab.close()


@pytest.fixture(scope="module")
def vxlan() -> Iterator[LabCluster]:
    lab = LabCluster(OURS, backend="vxlan").build()
    try:
        yield lab.start()
    finally:
        lab.close()


def test_our_host_gw_leases_read_as_flannel_reads_them(host_gw: LabCluster) -> None:
    for node in host_gw.nodes[:OURS]:
        key, value = lease_of(host_gw, node)
        lease = decode(key, value)
        assert lease == FlannelLease(
            IPv4Network(node.subnet), IPv4Address(node.address), None, "host-gw", None
        )
        assert value == go_encode(lease)


def test_our_vxlan_leases_read_as_flannel_reads_them(vxlan: LabCluster) -> None:
    for node in vxlan.nodes[:OURS]:
        key, value = lease_of(vxlan, node)
        lease = decode(key, value)
        assert lease == FlannelLease(
            IPv4Network(node.subnet),
            IPv4Address(node.address),
            None,
            "vxlan",
            VxlanData(1, device_mac(node)),
        )
        assert value == go_encode(lease)


def flanneld_node(cluster: LabCluster) -> LabNode:
    """A node run by flanneld, made by hand: flannel.1 with its VtepMAC, its lease (on a TTL, in
    flanneld's bytes), its subnet.env and gateway, and flanneld's three entries per peer."""
    assert cluster.etcd is not None
    ours = cluster.nodes[:OURS]
    node = cluster.add_node(OURS + 1)
    node.ns.ip("link", "add", DEVICE, "address", FLANNELD_MAC, "type", "vxlan", "id", "1",
               "local", node.address, "dev", "eth0", "dstport", "8472", "nolearning")  # fmt: skip
    node.ns.ip("link", "set", DEVICE, "mtu", "1450", "up")
    node.ns.ip("addr", "add", f"{FLANNELD_SUBNET.network_address}/32", "dev", DEVICE)
    granted = re.search(r"lease ([0-9a-f]+) granted", cluster.etcd.etcdctl("lease", "grant", "600"))
    assert granted
    own = FlannelLease(
        FLANNELD_SUBNET, IPv4Address(node.address), None, "vxlan", VxlanData(1, FLANNELD_MAC)
    )
    key = f"{PREFIX}/subnets/{str(FLANNELD_SUBNET).replace('/', '-')}"
    cluster.etcd.etcdctl("put", f"--lease={granted[1]}", key, go_encode(own))
    node.subnet_file.write_text(
        f"FLANNEL_NETWORK={cluster.network}\nFLANNEL_SUBNET={FLANNELD_SUBNET[1]}/24\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    )
    cluster.attach_gateway(node)
    for peer in ours:
        lease = decode(*lease_of(cluster, peer))
        assert lease.vxlan is not None
        vtep, mac = str(lease.subnet.network_address), lease.vxlan.vtep_mac
        node.ns.ip("neigh", "add", vtep, "lladdr", mac, "dev", DEVICE, "nud", "permanent")
        node.ns.run("bridge", "fdb", "add", mac, "dev", DEVICE, "dst", str(lease.public_ip),
                    "self", "permanent")  # fmt: skip
        node.ns.ip("route", "add", str(lease.subnet), "via", vtep, "dev", DEVICE, "onlink")
    return node


def programmed_as_flanneld_would(node: LabNode, flanneld: LabNode) -> bool:
    vtep = str(FLANNELD_SUBNET.network_address)
    route = one_line(node.ns.ip("route", "show", str(FLANNELD_SUBNET)))
    neighbours = one_line(node.ns.ip("neigh", "show", "dev", DEVICE))
    fdb = one_line(node.ns.run("bridge", "fdb", "show", "dev", DEVICE).stdout)
    return (
        route == [f"{FLANNELD_SUBNET} via {vtep} dev {DEVICE} proto 157 onlink"]
        and f"{vtep} lladdr {FLANNELD_MAC} PERMANENT" in neighbours
        and f"{FLANNELD_MAC} dst {flanneld.address} self permanent" in fdb
    )


def test_a_flanneld_node_written_by_hand_and_our_nodes_reach_each_other(
    vxlan: LabCluster,
) -> None:
    assert vxlan.etcd is not None
    taken = {key.rsplit("/", 1)[-1] for key in vxlan.etcd_get_prefix(f"{PREFIX}/subnets/")}
    assert "10.5.200.0-24" not in taken, "the lab's nodes took the flanneld node's subnet"
    flanneld = flanneld_node(vxlan)
    try:
        for node in vxlan.nodes[:OURS]:
            wait_for(lambda n=node: programmed_as_flanneld_would(n, flanneld), 30,
                     f"{node.name}'s neighbour, FDB entry and route for the flanneld node")  # fmt: skip
            assert vxlan.ping(node, flanneld), f"{node.name} -> flanneld\n{vxlan.routes(node)}"
            assert vxlan.ping(flanneld, node), f"flanneld -> {node.name}\n{vxlan.routes(flanneld)}"
    finally:
        vxlan.etcd.etcdctl("del", f"{PREFIX}/subnets/10.5.200.0-24")

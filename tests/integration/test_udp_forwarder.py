"""The udp forwarder alone, in two namespaces: a TUN in each, the workers between them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from cloudroutes.lab.netns import Netns, Underlay
from providers.udp_forwarder import checksum
from tests.conftest import needs_root
from tests.wait import wait_for

pytestmark = needs_root

# A node without an agent: the TUN, its address and the Network route, the socket and the
# forwarder, with the peer table read from stdin (one line per table) until stdin closes.
_NODE = """
import sys
from ipaddress import IPv4Address, IPv4Network
import subprocess
from providers.udp import DEVICE, accept_local, bind_socket, open_tun, set_link_mtu
from providers.udp_forwarder import Forwarder, Peer

address, subnet, port = sys.argv[1], IPv4Network(sys.argv[2]), int(sys.argv[3])
tun = open_tun()
set_link_mtu(DEVICE, 1472)
accept_local(DEVICE)
for args in (["addr", "add", f"{subnet.network_address}/32", "dev", DEVICE],
             ["link", "set", DEVICE, "up"], ["route", "add", "10.5.0.0/16", "dev", DEVICE]):
    subprocess.run(["ip", *args], check=True)
forwarder = Forwarder(tun, bind_socket(IPv4Address(address), port), port, subnet.network_address)
forwarder.start()
print("ready", flush=True)
for line in sys.stdin:
    peers = [item.split("=") for item in line.split()]
    forwarder.set_peers([Peer(IPv4Network(s), IPv4Address(p)) for s, p in peers])
    print("set", flush=True)
forwarder.stop()
"""


@dataclass
class Node:
    ns: Netns
    address: str
    subnet: str
    process: subprocess.Popen[str]

    @property
    def gateway(self) -> str:
        return self.subnet.replace(".0/24", ".1")

    def set_peers(self, *peers: Node) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        line = " ".join(f"{p.subnet}={p.address}" for p in peers)
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "set"

    def ping(self, target: str, *options: str) -> subprocess.CompletedProcess[str]:
        return self.ns.run(
            "ping", "-c", "1", "-W", "2", "-I", self.gateway, *options, target, check=False
        )


@pytest.fixture
def pair(netns: Callable[[str], Netns], underlay: Underlay) -> Iterator[tuple[Node, Node]]:
    nodes: list[Node] = []
    try:
        for i in (1, 2):
            ns = netns(f"udp{i}-")
            address = f"198.18.0.{i}"
            underlay.plug(ns, "eth0", f"{address}/24")
            ns.sysctl("net.ipv4.ip_forward", "1")
            subnet = f"10.5.{i}.0/24"
            ns.ip("link", "add", "cni0", "type", "bridge")
            ns.ip("addr", "add", subnet.replace(".0/24", ".1/24"), "dev", "cni0")
            ns.ip("link", "set", "cni0", "up")
            process = subprocess.Popen(
                ["ip", "netns", "exec", ns.name, sys.executable, "-c", _NODE, address, subnet,
                 "8285"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
            nodes.append(Node(ns, address, subnet, process))
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            if node.process.stdin is not None:
                node.process.stdin.close()
            node.process.wait(10)


def connect(one: Node, two: Node) -> None:
    """Give each the other as its peer, and wait until the workers run with it."""
    one.set_peers(two)
    two.set_peers(one)
    wait_for(lambda: one.ping(two.gateway).returncode == 0, 20, "a first ping through the workers")


def test_a_ping_crosses_the_forwarders_both_ways(pair: tuple[Node, Node]) -> None:
    one, two = pair
    connect(one, two)
    assert one.ping(two.gateway).returncode == 0
    assert two.ping(one.gateway).returncode == 0


def test_a_peer_table_change_takes_effect(pair: tuple[Node, Node]) -> None:
    one, two = pair
    connect(one, two)
    one.set_peers()
    wait_for(lambda: "0 received" in one.ping(two.gateway).stdout, 10, "an empty peer table")
    one.set_peers(two)
    assert wait_for(lambda: one.ping(two.gateway).returncode == 0, 10, "the new peer table")


def test_the_ttl_is_decremented_on_each_forwarder(pair: tuple[Node, Node]) -> None:
    one, two = pair
    connect(one, two)
    # Sent with TTL 2: node one's forwarder makes it 1, node two's would make it 0: dropped.
    assert one.ping(two.gateway, "-t", "3").returncode == 0
    assert one.ping(two.gateway, "-t", "2").returncode != 0


def test_the_workers_exit_when_their_agent_goes(pair: tuple[Node, Node]) -> None:
    one, _ = pair
    assert one.ns.ip("link", "show", "flannel0")
    one.process.kill()
    one.process.wait()
    wait_for(lambda: not one.ns.ip("link", "show", "flannel0", check=False), 10,
             "the workers to close flannel0")  # fmt: skip


_SINK = """
import hashlib, socket, sys
server = socket.create_server((sys.argv[1], 7000))
print("listening", flush=True)
conn, _ = server.accept()
digest, total = hashlib.sha256(), 0
while chunk := conn.recv(1 << 16):
    digest.update(chunk)
    total += len(chunk)
print(total, digest.hexdigest(), flush=True)
"""

_SOURCE = """
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[3]))
conn = socket.create_connection((sys.argv[2], 7000), source_address=(sys.argv[1], 0))
conn.sendall(data)
conn.close()
print(len(data), hashlib.sha256(data).hexdigest())
"""


def rx_packets(node: Node) -> int:
    stats = json.loads(node.ns.ip("-s", "-j", "link", "show", "flannel0"))[0]["stats64"]
    return int(stats["rx"]["packets"])


def test_a_tcp_stream_arrives_whole_through_batches(pair: tuple[Node, Node]) -> None:
    """Bulk TCP makes runs: UDP_SEGMENT sends, UDP_GRO reads, bursts written to the TUN."""
    one, two = pair
    connect(one, two)
    size = 16 << 20
    sink = subprocess.Popen(
        ["ip", "netns", "exec", two.ns.name, sys.executable, "-c", _SINK, two.gateway],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
        before = rx_packets(two)
        sent = one.ns.run(sys.executable, "-c", _SOURCE, one.gateway, two.gateway, str(size))
        received, _ = sink.communicate(timeout=60)
    finally:
        sink.kill()
    assert received.split() == sent.stdout.split()
    assert received.split()[0] == str(size)
    writes = rx_packets(two) - before
    assert writes < size // 1420, "segments of the stream entered the TUN as bursts"


# A flanneld peer as the wire shows it: a bare IPv4 packet per datagram, from and to port 8285.
_FLANNELD_PEER = """
import socket, struct, sys

def checksum(data):
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

me, node, source, target = sys.argv[1:]
icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + b"flanneld")
icmp[2:4] = checksum(icmp).to_bytes(2, "big")
ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 7, 0, 64, 1, 0,
                           socket.inet_aton(source), socket.inet_aton(target)))
ip[10:12] = checksum(ip).to_bytes(2, "big")
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((me, 8285))
sock.settimeout(5)
sock.sendto(bytes(ip + icmp), (node, 8285))
data, (host, port) = sock.recvfrom(65536)
print(host, port, data.hex())
"""


def test_a_flanneld_peer_and_the_forwarder_speak_bare_packets(pair: tuple[Node, Node]) -> None:
    """An echo request as flanneld sends it comes back as flanneld expects the reply."""
    one, two = pair
    flanneld = "198.18.0.12"
    two.ns.ip("addr", "add", f"{flanneld}/24", "dev", "eth0")
    stranger = Node(two.ns, flanneld, "10.5.12.0/24", two.process)
    connect(one, two)
    one.set_peers(two, stranger)
    result = two.ns.run(sys.executable, "-c", _FLANNELD_PEER, flanneld, one.address,
                        stranger.gateway, one.gateway)  # fmt: skip
    host, port, hexdata = result.stdout.split()
    reply = bytes.fromhex(hexdata)
    assert (host, port) == (one.address, "8285"), "from the node's own udp port"
    assert reply[0] == 0x45 and int.from_bytes(reply[2:4], "big") == len(reply), "a bare packet"
    assert reply[12:16] == bytes(map(int, one.gateway.split(".")))
    assert reply[16:20] == bytes(map(int, stranger.gateway.split(".")))
    assert reply[8] == 63, "the node's forwarder decremented the TTL"
    assert checksum(reply[:20]) == 0
    icmp = reply[20:]
    assert icmp[0] == 0 and icmp[4:8] == b"\x12\x34\x00\x01" and icmp[8:] == b"flanneld"
    assert checksum(icmp) == 0

"""udp: peers reached through the TUN device ``flannel0`` and a UDP socket, wire-compatible
with flanneld's udp backend: same port (``Backend.Port``, default 8285), the
bare IP packet as the payload, and a lease with the PublicIP only (no BackendType, no
BackendData), so nodes running flanneld's udp backend and cloudroutes' share one network.

The device lives as long as the agent holds it open (as flanneld's does): its address is the
lease's network address /32, its MTU the external interface's minus 28 (the outer IPv4 and UDP
headers), and one kernel route sends the whole Network into it. The packets themselves are moved
by providers.udp_forwarder, whose peer table is a route table of its own here, so the lease
vetting and the reconciler's status apply to udp peers as to any route.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyrouteError

from cloudroutes.backend import BackendContext, RouteTableBinding
from cloudroutes.errors import ConfigError, Transient
from cloudroutes.lease import NO_IPV4, Lease, LeaseAttrs
from cloudroutes.routes import Action, Observation, Outcome, Plan, Route, TableLimits
from providers.host_gw import blackhole_routes
from providers.kernel import KernelRouteTable
from providers.udp_forwarder import DEFAULT_PORT, SOL_UDP, UDP_GRO, Forwarder, Peer
from providers.vxlan import configure_device

log = logging.getLogger(__name__)

DEVICE = "flannel0"
# The outer IPv4 (20) and UDP (8) headers.
ENCAP_OVERHEAD = 28
MIN_MTU = 68
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
_WATCH_PERIOD = 1.0
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOCKET_BUFFER = 4 << 20


def parse_port(value: object) -> int:
    """``Backend.Port``: flanneld's default 8285 when absent."""
    if value is None:
        return DEFAULT_PORT
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(
            f"udp backend: Backend.Port must be a whole number from 1 to 65535, not {value!r}; "
            "fix it in the network config"
        )
    return value


def open_tun(name: str = DEVICE) -> int:
    """Create the TUN device ``name`` (packets without a packet-information header, with a
    virtio_net_hdr so that the forwarder can write TCP bursts) and return its fd; the device
    goes away when the last fd is closed."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"udp backend: cannot open /dev/net/tun: {exc.strerror}; load the tun module "
            "(modprobe tun) and run the agent as root"
        ) from None
    try:
        flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            raise ConfigError(
                f"udp backend: device {name} is held by another process (flanneld?); stop it first"
            ) from None
        raise ConfigError(f"udp backend: cannot create TUN device {name}: {exc}") from None
    return fd


def set_link_mtu(name: str, mtu: int) -> int:
    """Set the device's MTU; its index."""
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=name)
        ipr.link("set", index=index, mtu=mtu)
        return int(index)


def accept_local(name: str) -> None:
    """Let the device take packets whose source is one of this host's addresses: the ICMP errors
    the forwarder sends come from the device's own address (as flanneld's do), and Linux drops
    such a packet as a martian unless accept_local is on for the interface."""
    path = Path(f"/proc/sys/net/ipv4/conf/{name}/accept_local")
    try:
        path.write_text("1\n")
    except OSError as exc:
        # Forwarding works without it; only the errors for unleased destinations are lost.
        log.warning(
            "cannot turn on %s (%s): a connection to an unleased pod address will time out "
            "instead of failing at once; make /proc/sys writable for the agent",
            path, exc.strerror,
        )  # fmt: skip


def bind_socket(address: IPv4Address, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # A burst that outruns the worker waits in the socket instead of being dropped: every drop
    # costs a pod's TCP flow a retransmission and a halved window.
    for option in (SO_RCVBUFFORCE, SO_SNDBUFFORCE):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    # Runs of datagrams from one peer come in one read (the forwarder tells them apart);
    # kernels before 5.0 lack it and give one datagram per read.
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    try:
        sock.bind((str(address), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"udp backend: cannot bind UDP {address}:{port}: {exc.strerror}; is another flanneld "
            "or cloudroutes running, or set Backend.Port"
        ) from None
    return sock


class PeerTable:
    """The forwarder's peer table as a route table: one Route per peer subnet, with the peer's
    public IP as the next hop. It never fails: a change is in effect once the workers have it."""

    name = "udp"
    resync_period = 60.0
    limits = TableLimits()

    def __init__(self, publish: Callable[[list[Peer]], None]) -> None:
        self._publish = publish
        self._routes: dict[object, Route] = {}
        self._lock = threading.Lock()

    def observe(self) -> Observation:
        with self._lock:
            return Observation.of(self._routes.values())

    def apply(self, plan: Plan, deadline: float | None = None) -> list[Outcome]:
        with self._lock:
            for change in plan:
                assert isinstance(change.entry, Route)
                if change.action is Action.DELETE:
                    self._routes.pop(change.key, None)
                else:
                    self._routes[change.key] = change.entry
            peers = [
                Peer(r.destination, IPv4Address(r.next_hop))
                for r in self._routes.values()
                if r.destination.version == 4
            ]
        self._publish(peers)
        return [Outcome(change, present=change.entry) for change in plan]


class UdpBackend:
    """The udp backend; see the module doc."""

    # flanneld's udp leases carry no BackendType at all.
    accepts = frozenset({""})

    def __init__(self, ctx: BackendContext) -> None:
        iface = ctx.iface
        if iface is None or ctx.controller:
            raise ConfigError(
                "udp peers are reached through each node's own TUN device; "
                "`cloudroutes controller` serves the cloud backends only"
            )
        config = ctx.config
        if config.enable_ipv6 or not config.enable_ipv4 or config.network is None:
            raise ConfigError(
                "udp backend: only IPv4 networks are supported; remove EnableIPv6 from the "
                "network config or use host-gw"
            )
        if iface.ip is None:
            raise ConfigError(
                f"udp backend: interface {iface.name} has no IPv4 address to send from; "
                "choose another with --iface"
            )
        self.port = parse_port(config.backend.get("Port"))
        if iface.mtu - ENCAP_OVERHEAD < MIN_MTU:
            raise ConfigError(
                f"udp backend: interface {iface.name}'s MTU {iface.mtu} leaves less than "
                f"{MIN_MTU} for packets; choose another interface"
            )
        self._iface = iface
        self._config = config
        self._blackhole = ctx.blackhole_own_subnet
        self._tun: int | None = None
        self._sock: socket.socket | None = None
        self._own: Lease | None = None
        self._forwarder: Forwarder | None = None
        self._peers: list[Peer] = []
        self._lock = threading.Lock()

    @property
    def mtu(self) -> int:
        return self._iface.mtu - ENCAP_OVERHEAD

    def prepare(self) -> LeaseAttrs:
        """Create the device and bind the socket, so a busy port fails before a lease is taken."""
        assert self._iface.ip is not None
        if self._sock is None:
            self._sock = bind_socket(self._iface.ip, self.port)
        if self._tun is None:
            self._tun = open_tun()
            try:
                set_link_mtu(DEVICE, self.mtu)
                accept_local(DEVICE)
            except (OSError, PyrouteError, ValueError) as exc:
                raise Transient(
                    f"udp backend: cannot set the MTU of {DEVICE}: {exc}; the agent needs "
                    "CAP_NET_ADMIN"
                ) from None
        return LeaseAttrs(public_ip=self._iface.public_ip or self._iface.ip or NO_IPV4)

    def bind(self, own: Lease) -> Sequence[RouteTableBinding]:
        assert own.subnet is not None
        try:
            with IPRoute() as ipr:
                (index,) = ipr.link_lookup(ifname=DEVICE)
            address = IPv4Interface(f"{own.subnet.network_address}/32")
            configure_device(index, address, self._config.network)
        except (OSError, PyrouteError, ValueError) as exc:
            raise Transient(f"cannot set up {DEVICE}: {exc}") from None
        return self.bindings(own)

    def bindings(self, own: Lease) -> list[RouteTableBinding]:
        """The kernel's routes (the Network into the device) and the forwarder's peers."""
        self._own = own
        return [
            RouteTableBinding(KernelRouteTable(name="kernel"), self.kernel_routes),
            RouteTableBinding(PeerTable(self.set_peers), self.peer),
        ]

    def set_peers(self, peers: list[Peer]) -> None:
        with self._lock:
            self._peers = peers
            if self._forwarder is not None:
                self._forwarder.set_peers(peers)

    def kernel_routes(self, lease: Lease) -> Iterator[Route]:
        """The whole Network into the device, for our own lease; nothing for a peer's."""
        own = self._own
        if own is None or lease.key != own.key:
            return
        assert self._config.network is not None
        yield Route(self._config.network, "", device=DEVICE, lease_key=own.key)
        if self._blackhole:
            yield from blackhole_routes(own)

    def peer(self, lease: Lease) -> Iterator[Route]:
        own = self._own
        if own is not None and lease.key == own.key:
            return
        if lease.subnet is None or lease.public_ip == NO_IPV4:
            return
        yield Route(lease.subnet, str(lease.public_ip), device=DEVICE, lease_key=lease.key)

    def tasks(self) -> list[tuple[str, Callable[[threading.Event], None]]]:
        return [("udp-forwarder", self.forward)]

    def forward(self, stop: threading.Event) -> None:
        """Run the forwarder's workers until ``stop``, restarting one that dies."""
        own = self._own
        assert self._tun is not None and self._sock is not None
        assert own is not None and own.subnet is not None
        forwarder = Forwarder(self._tun, self._sock, self.port, own.subnet.network_address)
        with self._lock:
            forwarder.set_peers(self._peers)
            forwarder.start()
            self._forwarder = forwarder
        try:
            while not stop.wait(_WATCH_PERIOD):
                for restarted in forwarder.check():
                    log.error("udp forwarder: worker %s; restarted it", restarted)
        finally:
            with self._lock:
                self._forwarder = None
            forwarder.stop()

"""The kernel route table over rtnetlink, shared by the kernel backends (host-gw, vxlan, udp).

Ownership: every route cloudroutes writes carries the rt protocol ``RTPROT_CLOUDROUTES`` (157).
``observe()`` reports only routes with that protocol, and deletes name it, so the kernel itself
refuses to delete a route of anyone else (an operator's ``proto static``/``boot`` route, the
kernel's connected routes, bird, zebra, kube-router). 157 is unassigned in the kernel headers
and in iproute2's rt_protos, and is not used by kube-router (0x11), zebra (11), bird (12),
keepalived (18), babel (42), Calico (80) or openr (99). Operators may add
``157 cloudroutes`` to /etc/iproute2/rt_protos.d/ so that ``ip route`` prints the name.

Speed: a plan is packed into RTM_NEWROUTE/RTM_DELROUTE messages, many per ``send()``, each with
NLM_F_ACK; acknowledgements are matched back to changes by sequence number. Dumps ask the kernel
to filter by protocol and table (NETLINK_GET_STRICT_CHK) and are parsed by a small decoder that
reads only the attributes a route needs, because pyroute2's full parse is slow at 10,000 routes.

Namespaces: with ``netns`` set, sockets are opened by a short-lived thread that has joined that
namespace; a socket stays in the namespace it was created in, so the calling process does not
move.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import NamedTuple, TypeVar

from cloudroutes.errors import (
    Rejected,
    RouteConflict,
    RouteError,
    RouteNotFound,
    Transient,
)
from cloudroutes.routes import Action, Change, Destination, Outcome, Plan, Route

log = logging.getLogger(__name__)

RTPROT_CLOUDROUTES = 157
RT_TABLE_MAIN = 254

# --- netlink and rtnetlink constants (linux/netlink.h, linux/rtnetlink.h) -----------------------

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
SO_RCVBUFFORCE = 33
CLONE_NEWNET = 0x40000000

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_VIA = 18
IFLA_IFNAME = 3
NLA_TYPE_MASK = 0x3FFF

RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
RTNH_F_ONLINK = 4
RTM_F_CLONED = 0x200

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")
_U32_ATTR = struct.Struct("=HHI")
_ERR = struct.Struct("=i")
_U32 = struct.Struct("=I")
_ZERO4 = bytes(4)
_ZERO16 = bytes(16)

# Route types other than unicast, named as ``ip route`` prints them; such a route of ours (made
# by hand) is reported with the type as its next hop, so it never matches and gets replaced.
_RTN_NAMES = {2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
              7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}  # fmt: skip
_PROTO_NAMES = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated",
                9: "ra", 11: "zebra", 12: "bird", 16: "dhcp", 17: "kube-router",
                18: "keepalived", 42: "babel", 80: "calico", 99: "openr", 186: "bgp",
                187: "isis", 188: "ospf", 189: "rip"}  # fmt: skip

# Messages per send(): large enough to amortise the syscall, small enough that the ACKs of one
# batch fit the receive buffer with room to spare.
BATCH = 256
_RCVBUF = 8 << 20
_RECV = 1 << 16
_TIMEOUT = 10.0
_DUMP_ATTEMPTS = 3
_WATCH_POLL_MS = 200
_WATCH_RETRY = 1.0

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class NetlinkError(OSError):
    """The kernel refused one request; ``extack`` is its own explanation, when it gave one."""

    def __init__(self, code: int, extack: str = "") -> None:
        super().__init__(code, extack or os.strerror(code))
        self.extack = extack


def netns_path(netns: str) -> str:
    """A namespace name under /var/run/netns, or a path (as CNI_NETNS gives)."""
    return netns if "/" in netns else f"/var/run/netns/{netns}"


def in_netns(netns: str | None, make: Callable[[], T]) -> T:
    """Run ``make`` in namespace ``netns`` (None: here) and return its result.

    setns() moves only the calling thread, so a throwaway thread joins the namespace and the
    rest of the process stays where it is; sockets it opens stay in that namespace for good.
    """
    if netns is None:
        return make()
    box: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns {netns}: {os.strerror(code)}")
            finally:
                os.close(fd)
            box["value"] = make()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _attr(kind: int, value: bytes) -> bytes:
    return _RTATTR.pack(4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def _u32(kind: int, value: int) -> bytes:
    return _U32_ATTR.pack(8, kind, value)


def _attrs(buf: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, value start, value end) of each attribute in buf[start:end]."""
    while start + 4 <= end:
        length, kind = _RTATTR.unpack_from(buf, start)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += (length + 3) & ~3


def _messages(buf: bytes | memoryview, size: int) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(type, flags, seq, pid, payload start, end) of each netlink message in buf[:size]."""
    offset = 0
    while offset + 16 <= size:
        length, kind, flags, seq, pid = _NLMSGHDR.unpack_from(buf, offset)
        if length < 16:
            return
        yield kind, flags, seq, pid, offset + 16, offset + length
        offset += (length + 3) & ~3


def parse_ack(buf: memoryview, flags: int, start: int, end: int) -> NetlinkError | None:
    """The result of an NLMSG_ERROR payload: None for an ACK, else the error with its extack."""
    (code,) = _ERR.unpack_from(buf, start)
    if code == 0:
        return None
    extack = ""
    if flags & NLM_F_ACK_TLVS:
        # With NETLINK_CAP_ACK the echoed request is only its header; the TLVs follow it.
        (echoed,) = struct.unpack_from("=I", buf, start + 4)
        tlvs = start + 4 + (16 if flags & NLM_F_CAPPED else echoed)
        for kind, lo, hi in _attrs(buf, (tlvs + 3) & ~3, end):
            if kind == NLMSGERR_ATTR_MSG:
                extack = bytes(buf[lo:hi]).rstrip(b"\0").decode(errors="replace")
    return NetlinkError(-code, extack)


class Netlink:
    """One NETLINK_ROUTE socket: batched requests matched to ACKs by sequence number, and dumps.

    Not thread-safe: the owner serialises calls.
    """

    def __init__(self, netns: str | None = None, groups: int = 0) -> None:
        self.sock: socket.socket = in_netns(netns, lambda: self._open(groups))
        self.port: int = self.sock.getsockname()[0]
        if not groups:
            # A request socket never waits forever; an event socket is polled instead.
            self.sock.settimeout(_TIMEOUT)
        self._seq = 0
        self._buf = bytearray(_RECV)
        self._view = memoryview(self._buf)

    @staticmethod
    def _open(groups: int) -> socket.socket:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
                with contextlib.suppress(OSError):  # older kernels: plain ACKs, no filters
                    sock.setsockopt(SOL_NETLINK, option, 1)
            sock.bind((0, groups))
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        self.sock.close()

    def _next_seqs(self, count: int) -> int:
        first = self._seq + 1
        if first + count >= 1 << 32:
            first = 1
        self._seq = first + count - 1
        return first

    def _recv(self) -> int:
        try:
            return self.sock.recv_into(self._buf)
        except TimeoutError:
            raise Transient(f"netlink: no answer from the kernel in {_TIMEOUT:.0f} s") from None

    def transact(
        self, requests: Sequence[tuple[int, int, bytes]], batch: int = BATCH
    ) -> list[NetlinkError | None]:
        """Send (type, flags, payload) requests with NLM_F_ACK, ``batch`` per send().

        Returns one result per request, in order: None when the kernel acknowledged it.
        """
        results: list[NetlinkError | None] = [None] * len(requests)
        first = self._next_seqs(len(requests))
        header = _NLMSGHDR.pack
        for lo in range(0, len(requests), batch):
            chunk = requests[lo : lo + batch]
            seq0 = first + lo
            self.sock.sendall(
                b"".join(
                    header(16 + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq0 + i, 0)
                    + body
                    for i, (kind, flags, body) in enumerate(chunk)
                )
            )
            waiting = len(chunk)
            while waiting:
                size = self._recv()
                for kind, flags, seq, _pid, start, end in _messages(self._view, size):
                    index = seq - first
                    if kind != NLMSG_ERROR or not lo <= index < lo + len(chunk):
                        continue  # an answer left over from an earlier, aborted call
                    results[index] = parse_ack(self._view, flags, start, end)
                    waiting -= 1
        return results

    def dump(self, kind: int, body: bytes) -> list[tuple[int, bytes]]:
        """(type, payload) of every message of a dump, retried when a change interrupted it;
        if changes keep interrupting, the last dump (the next resync reads again)."""
        for _ in range(_DUMP_ATTEMPTS):
            messages, interrupted = self._dump_once(kind, body)
            if not interrupted:
                return messages
        return messages

    def _dump_once(self, kind: int, body: bytes) -> tuple[list[tuple[int, bytes]], bool]:
        seq = self._next_seqs(1)
        header = _NLMSGHDR.pack(16 + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        self.sock.sendall(header + body)
        out: list[tuple[int, bytes]] = []
        interrupted = False
        while True:
            size = self._recv()
            data = self._view[:size]
            for mtype, flags, mseq, _pid, start, end in _messages(data, size):
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return out, interrupted
                if mtype == NLMSG_ERROR:
                    error = parse_ack(data, flags, start, end)
                    if error is not None:
                        raise error
                    return out, interrupted
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                out.append((mtype, bytes(data[start:end])))

    def request(self, kind: int, body: bytes) -> list[tuple[int, bytes]]:
        """One request (not a dump): the messages it answers with; raises NetlinkError."""
        seq = self._next_seqs(1)
        self.sock.sendall(
            _NLMSGHDR.pack(16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body
        )
        out: list[tuple[int, bytes]] = []
        while True:
            size = self._recv()
            for mtype, flags, mseq, _pid, start, end in _messages(self._view, size):
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    error = parse_ack(self._view, flags, start, end)
                    if error is not None:
                        raise error
                    return out
                out.append((mtype, bytes(self._view[start:end])))


# --- links ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    flags: int


def _parse_link(payload: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload, 0)
    name = ""
    for kind, lo, hi in _attrs(payload, _IFINFOMSG.size, len(payload)):
        if kind == IFLA_IFNAME:
            name = payload[lo:hi].rstrip(b"\0").decode()
    return Link(index, name, flags)


def get_link(nl: Netlink, *, name: str | None = None, index: int = 0) -> Link | None:
    """The link by name or index; None when there is no such link."""
    body = _IFINFOMSG.pack(0, 0, index, 0, 0)
    if name is not None:
        body += _attr(IFLA_IFNAME, name.encode() + b"\0")
    try:
        answers = nl.request(RTM_GETLINK, body)
    except NetlinkError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    for kind, payload in answers:
        if kind == RTM_NEWLINK:
            return _parse_link(payload)
    return None


# --- routes --------------------------------------------------------------------------------------

# A destination as netlink spells it: the packed network address (4 or 16 bytes, so the family
# is implied) and the prefix length. Cheaper to make and compare than IPv4Network.
DestKey = tuple[bytes, int]


def dest_key(destination: Destination) -> DestKey:
    return destination.network_address.packed, destination.prefixlen


def key_destination(key: DestKey) -> Destination:
    address, prefixlen = key
    if len(address) == 4:
        return IPv4Network((int.from_bytes(address, "big"), prefixlen))
    return IPv6Network((int.from_bytes(address, "big"), prefixlen))


class KernelRoute(NamedTuple):
    """A route as the kernel reports it, of any protocol; the owned ones become Routes."""

    key: DestKey
    gateway: str
    oif: int
    onlink: bool
    protocol: int
    rtype: int
    table: int

    def describe(self, device: str | None) -> str:
        parts = [str(key_destination(self.key))]
        if self.rtype != RTN_UNICAST:
            parts.insert(0, _RTN_NAMES.get(self.rtype, f"type {self.rtype}"))
        if self.gateway:
            parts.append(f"via {self.gateway}")
        if device:
            parts.append(f"dev {device}")
        parts.append(f"proto {_PROTO_NAMES.get(self.protocol, self.protocol)}")
        return " ".join(parts)


def _address_text(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw)
    # Python's spelling, which is what backends produce with str(IPv6Address).
    return str(IPv6Address(raw))


@functools.cache
def _route_layout(width: int, gateway: bool, oif: bool) -> struct.Struct:
    """rtmsg, RTA_TABLE, RTA_DST, then RTA_GATEWAY and RTA_OIF when present, packed in one go."""
    fmt = f"=BBBBBBBBI HHI HH{width}s"
    if gateway:
        fmt += f" HH{width}s"
    if oif:
        fmt += " HHI"
    return struct.Struct(fmt)


# rtmsg, RTA_TABLE, RTA_DST, RTA_GATEWAY, RTA_OIF: how the kernel reports an IPv4 gateway route.
_V4_GATEWAY_ROUTE = _route_layout(4, gateway=True, oif=True)
_V4_GATEWAY_ATTRS = (8, RTA_TABLE, 8, RTA_DST, 8, RTA_GATEWAY, 8, RTA_OIF)


def parse_route(payload: bytes) -> KernelRoute | None:
    """An RTM_NEWROUTE/RTM_DELROUTE payload; None for cache entries and other families."""
    if len(payload) == _V4_GATEWAY_ROUTE.size:
        # The shape of nearly every route in a big table; one unpack instead of an attribute walk.
        fields = _V4_GATEWAY_ROUTE.unpack(payload)
        family, dst_len, _src, _tos, _table, protocol, _scope, rtype, flags = fields[:9]
        l1, t1, table, l2, t2, dst, l3, t3, gw, l4, t4, oif = fields[9:]
        if (
            family == socket.AF_INET
            and (l1, t1, l2, t2, l3, t3, l4, t4) == _V4_GATEWAY_ATTRS
            and not flags & RTM_F_CLONED
        ):
            gateway = socket.inet_ntop(socket.AF_INET, gw)
            return KernelRoute(
                (dst, dst_len), gateway, oif, bool(flags & RTNH_F_ONLINK), protocol, rtype, table
            )
    family, dst_len, _src, _tos, table, protocol, _scope, rtype, flags = _RTMSG.unpack_from(
        payload, 0
    )
    if flags & RTM_F_CLONED or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    dst = _ZERO4 if family == socket.AF_INET else _ZERO16
    gateway = ""
    oif = 0
    for kind, lo, hi in _attrs(payload, _RTMSG.size, len(payload)):
        if kind == RTA_DST:
            dst = payload[lo:hi]
        elif kind == RTA_GATEWAY:
            gateway = _address_text(family, payload[lo:hi])
        elif kind == RTA_OIF:
            (oif,) = _U32.unpack_from(payload, lo)
        elif kind == RTA_TABLE:
            (table,) = _U32.unpack_from(payload, lo)
        elif kind == RTA_VIA:
            (via_family,) = struct.unpack_from("=H", payload, lo)
            gateway = _address_text(via_family, payload[lo + 2 : hi])
        elif kind == RTA_MULTIPATH:
            # Never written by us; a joined list never equals a desired route, so the
            # reconciler replaces it with a single path.
            gateway = ",".join(_multipath_gateways(family, payload, lo, hi))
    return KernelRoute(
        (dst, dst_len), gateway, oif, bool(flags & RTNH_F_ONLINK), protocol, rtype, table
    )


def _multipath_gateways(family: int, payload: bytes, lo: int, hi: int) -> Iterator[str]:
    # struct rtnexthop: len u16, flags u8, hops u8, ifindex i32, then attributes.
    while lo + 8 <= hi:
        (length,) = struct.unpack_from("=H", payload, lo)
        if length < 8:
            return
        for kind, alo, ahi in _attrs(payload, lo + 8, lo + length):
            if kind == RTA_GATEWAY:
                yield _address_text(family, payload[alo:ahi])
        lo += (length + 3) & ~3


def route_message(
    key: DestKey,
    *,
    protocol: int,
    table: int,
    scope: int,
    rtype: int,
    flags: int = 0,
    gateway: bytes | None = None,
    oif: int = 0,
) -> bytes:
    """The payload of an RTM_NEWROUTE or RTM_DELROUTE."""
    address, prefixlen = key
    width = len(address)
    family = socket.AF_INET if width == 4 else socket.AF_INET6
    # rtm_table holds only 8 bits; RTA_TABLE carries the real id.
    values: list[object] = [family, prefixlen, 0, 0, 0, protocol, scope, rtype, flags]
    values += [8, RTA_TABLE, table, 4 + width, RTA_DST, address]
    if gateway is not None:
        values += [4 + width, RTA_GATEWAY, gateway]
    if oif:
        values += [8, RTA_OIF, oif]
    return _route_layout(width, gateway is not None, bool(oif)).pack(*values)


def _packed_gateway(next_hop: str, width: int) -> bytes | str | None:
    """The gateway's bytes, None for a device route, or why the next hop is unusable."""
    if not next_hop:
        return None
    family = socket.AF_INET if width == 4 else socket.AF_INET6
    try:
        return socket.inet_pton(family, next_hop)
    except OSError:
        try:
            ip_address(next_hop)
        except ValueError:
            return f"next hop {next_hop!r} is not an IP address"
        return f"next hop {next_hop} is not an IPv{4 if width == 4 else 6} address"


# --- the route table -----------------------------------------------------------------------------


class _Pending(NamedTuple):
    """A change ready to send, or the outcome it already has."""

    change: Change
    request: tuple[int, int, bytes] | None = None
    error: RouteError | None = None


class KernelRouteTable:
    """Routes in one kernel table, owned through an rt protocol number (see the module doc).

    Keep one object per namespace, protocol and table: two would each see the other's routes
    as their own and delete them. A backend with several kinds of routes (vxlan with
    DirectRouting) puts them all in one table.

    ``offlink_hint`` finishes the message of a route refused because its next hop is not on-link
    (host-gw says: put every node in one L2 segment, or use vxlan).
    """

    resync_period: float = 10.0

    def __init__(
        self,
        *,
        netns: str | None = None,
        protocol: int = RTPROT_CLOUDROUTES,
        table: int = RT_TABLE_MAIN,
        name: str = "kernel",
        offlink_hint: str = "",
        resync_period: float = 10.0,
        batch: int = BATCH,
    ) -> None:
        if not 0 < protocol < 256:
            raise ValueError(f"rt protocol must be 1..255, not {protocol}")
        self.netns = netns
        self.protocol = protocol
        self.table = table
        self.name = name
        self.offlink_hint = offlink_hint
        self.resync_period = resync_period
        self.batch = batch
        self._lock = threading.Lock()
        self._nl: Netlink | None = None
        # Shared with watch_drift's thread; each is replaced whole, never changed in place.
        self._own_port: int | None = None
        # Destinations we hold or want: a foreign route event there is drift too. Observe also
        # reuses the Destination objects, which are slow to build.
        self._known: dict[DestKey, Destination] = {}
        self._devices: frozenset[str] = frozenset()
        self._indexes: frozenset[int] = frozenset()

    # --- plumbing -------------------------------------------------------------------------------

    def _netlink(self) -> Netlink:
        if self._nl is None:
            try:
                self._nl = Netlink(self.netns)
            except FileNotFoundError:
                raise Transient(f"network namespace {self.netns} does not exist") from None
            except OSError as exc:
                raise Transient(f"cannot open a netlink socket: {exc.strerror}") from None
            self._own_port = self._nl.port
        return self._nl

    def _reset(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def close(self) -> None:
        with self._lock:
            self._reset()

    def _call(self, work: Callable[[Netlink], T]) -> T:
        """Run ``work`` on the socket; a broken socket becomes Transient and is reopened later."""
        with self._lock:
            nl = self._netlink()
            try:
                return work(nl)
            except Transient:
                self._reset()
                raise
            except RouteError:
                raise
            except NetlinkError as exc:
                raise Transient(f"netlink: {exc.strerror}") from None
            except OSError as exc:
                self._reset()
                raise Transient(f"netlink: {exc.strerror or exc}") from None

    # --- observe --------------------------------------------------------------------------------

    def _kernel_routes(self, nl: Netlink, *, owned_only: bool = True) -> list[KernelRoute]:
        """Routes of our table in both families; only ours unless ``owned_only`` is false."""
        out: list[KernelRoute] = []
        protocol = self.protocol if owned_only else 0
        for family in (socket.AF_INET, socket.AF_INET6):
            # The kernel filters on protocol and table (strict checking); we filter again for
            # kernels that ignore the filter.
            body = _RTMSG.pack(family, 0, 0, 0, 0, protocol, 0, 0, 0)
            try:
                messages = nl.dump(RTM_GETROUTE, body + _U32_ATTR.pack(8, RTA_TABLE, self.table))
            except NetlinkError as exc:
                if exc.errno == errno.ENOENT:  # the table does not exist yet: nothing in it
                    continue
                if exc.errno == errno.EAFNOSUPPORT and family == socket.AF_INET6:
                    continue  # IPv6 is disabled on this host
                raise
            for kind, payload in messages:
                if kind != RTM_NEWROUTE:
                    continue
                route = parse_route(payload)
                if route is None or route.table != self.table:
                    continue
                if owned_only and route.protocol != self.protocol:
                    continue
                out.append(route)
        return out

    def observe(self) -> set[Route]:
        def read(nl: Netlink) -> tuple[list[KernelRoute], dict[int, str]]:
            found = self._kernel_routes(nl)
            names: dict[int, str] = {}
            for index in {r.oif for r in found if r.oif}:
                link = get_link(nl, index=index)
                if link is not None:
                    names[index] = link.name
            return found, names

        found, names = self._call(read)
        known = self._known
        fresh: dict[DestKey, Destination] = {}
        routes: set[Route] = set()
        for r in found:
            destination = known.get(r.key)
            if destination is None:
                destination = key_destination(r.key)
            fresh[r.key] = destination
            next_hop = r.gateway if r.rtype == RTN_UNICAST else _RTN_NAMES.get(r.rtype, "?")
            routes.add(Route(destination, next_hop, names.get(r.oif), r.onlink))
        self._known = fresh
        self._watch_devices(names.values(), names.keys())
        return routes

    def _watch_devices(self, names: Iterable[str], indexes: Iterable[int]) -> None:
        self._devices = self._devices | set(names)
        self._indexes = self._indexes | set(indexes)

    # --- apply ----------------------------------------------------------------------------------

    def apply(self, plan: Plan) -> list[Outcome]:
        changes = list(plan)
        if not changes:
            return []
        known = dict(self._known)
        for change in changes:
            if change.action is not Action.DELETE:
                destination = change.route.destination
                known.setdefault(dest_key(destination), destination)
        self._known = known
        return self._call(lambda nl: self._apply(nl, changes))

    def _apply(self, nl: Netlink, changes: list[Change]) -> list[Outcome]:
        devices = self._resolve_devices(nl, changes)
        pending = [self._encode(c, devices) for c in changes]
        sendable = [p for p in pending if p.request is not None]
        results = nl.transact([p.request for p in sendable], self.batch)  # type: ignore[misc]
        errors: dict[int, RouteError | None] = {id(p.change): p.error for p in pending}
        existing: list[_Pending] = []
        for item, result in zip(sendable, results, strict=True):
            if result is not None and result.errno == errno.EEXIST:
                existing.append(item)
            else:
                errors[id(item.change)] = self._classify(item.change, result)
        if existing:
            errors.update(self._resolve_existing(nl, existing))
        return [Outcome(c, errors[id(c)]) for c in changes]

    def _resolve_devices(self, nl: Netlink, changes: list[Change]) -> dict[str, int | None]:
        names = {
            c.route.device for c in changes if c.route.device and c.action is not Action.DELETE
        }
        devices: dict[str, int | None] = {}
        for name in names:
            link = get_link(nl, name=name)
            devices[name] = link.index if link is not None else None
        self._watch_devices(names, (i for i in devices.values() if i))
        return devices

    def _encode(self, change: Change, devices: dict[str, int | None]) -> _Pending:
        route = change.route
        key = dest_key(route.destination)
        gateway = _packed_gateway(route.next_hop, len(key[0]))
        if change.action is Action.DELETE:
            # Naming our protocol makes the kernel match only our route at that destination.
            body = route_message(
                key,
                protocol=self.protocol,
                table=self.table,
                scope=RT_SCOPE_NOWHERE,
                rtype=0,
                gateway=gateway if isinstance(gateway, bytes) else None,
            )
            return _Pending(change, (RTM_DELROUTE, 0, body))
        if isinstance(gateway, str):
            return _Pending(change, error=Rejected(f"{route}: {gateway}"))
        oif = 0
        if route.device:
            index = devices.get(route.device)
            if index is None:
                # A device that a backend is (re)creating comes back; retry rather than fail.
                return _Pending(
                    change, error=Transient(f"{route}: device {route.device} does not exist")
                )
            oif = index
        elif gateway is None:
            return _Pending(
                change, error=Rejected(f"{route}: a route needs a next hop or a device")
            )
        body = route_message(
            key,
            protocol=self.protocol,
            table=self.table,
            scope=RT_SCOPE_LINK if gateway is None else RT_SCOPE_UNIVERSE,
            rtype=RTN_UNICAST,
            flags=RTNH_F_ONLINK if route.onlink else 0,
            gateway=gateway,
            oif=oif,
        )
        if change.action is Action.ADD:
            return _Pending(change, (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body))
        # REPLACE is planned only over a route of ours; CREATE also covers one that vanished
        # since it was observed.
        return _Pending(change, (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body))

    def _classify(self, change: Change, error: NetlinkError | None) -> RouteError | None:
        if error is None:
            return None
        route = change.route
        code = error.errno
        detail = error.extack or os.strerror(code)
        if code in (errno.ESRCH, errno.ENOENT):
            return RouteNotFound(f"{route}: no such route of ours in the kernel")
        if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            text = f"{route.destination}: next hop {route.next_hop} is not on-link"
            if route.device:
                text += f" on {route.device}"
            if self.offlink_hint:
                text += f": {self.offlink_hint}"
            return Rejected(f"{text} (kernel: {detail})")
        if code in (errno.EPERM, errno.EACCES):
            return Rejected(f"{route}: {detail}; cloudroutes needs CAP_NET_ADMIN")
        if code == errno.ENODEV:
            return Transient(f"{route}: device {route.device} does not exist")
        if code in (errno.ENOBUFS, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ENOMEM):
            return Transient(f"{route}: {detail}")
        return Rejected(f"{change.action.value} {route}: {detail}")

    def _resolve_existing(self, nl: Netlink, items: list[_Pending]) -> dict[int, RouteError | None]:
        """ADDs refused with EEXIST: replace the ones where a route of ours stands (our picture
        was stale), and report the foreign ones as conflicts naming who holds the destination."""
        present: dict[DestKey, list[KernelRoute]] = {}
        for route in self._kernel_routes(nl, owned_only=False):
            present.setdefault(route.key, []).append(route)
        out: dict[int, RouteError | None] = {}
        ours: list[_Pending] = []
        for item in items:
            holders = present.get(dest_key(item.change.route.destination), [])
            foreign = [r for r in holders if r.protocol != self.protocol]
            if foreign:
                out[id(item.change)] = self._conflict(nl, item.change.route, foreign[0])
            elif holders:
                ours.append(item)
            else:
                out[id(item.change)] = Transient(
                    f"{item.change.route}: the kernel reported a route there that is gone now"
                )
        if ours:
            requests = [
                (kind, NLM_F_CREATE | NLM_F_REPLACE, body)
                for kind, _flags, body in (i.request for i in ours)  # type: ignore[misc]
            ]
            for item, result in zip(ours, nl.transact(requests, self.batch), strict=True):
                out[id(item.change)] = self._classify(item.change, result)
        return out

    def _conflict(self, nl: Netlink, route: Route, holder: KernelRoute) -> RouteConflict:
        link = get_link(nl, index=holder.oif) if holder.oif else None
        family = "-6 " if route.destination.version == 6 else ""
        table = "" if self.table == RT_TABLE_MAIN else f" table {self.table}"
        return RouteConflict(
            f"{route.destination} is held by a route cloudroutes does not own "
            f"({holder.describe(link.name if link else None)}); if this subnet belongs to the "
            f"pod network, delete it: ip {family}route del {route.destination}{table}"
        )

    # --- drift ----------------------------------------------------------------------------------

    def watch_drift(self, notify: Callable[[], None], stop: threading.Event) -> None:
        """Call ``notify`` when someone else changes or deletes one of our routes, puts a route
        at a destination we use, or changes a device we route through (up/down, addresses).

        Blocks until ``stop`` is set, and returns within about 0.2 s of it.
        """
        groups = (
            RTMGRP_LINK
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_ROUTE
        )
        while not stop.is_set():
            try:
                nl = Netlink(self.netns, groups)
            except OSError as exc:
                log.warning("%s: cannot watch for drift: %s", self.name, exc)
                stop.wait(_WATCH_RETRY)
                continue
            link_states: dict[int, int] = {}
            try:
                poller = select.poll()
                poller.register(nl.sock, select.POLLIN)
                while not stop.is_set():
                    if poller.poll(_WATCH_POLL_MS) and self._drained_drift(nl, link_states):
                        notify()
            except OSError as exc:
                # Events may have been missed: have the table read again, then watch anew.
                log.warning("%s: drift watch failed, restarting it: %s", self.name, exc)
                notify()
                stop.wait(_WATCH_RETRY)
            finally:
                nl.close()

    def _drained_drift(self, nl: Netlink, link_states: dict[int, int]) -> bool:
        """Read every queued event; True when any of them is drift."""
        drift = False
        while True:
            try:
                data = nl.sock.recv(_RECV, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return drift
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                drift = True  # events were lost: assume the worst
                continue
            for kind, _flags, _seq, pid, start, end in _messages(data, len(data)):
                drift |= self._is_drift(kind, pid, data[start:end], link_states)

    def _is_drift(self, kind: int, pid: int, payload: bytes, link_states: dict[int, int]) -> bool:
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            if pid == self._own_port:
                return False  # our own write
            route = parse_route(payload)
            if route is None or route.table != self.table:
                return False
            return route.protocol == self.protocol or route.key in self._known
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            link = _parse_link(payload)
            if link.name not in self._devices and link.index not in self._indexes:
                return False
            state = link.flags & (IFF_UP | IFF_LOWER_UP) if kind == RTM_NEWLINK else -1
            before = link_states.get(link.index)
            link_states[link.index] = state
            return before != state
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            # Removing an address drops the IPv4 routes through it without any route event;
            # adding one may make a refused next hop reachable.
            (index,) = _U32.unpack_from(payload, 4)
            return index in self._indexes
        return False

"""rtnetlink for the kernel route tables: a socket that batches requests, and a lean codec.

Speed: many messages go in one ``send()``, each with NLM_F_ACK, and acknowledgements are
matched back by sequence number. Dumps ask the kernel to filter (NETLINK_GET_STRICT_CHK) and
are parsed by a small decoder that reads only the attributes a route needs, because pyroute2's
full parse is slow at 10,000 routes.

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
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import NamedTuple, TypeVar

from cloudroutes.errors import (
    Transient,
)
from cloudroutes.routes import Destination

log = logging.getLogger(__name__)

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
RTMSG = struct.Struct("=BBBBBBBBI")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")
U32_ATTR = struct.Struct("=HHI")
_ERR = struct.Struct("=i")
U32 = struct.Struct("=I")
_ZERO4 = bytes(4)
_ZERO16 = bytes(16)

# Route types other than unicast, named as ``ip route`` prints them; such a route of ours (made
# by hand) is reported with the type as its next hop, so it never matches and gets replaced.
RTN_NAMES = {2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
              7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}  # fmt: skip
_PROTO_NAMES = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated",
                9: "ra", 11: "zebra", 12: "bird", 16: "dhcp", 17: "kube-router",
                18: "keepalived", 42: "babel", 80: "calico", 99: "openr", 186: "bgp",
                187: "isis", 188: "ospf", 189: "rip"}  # fmt: skip

# Messages per send(): large enough to amortise the syscall, small enough that the ACKs of one
# batch fit the receive buffer with room to spare.
BATCH = 256
_RCVBUF = 8 << 20
RECV_SIZE = 1 << 16
_TIMEOUT = 10.0
_DUMP_ATTEMPTS = 3

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
    return U32_ATTR.pack(8, kind, value)


def attributes(buf: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, value start, value end) of each attribute in buf[start:end]."""
    while start + 4 <= end:
        length, kind = _RTATTR.unpack_from(buf, start)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += (length + 3) & ~3


def messages(buf: bytes | memoryview, size: int) -> Iterator[tuple[int, int, int, int, int, int]]:
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
        for kind, lo, hi in attributes(buf, (tlvs + 3) & ~3, end):
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
        self._buf = bytearray(RECV_SIZE)
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
                for kind, flags, seq, _pid, start, end in messages(self._view, size):
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
            for mtype, flags, mseq, _pid, start, end in messages(data, size):
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
            for mtype, flags, mseq, _pid, start, end in messages(self._view, size):
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


def parse_link(payload: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload, 0)
    name = ""
    for kind, lo, hi in attributes(payload, _IFINFOMSG.size, len(payload)):
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
            return parse_link(payload)
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
            parts.insert(0, RTN_NAMES.get(self.rtype, f"type {self.rtype}"))
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
    family, dst_len, _src, _tos, table, protocol, _scope, rtype, flags = RTMSG.unpack_from(
        payload, 0
    )
    if flags & RTM_F_CLONED or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    dst = _ZERO4 if family == socket.AF_INET else _ZERO16
    gateway = ""
    oif = 0
    for kind, lo, hi in attributes(payload, RTMSG.size, len(payload)):
        if kind == RTA_DST:
            dst = payload[lo:hi]
        elif kind == RTA_GATEWAY:
            gateway = _address_text(family, payload[lo:hi])
        elif kind == RTA_OIF:
            (oif,) = U32.unpack_from(payload, lo)
        elif kind == RTA_TABLE:
            (table,) = U32.unpack_from(payload, lo)
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
        for kind, alo, ahi in attributes(payload, lo + 8, lo + length):
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


def packed_gateway(next_hop: str, width: int) -> bytes | str | None:
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

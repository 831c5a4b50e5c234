"""The udp backend's data path: bare IPv4 packets between the TUN device and a UDP socket,
as flanneld's udp backend sends them (flannel.md §3), so the two interoperate.

Python touches every packet here, so the loops are built for throughput:

- two worker processes, one per direction (TUN -> UDP and UDP -> TUN): separate processes,
  not threads, so the two directions and the agent's own threads never share one GIL;
- each loop is one blocking read and one send per packet, into one preallocated buffer,
  with no poll() per packet and no per-packet allocation besides a memoryview slice;
- the TTL's checksum fix is a table lookup: decrementing the TTL changes the header's
  checksum by an amount that depends only on the old checksum (RFC 1624, eqn. 3);
- the peer lookup is a dict keyed by the destination masked to the lease length: one mask
  and one dict probe per packet, whatever the number of leases.

The agent sends the TUN -> UDP worker the peer table over a pipe whenever it changes; a worker
exits when that pipe closes, so workers never outlive the agent.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import IO

log = logging.getLogger(__name__)

DEFAULT_PORT = 8285
IPPROTO_ICMP = 1
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
# flanneld's TTL for the ICMP errors it makes.
ICMP_ERROR_TTL = 8
IP_OFFSET_MASK = 0x1FFF
BUFFER_SIZE = 65536
_HEADER = struct.Struct("!BBHHHBBH4s4s")
_TABLE_HEADER = struct.Struct("!I")
_TABLE_ROW = struct.Struct("!IBI")

# --- packets -------------------------------------------------------------------------------------


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ttl_checksum(old: int) -> int:
    """The header checksum after the TTL drops by one (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m'),
    where m is the TTL/protocol word and m' = m - 0x100, so ~m + m' = 0xfeff for every m)."""
    total = (~old & 0xFFFF) + 0xFEFF
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# New checksum bytes by old checksum value: one lookup per forwarded packet.
TTL_CHECKSUM: tuple[bytes, ...] = tuple(_ttl_checksum(c).to_bytes(2, "big") for c in range(65536))


def decrement_ttl(packet: bytearray) -> bool:
    """Decrement the IPv4 TTL in place and fix the checksum; False when the packet must be
    dropped (its TTL would reach 0)."""
    ttl = packet[8]
    if ttl <= 1:
        return False
    packet[8] = ttl - 1
    packet[10:12] = TTL_CHECKSUM[(packet[10] << 8) | packet[11]]
    return True


def net_unreachable(packet: bytes | bytearray | memoryview, source: bytes) -> bytes | None:
    """The ICMP net-unreachable error for ``packet``, from ``source``, quoting its header and
    the first 8 bytes of its payload (RFC 792); None when no error may be sent: for an ICMP
    packet (flanneld's rule, which also keeps errors from answering errors), a fragment other
    than the first (RFC 1122), or something that is not a whole IPv4 header."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header_length = (packet[0] & 0x0F) * 4
    if header_length < 20 or len(packet) < header_length:
        return None
    if packet[9] == IPPROTO_ICMP:
        return None
    if ((packet[6] << 8) | packet[7]) & IP_OFFSET_MASK:
        return None
    quoted = bytes(packet[: header_length + 8])
    icmp = bytearray(struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_NET_UNREACH, 0, 0) + quoted)
    icmp[2:4] = checksum(icmp).to_bytes(2, "big")
    header = bytearray(
        _HEADER.pack(
            0x45, 0, 20 + len(icmp), 0, 0, ICMP_ERROR_TTL, IPPROTO_ICMP, 0, source,
            bytes(packet[12:16]),
        )
    )  # fmt: skip
    header[10:12] = checksum(header).to_bytes(2, "big")
    return bytes(header + icmp)


# --- the peer table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A leased subnet and the node that holds it."""

    subnet: IPv4Network
    public_ip: IPv4Address


Lookup = list[tuple[int, dict[int, tuple[str, int]]]]


def build_lookup(rows: Iterable[tuple[int, int, int]], port: int) -> Lookup:
    """(mask, {network: (peer address, port)}) per prefix length, longest first.

    All leases of a network share its SubnetLen, so this is one mask and one dict probe per
    packet; a hand-written lease of another length costs one more probe, not a scan.
    """
    by_length: dict[int, dict[int, tuple[str, int]]] = {}
    for network, length, peer in rows:
        address = (str(IPv4Address(peer)), port)
        by_length.setdefault(length, {})[network] = address
    return [
        ((0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF, by_length[length])
        for length in sorted(by_length, reverse=True)
    ]


def lookup(table: Lookup, destination: int) -> tuple[str, int] | None:
    for mask, peers in table:
        peer = peers.get(destination & mask)
        if peer is not None:
            return peer
    return None


def encode_table(peers: Iterable[Peer]) -> bytes:
    rows = [
        _TABLE_ROW.pack(int(p.subnet.network_address), p.subnet.prefixlen, int(p.public_ip))
        for p in peers
    ]
    return _TABLE_HEADER.pack(len(rows)) + b"".join(rows)


def read_table(stream: IO[bytes]) -> list[tuple[int, int, int]] | None:
    """One table from the agent's pipe; None at its end (the agent is gone)."""
    header = stream.read(_TABLE_HEADER.size)
    if len(header) < _TABLE_HEADER.size:
        return None
    (count,) = _TABLE_HEADER.unpack(header)
    body = stream.read(count * _TABLE_ROW.size)
    if len(body) < count * _TABLE_ROW.size:
        return None
    return [_TABLE_ROW.unpack_from(body, i * _TABLE_ROW.size) for i in range(count)]


# --- the loops (run in the worker processes) -----------------------------------------------------


class TunToUdp:
    """Packets the kernel routed into the TUN go to the peer that leases their destination."""

    def __init__(self, tun: int, sock: socket.socket, port: int, source: bytes) -> None:
        self.tun = tun
        self.sock = sock
        self.port = port
        self.source = source
        self.table: Lookup = []

    def follow(self, stream: IO[bytes]) -> None:
        """Take every table the agent sends; exit the process when it goes away."""
        while (rows := read_table(stream)) is not None:
            self.table = build_lookup(rows, self.port)
        os._exit(0)

    def run(self) -> None:
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        buffers = [buf]
        readv, write, sendto = os.readv, os.write, self.sock.sendto
        tun, fix = self.tun, TTL_CHECKSUM
        while True:
            n = readv(tun, buffers)
            if n < 20 or buf[0] & 0xF0 != 0x40:
                continue  # not IPv4 (the kernel's IPv6 chatter on the device)
            destination = (buf[16] << 24) | (buf[17] << 16) | (buf[18] << 8) | buf[19]
            peer = None
            for mask, peers in self.table:
                peer = peers.get(destination & mask)
                if peer is not None:
                    break
            if peer is None:
                error = net_unreachable(view[:n], self.source)
                if error is not None:
                    write(tun, error)
                continue
            ttl = buf[8]
            if ttl <= 1:
                continue
            buf[8] = ttl - 1
            buf[10:12] = fix[(buf[10] << 8) | buf[11]]
            try:  # noqa: SIM105 (suppress() costs a context manager per packet)
                sendto(view[:n], peer)
            except OSError:
                pass  # a full queue or an unreachable peer: dropped, as a router would


class UdpToTun:
    """Packets from peers go into the TUN, for the kernel to deliver or forward."""

    def __init__(self, tun: int, sock: socket.socket) -> None:
        self.tun = tun
        self.sock = sock

    @staticmethod
    def follow(stream: IO[bytes]) -> None:
        while read_table(stream) is not None:
            pass
        os._exit(0)

    def run(self) -> None:
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        recv_into, write = self.sock.recv_into, os.write
        tun, fix = self.tun, TTL_CHECKSUM
        while True:
            try:
                n = recv_into(buf)
            except OSError:
                continue  # an ICMP error for an earlier send, reported on this socket
            if n < 20 or buf[0] & 0xF0 != 0x40 or buf[8] <= 1:
                continue
            buf[8] -= 1
            buf[10:12] = fix[(buf[10] << 8) | buf[11]]
            try:  # noqa: SIM105 (suppress() costs a context manager per packet)
                write(tun, view[:n])
            except OSError:
                pass  # the kernel refused a malformed packet: peers' input is untrusted


def worker_main(argv: Sequence[str]) -> None:
    """``python -m providers.udp_forwarder DIRECTION TUN_FD SOCK_FD CTL_FD PORT SOURCE``."""
    direction, tun, sock_fd, ctl, port, source = argv
    # The agent's Ctrl-C reaches its whole process group; a worker stops when the agent does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(sock_fd))
    stream = os.fdopen(int(ctl), "rb")
    loop: TunToUdp | UdpToTun
    if direction == "tun-to-udp":
        loop = TunToUdp(int(tun), sock, int(port), socket.inet_aton(source))
    else:
        loop = UdpToTun(int(tun), sock)
    threading.Thread(target=loop.follow, args=(stream,), daemon=True).start()
    loop.run()


# --- the agent's side ----------------------------------------------------------------------------

DIRECTIONS = ("tun-to-udp", "udp-to-tun")


class Forwarder:
    """The two worker processes over one TUN fd and one UDP socket, and their peer table."""

    def __init__(self, tun: int, sock: socket.socket, port: int, source: IPv4Address) -> None:
        self.tun = tun
        self.sock = sock
        self.port = port
        self.source = source
        self._lock = threading.Lock()
        self._table = encode_table(())
        self._workers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}

    def set_peers(self, peers: Iterable[Peer]) -> None:
        with self._lock:
            self._table = encode_table(peers)
            for process, pipe in self._workers.values():
                if process.poll() is None:
                    _write_all(pipe, self._table)

    def start(self) -> None:
        with self._lock:
            for direction in DIRECTIONS:
                self._start(direction)

    def _start(self, direction: str) -> None:
        read_end, write_end = os.pipe()
        command = [
            sys.executable, "-m", "providers.udp_forwarder", direction, str(self.tun),
            str(self.sock.fileno()), str(read_end), str(self.port), str(self.source),
        ]  # fmt: skip
        try:
            process = subprocess.Popen(command, pass_fds=(self.tun, self.sock.fileno(), read_end))
        finally:
            os.close(read_end)
        self._workers[direction] = (process, write_end)
        _write_all(write_end, self._table)

    def check(self) -> list[str]:
        """Restart a worker that died; the directions restarted, for the log."""
        restarted = []
        with self._lock:
            for direction, (process, pipe) in list(self._workers.items()):
                if process.poll() is not None:
                    os.close(pipe)
                    self._start(direction)
                    restarted.append(f"{direction} (exit status {process.returncode})")
        return restarted

    def stop(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, {}
        for _process, pipe in workers.values():
            os.close(pipe)  # the worker exits when it sees the pipe close
        for process, _pipe in workers.values():
            try:
                process.wait(2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        pass  # the worker died; check() restarts it with the current table


if __name__ == "__main__":
    worker_main(sys.argv[1:])

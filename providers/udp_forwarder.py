"""The udp backend's data path: bare IPv4 packets between the TUN device and a UDP socket,
one packet per datagram as flanneld's udp backend sends them, so the two interoperate.

Python touches every packet here, so the loops are built for throughput (bench/udp_throughput.py
measures them against the vxlan backend):

- two worker processes, one per direction (TUN -> UDP and UDP -> TUN): separate processes,
  not threads, so the two directions and the agent's own threads never share one GIL;
- batches (see below): a run of packets read from the TUN leaves in one UDP send, and a run of
  datagrams arrives in one read and enters the TUN as few writes as its TCP flows allow: each
  write is the longest run of one flow in order (a PSH ends it, as the kernel's GRO ends one),
  checked with C-level slices whose cost does not grow with the run;
- preallocated buffers, no per-packet allocation besides memoryview slices;
- the peer of the last destination is kept, so a flow's packets skip the lookup;
- the TTL's checksum fix is a table lookup: decrementing the TTL changes the header's
  checksum by an amount that depends only on the old checksum (RFC 1624, eqn. 3);
- the peer lookup is a dict keyed by the destination masked to the lease length: one mask
  and one dict probe per packet, whatever the number of leases.

The agent sends the TUN -> UDP worker the peer table over a pipe whenever it changes; a worker
exits when that pipe closes, so workers never outlive the agent.
"""

from __future__ import annotations

import errno
import logging
import os
import select
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


def decrement_ttl(packet: bytearray, at: int = 0) -> bool:
    """Decrement the TTL of the IPv4 packet at offset ``at`` in place and fix its checksum;
    False when the packet must be dropped (its TTL would reach 0)."""
    ttl = packet[at + 8]
    if ttl <= 1:
        return False
    packet[at + 8] = ttl - 1
    c = at + 10
    packet[c : c + 2] = TTL_CHECKSUM[(packet[c] << 8) | packet[c + 1]]
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


# --- batches: one UDP send for a run of packets, one TUN write for a run of TCP segments ---------
#
# The TUN carries a virtio_net_hdr before each packet. Packets read from it in a row, all for one
# peer and of one size, go out in one sendmsg() with UDP_SEGMENT: the kernel sends each as its
# own datagram, exactly what flanneld sends and expects. The other way, UDP_GRO hands us a run of
# datagrams from one peer in one read; coalesce() turns consecutive segments of one TCP flow into
# one burst for the TUN, so the kernel's TCP receive path takes them at once.

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_SIZE = VNET_HDR.size
NEEDS_CSUM = 1
GSO_TCPV4 = 1
NO_VNET_HDR = bytes(VNET_HDR_SIZE)
IPPROTO_TCP = 6
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
# The largest UDP payload of one IPv4 datagram, and the most segments one UDP_SEGMENT send takes.
MAX_UDP_PAYLOAD = 65507
MAX_SEGMENTS = 64
# A burst is one IP packet: at most 64 KiB, headers included.
MAX_BURST = 0xFFFF
TCP_ACK = 0x10
TCP_PSH = 0x08
_SEQ = _ADDRESS = struct.Struct("!I")
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
# What a UDP_SEGMENT send fails with where UDP segmentation is missing: before Linux 4.18, or
# out of a device without checksum offload (EIO).
_NO_UDP_SEGMENT = frozenset({errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EIO})


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The ones' complement sum of ``data`` as 16-bit words, modulo 0xffff (so 0xffff reads 0,
    the same number in ones' complement): 2**16 is 1 modulo 0xffff, so the big-endian integer
    of the bytes has the same remainder as the sum of its words. One C pass, no Python loop."""
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    return value % 0xFFFF


def _same_columns(h: int) -> tuple[int, ...]:
    """The header bytes every segment of one burst shares (TCP header ``h - 20`` long): all but
    the IP total length, id and checksum, the sequence number, the TCP flags and checksum."""
    varying = {2, 3, 4, 5, 10, 11, 24, 25, 26, 27, 33, 36, 37}
    return tuple(k for k in range(h) if k not in varying)


# By header length (40 to 80 bytes): the offsets coalesce() checks a column at a time.
_SAME_COLUMNS = {h: _same_columns(h) for h in range(40, 81, 4)}


_SEQ_RUNS: dict[tuple[int, int], struct.Struct] = {}


def _sequence_numbers(size: int, count: int) -> struct.Struct:
    """A struct that reads the TCP sequence numbers of ``count`` packets ``size`` bytes apart
    (IPv4 without options) in one call."""
    reader = _SEQ_RUNS.get((size, count))
    if reader is None:
        if len(_SEQ_RUNS) >= 1024:
            _SEQ_RUNS.clear()  # peers choose the sizes: the cache stays small whatever they send
        reader = _SEQ_RUNS[size, count] = struct.Struct(
            "!" + f"24xI{size - 28}x" * (count - 1) + "24xI"
        )
    return reader


def coalesce(
    buf: bytearray, end: int, size: int, start: int = 0
) -> tuple[list[bytes | bytearray | memoryview], int] | None:
    """The longest run of packets from ``buf[start:end]`` (each ``size`` bytes but the last)
    that are consecutive segments of one TCP flow, as one burst for the TUN with its TTL
    decremented: (its buffers for one writev, virtio_net_hdr first; where the packets after it
    start). None when not even the first two join; the caller then writes the first alone and
    tries from the next.

    Segments join when nothing but sequence number, length, IP id and checksums tells them
    apart, without IP options or fragments; a PSH ends a burst, as the kernel's GRO ends one.
    Every packet is checked, whatever its peer sent.

    Python's work does not grow with the run: what the segments share is checked a byte column
    at a time (``buf[k:end:size]`` is byte k of every packet: a slice and a count in C), their
    sequence numbers are read in one unpack and compared with a range, and the payloads go to
    the kernel where they lie, as slices of one writev.
    """
    f = start
    if buf[f] != 0x45 or buf[f + 9] != IPPROTO_TCP or buf[f + 8] <= 1:
        return None
    h = 20 + (buf[f + 32] >> 4) * 4
    if h not in _SAME_COLUMNS:
        return None  # a TCP data offset under 5 words: no TCP header, whatever the peer says
    if size <= h or end - start > MAX_BURST or buf[f + 6] & 0x3F or buf[f + 7]:
        return None  # too short to carry data, too long for one burst, or a fragment
    count = (end - start + size - 1) // size
    if end - (start + (count - 1) * size) <= h:
        count -= 1  # the last packet carries no data: it goes alone
    stop = start + count * size
    for k in _SAME_COLUMNS[h]:
        # ECN marks (byte 1) are among them: a congestion signal is never merged away.
        column = buf[f + k : stop : size]
        if column.count(column[0]) != count:
            count = len(column) - len(column.lstrip(column[:1]))
            stop = start + count * size
    # Every segment but the burst's last carries ACK alone; the last may add PSH.
    flags = buf[f + 33 : stop : size]
    acks = len(flags) - len(flags.lstrip(b"\x10"))
    if acks < count:
        count = acks + 1 if flags[acks] == TCP_ACK | TCP_PSH else acks
        stop = start + count * size
    # Each packet's IP total length is its length: ``size``, or what is left for the last.
    whole = count - 1 if stop >= end else count
    for k, byte in ((2, size >> 8), (3, size & 0xFF)):
        column = buf[f + k : start + whole * size : size]
        if column.count(byte) != whole:
            count = whole = len(column) - len(column.lstrip(bytes((byte,))))
    if whole < count:
        final = start + whole * size
        if ((buf[final + 2] << 8) | buf[final + 3]) != end - final:
            count = whole
    if count < 2:
        return None
    payload = size - h
    seqs = _sequence_numbers(size, count).unpack_from(buf, f)
    first = seqs[0]
    expected = tuple(
        range(first, first + count * payload, payload)
        if first + (count - 1) * payload <= 0xFFFFFFFF
        else ((first + i * payload) & 0xFFFFFFFF for i in range(count))
    )
    if seqs != expected:
        count = next(
            i for i, (have, want) in enumerate(zip(seqs, expected, strict=True)) if have != want
        )
        if count < 2:
            return None
    view = memoryview(buf)
    last = f + (count - 1) * size
    after = min(last + size, end)
    parts: list[bytes | bytearray | memoryview] = [
        view[s + h : s + size] for s in range(f, last, size)
    ]
    parts.append(view[last + h : after])
    length = h + (count - 1) * payload + after - last - h
    header = bytearray(view[f : f + h])
    header[2:4] = length.to_bytes(2, "big")
    header[8] -= 1
    header[10:12] = b"\0\0"
    header[10:12] = (~ones_sum(header[:20]) & 0xFFFF).to_bytes(2, "big")
    header[33] = buf[last + 33]
    # CHECKSUM_PARTIAL: the field holds the pseudo-header sum; the kernel trusts the rest.
    pseudo = (ones_sum(header[12:20]) + IPPROTO_TCP + length - 20) % 0xFFFF
    header[36:38] = pseudo.to_bytes(2, "big")
    vnet = VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, h, payload, 20, 16)
    return [vnet, header, *parts], after


# --- the loops (run in the worker processes) -----------------------------------------------------


class TunToUdp:
    """Packets the kernel routed into the TUN go to the peer that leases their destination."""

    def __init__(self, tun: int, sock: socket.socket, port: int, source: bytes) -> None:
        self.tun = tun
        self.sock = sock
        self.port = port
        self.source = source
        self.table: Lookup = []
        self.segmenting = True

    def follow(self, stream: IO[bytes]) -> None:
        """Take every table the agent sends; exit the process when it goes away."""
        while (rows := read_table(stream)) is not None:
            self.table = build_lookup(rows, self.port)
        os._exit(0)

    def run(self) -> None:
        """Read packets until the TUN has no more, sending runs of same-sized packets to one
        peer as one UDP_SEGMENT batch (the kernel sends each packet as its own datagram); a run
        is sent when the TUN runs dry, so batching adds no delay."""
        buf = bytearray(MAX_UDP_PAYLOAD + BUFFER_SIZE)
        view = memoryview(buf)
        header = bytearray(VNET_HDR_SIZE)
        readv, tun, find = os.readv, self.tun, lookup
        checksums = TTL_CHECKSUM
        os.set_blocking(tun, False)
        waiter = select.poll()
        waiter.register(tun, select.POLLIN)
        wait = waiter.poll
        send = self.send
        # The run in buf[:o]: its peer and the size of each of its packets.
        o, size, batch, full = 0, 0, None, 0
        # The read's buffers at each offset a run reaches, made once.
        slots: list[list[bytearray | memoryview] | None] = [None] * (MAX_UDP_PAYLOAD + 1)
        address = _ADDRESS.unpack_from
        starts = buf.startswith
        # A flow's packets come in a row: the last destination and its peer spare the lookup,
        # until the destination or the table changes.
        table: Lookup | None = None
        last, peer = b"", None
        while True:
            into = slots[o]
            if into is None:
                into = slots[o] = [header, view[o : o + BUFFER_SIZE]]
            try:
                n = readv(tun, into) - VNET_HDR_SIZE
            except BlockingIOError:
                if o:
                    send(view[:o], size, batch)
                    o = 0
                wait()
                continue
            if n < 20 or buf[o] & 0xF0 != 0x40:
                continue  # not IPv4 (the kernel's IPv6 chatter on the device)
            if table is not self.table or not starts(last, o + 16):
                table = self.table
                last = bytes(view[o + 16 : o + 20])
                peer = find(table, address(buf, o + 16)[0])
            if peer is None:
                error = net_unreachable(view[o : o + n], self.source)
                if error is not None:
                    os.writev(tun, [NO_VNET_HDR, error])
                continue
            # decrement_ttl(), inline: a call per packet is a tenth of the loop.
            ttl = buf[o + 8]
            if ttl <= 1:
                continue
            buf[o + 8] = ttl - 1
            c = o + 10
            buf[c : c + 2] = checksums[(buf[c] << 8) | buf[c + 1]]
            if o and (peer is not batch or n > size):
                # It cannot join the run: send the run, and start another with it.
                send(view[:o], size, batch)
                buf[:n] = bytes(view[o : o + n])
                o = 0
            if not o:
                size, batch = n, peer
                # The run ends when another packet would not fit a send.
                full = min(MAX_UDP_PAYLOAD - size, MAX_SEGMENTS * size - 1)
            o += n
            if n < size or o > full:
                send(view[:o], size, batch)  # a shorter packet ends a run
                o = 0

    def send(self, run: memoryview, size: int, peer: tuple[str, int] | None) -> None:
        if len(run) > size and self.segmenting:
            cmsg = [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
            try:
                self.sock.sendmsg([run], cmsg, 0, peer)
                return
            except OSError as exc:
                if exc.errno not in _NO_UDP_SEGMENT:
                    return  # a full queue or an unreachable peer: dropped, as a router would
                # This kernel or device cannot segment UDP: one datagram per packet from now.
                self.segmenting = False
        for start in range(0, len(run), size):
            try:  # noqa: SIM105 (suppress() costs a context manager per packet)
                self.sock.sendto(run[start : start + size], peer)
            except OSError:
                pass


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
        """Take what the socket holds, while it holds more of one run (UDP_GRO reads of one
        segment size), and write it to the TUN as few bursts as its flows allow."""
        buf = bytearray(2 * BUFFER_SIZE)
        view = memoryview(buf)
        read, write = self.read, self.write
        while True:
            got = read(view, 0)
            if got is None:
                continue
            n, size = got
            while n % size == 0 and n + BUFFER_SIZE <= len(buf):
                more = read(view[n : n + BUFFER_SIZE], socket.MSG_DONTWAIT)
                if more is None:
                    break
                m, other = more
                if other != size:
                    write(buf, 0, n, size)
                    buf[:m] = bytes(view[n : n + m])
                    n, size = m, other
                    continue
                n += m
            write(buf, 0, n, size)

    def read(self, into: memoryview, flags: int) -> tuple[int, int] | None:
        """(bytes read, size of each datagram but the last), or None when nothing came."""
        try:
            n, ancillary, _, _ = self.sock.recvmsg_into([into], _GRO_CMSG_SPACE, flags)
        except BlockingIOError:
            return None
        except OSError:
            return None  # an ICMP error for an earlier send, reported on this socket
        size = n
        for level, kind, data in ancillary:
            if level == SOL_UDP and kind == UDP_GRO:
                size = int.from_bytes(data[:4], sys.byteorder)
        return (n, size) if n else None

    def write(self, buf: bytearray, start: int, end: int, size: int) -> None:
        """Write the packets in ``buf[start:end]``, bursts where they are one flow in order."""
        tun = self.tun
        if size < end - start:
            step = (MAX_BURST // size) * size
            for first in range(start, end, step):
                last = min(first + step, end)
                while first < last:
                    merged = coalesce(buf, last, size, first) if last - first > size else None
                    if merged is None:
                        self.write_each(buf, first, min(first + size, last), size)
                        first += size
                        continue
                    burst, first = merged
                    try:  # noqa: SIM105 (suppress() costs a context manager per packet)
                        os.writev(tun, burst)
                    except OSError:
                        pass
            return
        self.write_each(buf, start, end, size)

    def write_each(self, buf: bytearray, start: int, end: int, size: int) -> None:
        view, tun, no_header = memoryview(buf), self.tun, NO_VNET_HDR
        for s in range(start, end, size):
            e = min(s + size, end)
            if e - s < 20 or buf[s] & 0xF0 != 0x40 or not decrement_ttl(buf, s):
                continue
            try:  # noqa: SIM105 (suppress() costs a context manager per packet)
                os.writev(tun, [no_header, view[s:e]])
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
                    restarted.append(f"{direction} exited with status {process.returncode}")
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

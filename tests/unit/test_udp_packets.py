"""The udp data path's packet logic: the TTL and its checksum, ICMP errors, the peer lookup,
coalescing TCP segments."""

from __future__ import annotations

import io
import struct
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from providers.udp_forwarder import (
    GSO_TCPV4,
    ICMP_DEST_UNREACH,
    ICMP_NET_UNREACH,
    NEEDS_CSUM,
    TCP_ACK,
    VNET_HDR,
    Peer,
    build_lookup,
    checksum,
    coalesce,
    decrement_ttl,
    encode_table,
    lookup,
    net_unreachable,
    ones_sum,
    read_table,
)

SOURCE = IPv4Address("10.5.1.0").packed


def ipv4(
    *, ttl: int = 64, protocol: int = 6, flags_offset: int = 0x4000, options: bytes = b"",
    payload: bytes = b"\x12\x34\x00\x50" + bytes(range(40)), src: str = "10.5.1.7",
    dst: str = "10.5.2.9", ident: int = 0x1C46, tos: int = 0,
) -> bytearray:  # fmt: skip
    """An IPv4 packet with a correct header checksum."""
    header_length = 20 + len(options)
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x40 | header_length // 4, tos, header_length + len(payload), ident,
            flags_offset, ttl, protocol, 0, IPv4Address(src).packed, IPv4Address(dst).packed,
        ) + options
    )  # fmt: skip
    header[10:12] = checksum(header).to_bytes(2, "big")
    return header + payload


headers = st.builds(
    lambda ttl, protocol, ident, tos, flags, src, dst, options: ipv4(
        ttl=ttl, protocol=protocol, ident=ident, tos=tos, flags_offset=flags,
        src=str(IPv4Address(src)), dst=str(IPv4Address(dst)), options=options,
    ),
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 65535), st.integers(0, 255),
    st.integers(0, 65535), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.sampled_from([b"", b"\x01\x01\x01\x00", bytes(range(8)), b"\xff" * 40]),
)  # fmt: skip


@given(headers)
def test_ttl_decrement_gives_the_checksum_a_full_recompute_gives(packet: bytearray) -> None:
    ttl = packet[8]
    header_length = (packet[0] & 0x0F) * 4
    forwarded = decrement_ttl(packet)
    if ttl <= 1:
        assert not forwarded
        assert packet[8] == ttl, "a dropped packet is left alone"
        return
    assert forwarded
    assert packet[8] == ttl - 1
    fresh = bytearray(packet[:header_length])
    fresh[10:12] = b"\0\0"
    assert packet[10:12] == checksum(fresh).to_bytes(2, "big")
    assert checksum(packet[:header_length]) == 0, "the header verifies as a receiver checks it"


def test_every_checksum_value_is_fixed_like_a_recompute() -> None:
    """Exhaustive over the checksum field: headers that differ only where the checksum lands."""
    packet = ipv4(ttl=2)
    base = bytearray(packet[:20])
    for ident in range(0, 65536, 7):
        base[4:6] = ident.to_bytes(2, "big")
        base[8] = 2
        base[10:12] = b"\0\0"
        base[10:12] = checksum(base).to_bytes(2, "big")
        assert decrement_ttl(base)
        expected = bytearray(base)
        expected[10:12] = b"\0\0"
        assert base[10:12] == checksum(expected).to_bytes(2, "big"), ident


def test_net_unreachable_is_a_valid_icmp_error_quoting_the_header_and_8_bytes() -> None:
    packet = ipv4(options=b"\x01\x01\x01\x00")
    error = net_unreachable(packet, SOURCE)
    assert error is not None
    header, icmp = error[:20], error[20:]
    assert checksum(header) == 0 and checksum(icmp) == 0
    assert header[0] == 0x45 and header[9] == 1
    assert struct.unpack("!H", header[2:4])[0] == len(error)
    assert header[12:16] == SOURCE
    assert header[16:20] == IPv4Address("10.5.1.7").packed, "back to the sender"
    assert (icmp[0], icmp[1]) == (ICMP_DEST_UNREACH, ICMP_NET_UNREACH)
    assert icmp[8:] == packet[: 24 + 8], "the whole original header (with options) and 8 bytes"


def test_no_error_for_icmp_non_first_fragments_or_garbage() -> None:
    assert net_unreachable(ipv4(protocol=1), SOURCE) is None
    assert net_unreachable(ipv4(flags_offset=0x2000 | 185), SOURCE) is None
    assert net_unreachable(ipv4(flags_offset=185), SOURCE) is None, "the last fragment"
    assert net_unreachable(ipv4()[:19], SOURCE) is None
    v6 = bytearray(ipv4())
    v6[0] = 0x60
    assert net_unreachable(v6, SOURCE) is None
    assert net_unreachable(ipv4(flags_offset=0x2000), SOURCE) is not None, "a first fragment"
    assert net_unreachable(ipv4(protocol=17), SOURCE) is not None


def test_lookup_finds_the_peer_of_every_address_of_a_leased_subnet() -> None:
    peers = [
        Peer(
            IPv4Network(f"10.{i // 256}.{i % 256}.0/24"),
            IPv4Address(f"198.18.{i // 256}.{i % 256}"),
        )
        for i in range(1, 3000)
    ]
    table = build_lookup(read_table_bytes(encode_table(peers)), 8285)
    assert len(table) == 1, "one mask for one SubnetLen"
    for peer in peers[::97]:
        for host in (0, 1, 77, 255):
            destination = int(peer.subnet.network_address) + host
            assert lookup(table, destination) == (str(peer.public_ip), 8285)
    assert lookup(table, int(IPv4Address("10.200.0.1"))) is None
    assert lookup(table, int(IPv4Address("10.0.0.1"))) is None


def test_lookup_with_a_lease_of_another_length_prefers_the_longest() -> None:
    peers = [
        Peer(IPv4Network("10.5.0.0/16"), IPv4Address("198.18.0.9")),
        Peer(IPv4Network("10.5.2.0/24"), IPv4Address("198.18.0.2")),
        Peer(IPv4Network("10.5.3.0/26"), IPv4Address("198.18.0.3")),
    ]
    table = build_lookup(read_table_bytes(encode_table(peers)), 9000)
    assert lookup(table, int(IPv4Address("10.5.2.200"))) == ("198.18.0.2", 9000)
    assert lookup(table, int(IPv4Address("10.5.3.63"))) == ("198.18.0.3", 9000)
    assert lookup(table, int(IPv4Address("10.5.3.64"))) == ("198.18.0.9", 9000)
    assert lookup(table, int(IPv4Address("10.6.0.1"))) is None


def test_a_truncated_table_reads_as_the_end() -> None:
    data = encode_table([Peer(IPv4Network("10.5.2.0/24"), IPv4Address("198.18.0.2"))])
    assert read_table_bytes(data[:-1]) is None
    assert read_table_bytes(b"") is None


def read_table_bytes(data: bytes) -> list[tuple[int, int, int]] | None:
    return read_table(io.BytesIO(data))


# --- coalescing a run of TCP segments into one burst for the TUN -----------------------------------

MSS = 1400
FLOW_SEQ = 0xFFFFF000  # wraps inside the run


def tcp_segment(seq: int, payload: bytes, *, flags: int = TCP_ACK, ident: int = 7,
                window: int = 500, options: bytes = b"\x01\x01\x08\x0a" + bytes(8),
                sport: int = 40000, ip_options: bytes = b"") -> bytearray:  # fmt: skip
    offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, 5201, seq & 0xFFFFFFFF, 2000, offset << 4, flags,
                         window, 0, 0) + options  # fmt: skip
    return ipv4(protocol=6, payload=header + payload, ident=ident, options=ip_options)


def run_of(segments: list[bytearray]) -> tuple[bytearray, int, int]:
    """The segments back to back, as one UDP_GRO read gives them: (buffer, length, size)."""
    data = bytearray(b"".join(segments))
    return data, len(data), len(segments[0])


def stream(count: int, last: int = MSS) -> list[bytes]:
    return [bytes([i]) * (MSS if i < count - 1 else last) for i in range(count)]


def segments_of(payloads: list[bytes], **kwargs: int) -> list[bytearray]:
    out, seq = [], FLOW_SEQ
    for payload in payloads:
        out.append(tcp_segment(seq, payload, **kwargs))  # type: ignore[arg-type]
        seq += len(payload)
    return out


def test_ones_sum_is_the_internet_checksum_sum() -> None:
    for data in (b"", b"\x01", bytes(range(256)) * 6, b"\xff\xff" * 9, bytes(range(77))):
        assert (~ones_sum(data) & 0xFFFF) in (checksum(data), checksum(data) ^ 0xFFFF)
        if checksum(data) not in (0, 0xFFFF):
            assert ~ones_sum(data) & 0xFFFF == checksum(data)


def test_a_run_of_one_flow_becomes_one_burst_with_a_gso_header() -> None:
    payloads = stream(5, last=321)
    segments = segments_of(payloads, flags=TCP_ACK)
    segments[-1][33] = TCP_ACK | 0x08  # PSH on the last, as the sender's TSO leaves it
    data, n, size = run_of(segments)
    merged = coalesce(data, n, size)
    assert merged is not None
    (header, *buffers), after = merged
    assert after >= n, "the whole run is one burst"
    burst = b"".join(buffers)
    length = len(burst)
    assert burst[52:] == b"".join(payloads), "the payloads in order"
    assert int.from_bytes(burst[2:4], "big") == length
    assert burst[8] == 63, "the TTL is decremented once"
    assert checksum(burst[:20]) == 0
    assert burst[33] == TCP_ACK | 0x08
    assert int.from_bytes(burst[24:28], "big") == FLOW_SEQ
    flags, gso, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack(header)
    assert (flags, gso, hdr_len, gso_size, csum_start, csum_offset) == (
        NEEDS_CSUM, GSO_TCPV4, 52, MSS, 20, 16,
    )  # fmt: skip
    # The field holds the pseudo-header sum: finishing it as the kernel does (the sum of the
    # rest, from csum_start) gives a checksum a receiver verifies.
    tcp = bytearray(burst[20:])
    partial = int.from_bytes(tcp[16:18], "big")
    tcp[16:18] = b"\0\0"
    tcp[16:18] = (~((partial + ones_sum(tcp)) % 0xFFFF) & 0xFFFF).to_bytes(2, "big")
    pseudo = bytes(burst[12:20]) + struct.pack("!BBH", 0, 6, len(tcp))
    assert checksum(pseudo + tcp) == 0


def test_a_burst_is_the_longest_run_of_one_flow_in_order() -> None:
    def joined(segments: list[bytearray], start: int = 0) -> int:
        """How many packets from ``start`` one burst takes (0: none, each goes alone)."""
        data, n, size = run_of(segments)
        before = bytes(data)
        result = coalesce(data, n, size, start * size)
        assert bytes(data) == before, "the packets are left as they came"
        return 0 if result is None else (result[1] - start * size + size - 1) // size

    assert joined(segments_of(stream(3))) == 3
    gap = segments_of(stream(3))
    gap[2] = tcp_segment(FLOW_SEQ + 3 * MSS, stream(3)[2])
    assert joined(gap) == 2, "a burst ends before a missing segment"
    other_flow = segments_of(stream(3))
    other_flow[1] = segments_of(stream(3), sport=40001)[1]
    assert joined(other_flow) == 0
    for flags in (0x02 | TCP_ACK, 0x01 | TCP_ACK, 0x04):
        middle = segments_of(stream(3))
        middle[1][33] = flags
        assert joined(middle) == 0, f"flags {flags:#x} before the last segment"
    pushed = segments_of(stream(5))
    pushed[2][33] = TCP_ACK | 0x08
    assert joined(pushed) == 3, "a PSH ends a burst, as the kernel's GRO ends one"
    assert joined(pushed, 3) == 2, "the next burst starts after it"
    window = segments_of(stream(3))
    window[1] = segments_of(stream(3), window=501)[1]
    assert joined(window) == 0, "a window update is not merged away"
    assert joined(segments_of(stream(3), ip_options=b"\x01\x01\x01\x00")) == 0
    congested = segments_of(stream(3))
    congested[1][1] = 0x03  # ECN CE
    congested[1][10:12] = b"\0\0"
    congested[1][10:12] = checksum(congested[1][:20]).to_bytes(2, "big")
    assert joined(congested) == 0, "a congestion mark is not merged away"
    late_congestion = segments_of(stream(4))
    late_congestion[3][1] = 0x03
    assert joined(late_congestion) == 3
    for liar, wanted in ((1, 0), (3, 3)):
        lying = segments_of(stream(4, last=700))
        lying[liar][2:4] = (len(lying[liar]) - 4).to_bytes(2, "big")
        assert joined(lying) == wanted, f"packet {liar}'s IP length is not its length"
    fragment = segments_of(stream(3))
    for segment in fragment:
        segment[6] |= 0x20
    assert joined(fragment) == 0
    udp = [ipv4(protocol=17, payload=bytes(MSS + 32)) for _ in range(3)]
    assert joined(udp) == 0
    short_header = segments_of(stream(3))
    for segment in short_header:
        segment[32] = 0x30  # a data offset of 3 words: not a TCP header
    assert joined(short_header) == 0, "a peer's bad data offset is refused, not a crash"
    dying = segments_of(stream(3))
    dying[0][8] = 1
    assert joined(dying) == 0, "TTL 1: dropped by the per-packet path, not merged"


def test_ttl_decrement_of_a_packet_inside_a_run() -> None:
    first, second = ipv4(ttl=9), ipv4(ttl=1, ident=99)
    run = bytearray(first + second)
    assert decrement_ttl(run, len(first)) is False
    assert run == first + second, "a packet at TTL 1 is left for the caller to drop"
    assert decrement_ttl(run, 0)
    assert run[8] == 8 and checksum(run[:20]) == 0
    assert run[len(first) :] == second

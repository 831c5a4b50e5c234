"""The rtnetlink encoding of the kernel route table, checked without a kernel."""

from __future__ import annotations

import errno
import socket
import struct
from ipaddress import ip_network

import pytest

from providers.kernel import RT_TABLE_MAIN, RTPROT_CLOUDROUTES
from providers.netlink import (
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    RTA_GATEWAY,
    RTA_MULTIPATH,
    RTN_UNICAST,
    RTNH_F_ONLINK,
    dest_key,
    key_destination,
    parse_ack,
    parse_route,
    route_message,
)


@pytest.mark.parametrize(
    ("destination", "gateway", "oif", "flags"),
    [
        ("10.5.2.0/24", "198.18.0.2", 2, 0),  # the shape the fast path reads
        ("10.5.2.0/24", "198.18.5.9", 2, RTNH_F_ONLINK),
        ("10.5.3.0/24", "", 7, 0),  # a device route
        ("0.0.0.0/0", "198.18.0.1", 0, 0),
        ("2001:2:0:5::/64", "2001:2::2", 3, 0),
    ],
)
def test_what_we_write_reads_back(destination: str, gateway: str, oif: int, flags: int) -> None:
    key = dest_key(ip_network(destination))
    family = socket.AF_INET if len(key[0]) == 4 else socket.AF_INET6
    payload = route_message(
        key,
        protocol=RTPROT_CLOUDROUTES,
        table=RT_TABLE_MAIN,
        scope=0,
        rtype=RTN_UNICAST,
        flags=flags,
        gateway=socket.inet_pton(family, gateway) if gateway else None,
        oif=oif,
    )

    route = parse_route(payload)

    assert route is not None
    assert key_destination(route.key) == ip_network(destination)
    assert (route.gateway, route.oif, route.onlink) == (gateway, oif, bool(flags))
    assert (route.protocol, route.table, route.rtype) == (RTPROT_CLOUDROUTES, 254, RTN_UNICAST)


def test_a_table_id_above_255_travels_in_rta_table() -> None:
    payload = route_message(
        dest_key(ip_network("10.5.2.0/24")),
        protocol=RTPROT_CLOUDROUTES,
        table=1000,
        scope=0,
        rtype=RTN_UNICAST,
        gateway=socket.inet_aton("198.18.0.2"),
        oif=2,
    )

    route = parse_route(payload)

    assert route is not None and route.table == 1000


def test_a_multipath_route_never_looks_like_a_single_next_hop() -> None:
    def nexthop(gateway: str) -> bytes:
        attr = struct.pack("=HH4s", 8, RTA_GATEWAY, socket.inet_aton(gateway))
        return struct.pack("=HBBi", 8 + len(attr), 0, 0, 2) + attr

    hops = nexthop("198.18.0.2") + nexthop("198.18.0.3")
    payload = (
        route_message(
            dest_key(ip_network("10.5.2.0/24")),
            protocol=RTPROT_CLOUDROUTES,
            table=RT_TABLE_MAIN,
            scope=0,
            rtype=RTN_UNICAST,
        )
        + struct.pack("=HH", 4 + len(hops), RTA_MULTIPATH)
        + hops
    )

    route = parse_route(payload)

    assert route is not None and route.gateway == "198.18.0.2,198.18.0.3"


def test_an_error_carries_the_kernels_explanation() -> None:
    text = b"Nexthop has invalid gateway\0"
    tlv = struct.pack("=HH", 4 + len(text), 1) + text + b"\0" * (-len(text) % 4)
    echoed = struct.pack("=IHHII", 52, 24, 0x605, 7, 0)  # capped: the request's header only
    payload = struct.pack("=i", -errno.ENETUNREACH) + echoed + tlv

    error = parse_ack(memoryview(payload), NLM_F_CAPPED | NLM_F_ACK_TLVS, 0, len(payload))

    assert error is not None
    assert error.errno == errno.ENETUNREACH
    assert error.extack == "Nexthop has invalid gateway"
    assert parse_ack(memoryview(struct.pack("=i", 0) + echoed), NLM_F_CAPPED, 0, 20) is None

"""What leaves the TUN -> UDP worker's socket: every packet of a run is its own datagram, as
flanneld expects, whether the kernel segments the run or the worker sends packet by packet."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from providers.udp_forwarder import TunToUdp

PACKET = 1472


@pytest.fixture
def link() -> Iterator[tuple[socket.socket, socket.socket]]:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


def run_of(count: int, last: int = PACKET) -> bytes:
    return b"".join(bytes([i]) * (PACKET if i < count - 1 else last) for i in range(count))


def received(receiver: socket.socket, count: int) -> list[bytes]:
    return [receiver.recv(65536) for _ in range(count)]


def test_a_run_leaves_as_one_datagram_per_packet(link: tuple[socket.socket, ...]) -> None:
    sender, receiver = link
    worker = TunToUdp(-1, sender, 0, bytes(4))
    run = run_of(5, last=100)
    worker.send(memoryview(run), PACKET, receiver.getsockname())
    assert received(receiver, 5) == [run[i : i + PACKET] for i in range(0, len(run), PACKET)]
    assert worker.segmenting, "this kernel segments UDP"


def test_without_udp_segmentation_packets_go_one_by_one(link: tuple[socket.socket, ...]) -> None:
    _, receiver = link

    class NoSegmentation(socket.socket):
        """A socket of a kernel (or device) that cannot segment UDP."""

        def sendmsg(self, *args: object, **kwargs: object) -> int:
            raise OSError(errno.EIO, "Input/output error")

    legacy = NoSegmentation(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        worker = TunToUdp(-1, legacy, 0, bytes(4))
        run = run_of(3)
        worker.send(memoryview(run), PACKET, receiver.getsockname())
        assert not worker.segmenting
        assert received(receiver, 3) == [run[i : i + PACKET] for i in range(0, len(run), PACKET)]
    finally:
        legacy.close()

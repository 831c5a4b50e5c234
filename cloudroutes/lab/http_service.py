"""Where the lab's HTTP services (moto, the IMDS stub, the fault proxy) listen.

By default on 127.0.0.1, a free port, in this network namespace. The demo runs its agents in
node namespaces, which cannot reach this namespace's loopback; for them a service listens on
an address inside another namespace (``netns``), as a cloud's endpoints sit on the instance's
network. The socket is bound from a short-lived thread that joined that namespace (network
namespaces are per thread), so the service still runs in this process.
"""

from __future__ import annotations

import ctypes
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

LOOPBACK = "127.0.0.1"
_CLONE_NEWNET = 0x40000000


def listen(host: str = LOOPBACK, port: int = 0, netns: str | None = None) -> socket.socket:
    """A listening TCP socket on host:port (0: a free port), inside ``netns`` if given."""
    if netns is None:
        return _bound(host, port)
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def in_netns() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(
                        err, f"cannot enter network namespace {netns}: {os.strerror(err)}"
                    )
            finally:
                os.close(fd)
            made.append(_bound(host, port))
        except BaseException as exc:
            failed.append(exc)

    # The thread ends inside the namespace and dies there; no other thread ever moves.
    worker = threading.Thread(target=in_netns, name=f"listen-in-{netns}")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]


def _bound(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


class LabHandler(BaseHTTPRequestHandler):
    """What every lab handler wants: keep-alive like a real endpoint, no Nagle delay, quiet."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; with Nagle on, the second waits for the
        # client's delayed ACK (40 ms a call), which would swamp every measurement.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:
            # The client gave up (a read timeout, a reset): routine in fault tests, and not
            # worth the traceback socketserver would print.
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass  # a line per request would flood the test log (and could show tokens)


class HttpService:
    """An HTTP server in a background thread; subclasses say how to answer (``handler``)."""

    def __init__(self, host: str = LOOPBACK, netns: str | None = None) -> None:
        self.host = host
        self.netns = netns
        self.url = ""
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def make_server(self, sock: socket.socket) -> socketserver.BaseServer:
        """The server to run on the listening ``sock``: a threading one calling ``handler``."""
        server = ThreadingHTTPServer((self.host, 0), self.handler(), bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.server_address = sock.getsockname()
        # Handler threads may sit in keep-alive reads; they must not hold up stop() or exit.
        server.daemon_threads = True
        return server

    def start(self) -> Self:
        self._server = self.make_server(listen(self.host, 0, self.netns))
        port = self._server.server_address[1]
        self.url = f"http://{self.host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"{type(self).__name__}-{port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

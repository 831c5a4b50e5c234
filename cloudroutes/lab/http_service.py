"""Where the lab's HTTP services (moto, the metadata servers, the fault proxy) listen, and the
token-guarded metadata server that EC2's IMDSv2 and ECS's hardened mode share.

By default on 127.0.0.1, a free port, in this network namespace. The demo runs its agents in
node namespaces, which cannot reach this namespace's loopback; for them a service listens on
an address inside another namespace (``netns``), as a cloud's endpoints sit on the instance's
network. The socket is bound from a short-lived thread that joined that namespace (network
namespaces are per thread), so the service still runs in this process.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
import socketserver
import threading
import time
from collections import Counter
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar, Self

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


class LabCloud:
    """A whole fake cloud for a cluster of agents: ``start()`` starts its services (its API,
    the counting proxy the agents reach it through, a metadata server per node) and
    ``stop()`` stops them in reverse order, also when a later start fails."""

    _started: ExitStack | None = None

    def _start(self, started: ExitStack) -> None:
        """Start the services, each through ``started.enter_context``."""
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop the stopped services (a later start makes new ones)."""

    def start(self) -> Self:
        with ExitStack() as started:
            self._start(started)
            self._started = started.pop_all()
        return self

    def stop(self) -> None:
        if self._started is not None:
            self._started.close()
            self._started = None
        self._forget()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TokenMetadataService(HttpService):
    """An instance's metadata server: GETs of ``paths()``, and tokens from
    ``PUT /latest/api/token`` (a TTL in seconds in ``ttl_header``) that a GET carries in
    ``token_header``. With ``require_token`` a GET without a valid token gets ``refusal``.
    ``hits`` counts token PUTs and GETs per path; ``expire_tokens()`` makes every token issued
    so far invalid, as a token past its TTL is. A subclass names its cloud's headers."""

    token_header: ClassVar[str]
    ttl_header: ClassVar[str]
    max_token_ttl: ClassVar[int] = 21600
    refusal: ClassVar[tuple[int, str]] = (401, "Unauthorized")

    def __init__(
        self, host: str = LOOPBACK, netns: str | None = None, *, require_token: bool = True
    ) -> None:
        super().__init__(host, netns)
        self.require_token = require_token
        self.hits: Counter[str] = Counter()
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()

    def paths(self) -> dict[str, str]:
        """Every path the server answers, and its body."""
        raise NotImplementedError

    def issue_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.monotonic() + ttl
        return token

    def token_valid(self, token: str | None) -> bool:
        with self._lock:
            expiry = self._tokens.get(token or "")
        return expiry is not None and time.monotonic() < expiry

    def expire_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def count(self, path: str) -> None:
        with self._lock:
            self.hits[path] += 1

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _metadata_handler(self)


def _metadata_handler(server: TokenMetadataService) -> type[BaseHTTPRequestHandler]:
    class Handler(LabHandler):
        def _answer(self, status: int, body: str = "", headers: dict[str, str] | None = None):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _drain(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                # Without a usable length the body cannot be skipped: close after answering.
                self.close_connection = True
            elif length:
                self.rfile.read(length)

        def do_PUT(self) -> None:
            self._drain()
            if self.path.split("?")[0] != "/latest/api/token":
                self._answer(404, "Not Found")
                return
            try:
                ttl = int(self.headers.get(server.ttl_header, ""))
            except ValueError:
                ttl = 0
            if not 1 <= ttl <= server.max_token_ttl:
                self._answer(400, "Bad Request")
                return
            server.count("latest/api/token")
            self._answer(200, server.issue_token(ttl), {server.ttl_header: str(ttl)})

        def do_GET(self) -> None:
            if server.require_token and not server.token_valid(
                self.headers.get(server.token_header)
            ):
                self._answer(*server.refusal)
                return
            path = self.path.split("?")[0].lstrip("/")
            server.count(path)
            paths = server.paths()
            # Clients ask for leaves with and without a trailing slash (botocore's region
            # lookup adds one); the servers answer both.
            body = paths.get(path, paths.get(path.rstrip("/")))
            if body is None:
                self._answer(404, "Not Found")
            else:
                self._answer(200, body)

        def _refuse(self) -> None:
            self._drain()
            self._answer(405, "Method Not Allowed")

        do_POST = do_DELETE = do_PATCH = _refuse

    return Handler

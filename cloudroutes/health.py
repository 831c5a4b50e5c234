"""/healthz, /readyz, /metrics and /status over HTTP.

/healthz is liveness: it answers 200 as long as the agent runs, also while it waits for etcd,
a network config or a lease (the body says which), so a liveness probe never kills an agent
that waits as it should. /readyz answers 503 with the reason until subnet.env is written, as
flanneld does, and again while the lease store does not answer, so a readiness probe keeps pods
off a node whose network is not up or cannot follow its peers. /status shows each route's state
and reason.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cloudroutes.metrics import Metrics


@dataclass(frozen=True)
class Probe:
    """What the agent tells probes at one moment."""

    waiting_for: str | None = None  # what start-up waits for; None once subnet.env is written
    store_problem: str | None = None  # why the lease store does not answer; None while it does

    @property
    def not_ready(self) -> str | None:
        """Why /readyz fails, or None when the node is ready."""
        if self.waiting_for is not None:
            return f"not ready: waiting for {self.waiting_for}"
        if self.store_problem is not None:
            return f"not ready: {self.store_problem}"
        return None

    @property
    def alive(self) -> str:
        """The /healthz body: alive, and what it waits for, if anything."""
        return "ok" if self.waiting_for is None else f"ok, waiting for {self.waiting_for}"


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        status: Callable[[], dict[str, Any]],
        probe: Callable[[], Probe] | None = None,
    ) -> None:
        # Without a probe, readiness is this event: set it once ready.
        self.ready = threading.Event()
        probe = probe or self._probe_ready_event

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._text(200, probe().alive)
                elif self.path == "/readyz":
                    problem = probe().not_ready
                    if problem is None:
                        self._text(200, "ok")
                    else:
                        self._text(503, problem)
                elif self.path == "/metrics":
                    self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif self.path == "/status":
                    body = json.dumps(status(), indent=2, sort_keys=True).encode() + b"\n"
                    self._send(200, body, "application/json")
                else:
                    self._text(404, "not found")

            def _text(self, code: int, text: str) -> None:
                self._send(code, text.encode() + b"\n", "text/plain; charset=utf-8")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would drown the agent's own log

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="health", daemon=True
        )

    def _probe_ready_event(self) -> Probe:
        return Probe() if self.ready.is_set() else Probe(waiting_for="start-up")

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

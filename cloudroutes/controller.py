"""``cloudroutes controller``: a cluster-mode candidate for the cloud backends.

It takes no lease and changes nothing on the machine it runs on: it watches every lease, and
while it holds the backend's election it programs the routes of all of them. Only its role
needs write access to the route tables; the nodes need none.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from cloudroutes.backend import BackendContext, Coordination, backend_factory
from cloudroutes.errors import ConfigError
from cloudroutes.health import HealthServer
from cloudroutes.lease_table import LeaseTable
from cloudroutes.metrics import Metrics
from cloudroutes.routing import Routing, node_vetting
from cloudroutes.subnet.etcd import EtcdLeaseSource
from cloudroutes.subnet.etcd_client import EtcdClient

log = logging.getLogger(__name__)


def controller_id() -> str:
    """Who this controller is, in elections and ledger entries."""
    return f"controller-{socket.gethostname()}-{os.getpid()}"


class Controller:
    def __init__(
        self, source: EtcdLeaseSource, *, healthz_ip: str = "0.0.0.0", healthz_port: int = 0
    ) -> None:
        self.source = source
        self.metrics = Metrics()
        self.leases = LeaseTable()
        self.stop = threading.Event()
        self.routing: Routing | None = None
        self._healthz = (healthz_ip, healthz_port)
        self._threads: list[threading.Thread] = []
        self._failure: BaseException | None = None

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.stop.set())
        health = self._start_health()
        try:
            try:
                config = self.source.network_config(self.stop)
            except ConfigError:
                if self.stop.is_set():
                    return 0
                raise
            settings = self.source.settings
            coordination = Coordination(
                EtcdClient(settings),
                settings.prefix,
                controller_id(),
                connect=lambda: EtcdClient(settings),
            )
            context = BackendContext(config, None, coordination=coordination, controller=True)
            backend = backend_factory(config.backend_type)(context)
            self._spawn("watch", self.source.watch, self.leases, self.stop)
            while not self.leases.wait_synced(0.5):
                if self.stop.is_set():
                    return self._finish()
            vetting = node_vetting(config, backend, None, None, settings.endpoints)
            self.routing = Routing(backend, backend.bind(None), self.leases, vetting, self.metrics)
            self.routing.start(self._spawn, self.stop)
            if health is not None:
                health.ready.set()
            log.info("controller %s is a candidate for %s", controller_id(), config.backend_type)
            self.stop.wait()
            return self._finish()
        finally:
            if health is not None:
                health.stop()

    def _start_health(self) -> HealthServer | None:
        ip, port = self._healthz
        if not port:
            return None
        try:
            health = HealthServer(ip, port, self.metrics, self.status)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve /healthz on {ip}:{port}: {exc.strerror}; "
                "choose another --healthz-ip/--healthz-port"
            ) from None
        health.start()
        return health

    def _spawn(self, name: str, target: Callable[..., Any], *args: Any) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except Exception as exc:
                if not self.stop.is_set():
                    log.error("%s stopped: %s", name, exc)
                    self._failure = exc
                    self.stop.set()

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _finish(self) -> int:
        if self.routing is not None:
            self.routing.wake()
        for thread in self._threads:
            thread.join(timeout=5)
        self.source.close()
        if self._failure is not None:
            raise self._failure
        return 0

    def status(self) -> dict[str, Any]:
        routing = self.routing.status() if self.routing else {}
        return {"role": "controller", "leases": len(self.leases), **routing}

"""The agent: the composition root that wires a lease source, a backend and reconcilers.

Start-up order matters: everything that can be rejected (flags, network config, interface,
backend options) is checked before anything is programmed. Routes are never removed on
shutdown, so a restart (or an upgrade) does not interrupt pod traffic: the next agent adopts
them. A deleted lease is the one way the node leaves, and then the agent exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloudroutes.backend import BackendContext, RouteTableBinding, backend_factory
from cloudroutes.config import NetworkConfig
from cloudroutes.errors import ConfigError, LeaseRevoked, StoreUnavailable
from cloudroutes.health import HealthServer
from cloudroutes.interface import choose_interface
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.lease_table import LeaseTable
from cloudroutes.masq import MasqSpec, Rules, masquerade_rules
from cloudroutes.metrics import Metrics
from cloudroutes.reconciler import Reconciler
from cloudroutes.subnet import LeaseSource
from cloudroutes.subnet_env import SubnetEnv, read_previous, write_subnet_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    iface: list[str] = field(default_factory=list)
    iface_regex: str | None = None
    public_ip: str | None = None
    public_ipv6: str | None = None
    subnet_file: str = "/run/flannel/subnet.env"
    ip_masq: bool = False
    iptables_resync: int = 5
    iptables_forward_rules: bool = True
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0


class Agent:
    def __init__(self, options: AgentOptions, source: LeaseSource) -> None:
        self.options = options
        self.source = source
        self.metrics = Metrics()
        self.leases = LeaseTable()
        self.stop = threading.Event()
        self.reconcilers: list[Reconciler] = []
        self.health: HealthServer | None = None
        self.lease: Lease | None = None
        self._threads: list[threading.Thread] = []
        self._failure: BaseException | None = None
        self._revoked = threading.Event()

    # --- start-up -------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped or the lease is revoked. Returns the process exit status."""
        self._install_signal_handlers()
        try:
            config = self.source.network_config(self.stop)
        except ConfigError:
            if self.stop.is_set():  # stopped while waiting for a config: a clean exit
                return 0
            raise
        iface = choose_interface(
            self.options.iface,
            self.options.iface_regex,
            self.options.public_ip,
            self.options.public_ipv6,
            need_ipv4=config.enable_ipv4,
            need_ipv6=config.enable_ipv6,
        )
        log.info("using interface %s (%s), public IP %s", iface.name, iface.ip, iface.public_ip)
        backend = backend_factory(config.backend_type)(BackendContext(config, iface))
        # Without a lease this programs nothing, but fails now if iptables or nft is missing.
        self._masquerade(config, _masq_spec(config, None), masq=self.options.ip_masq)
        previous = read_previous(self.options.subnet_file)

        self._start_health()
        attrs = backend.prepare()
        lease = self._acquire(config, attrs, previous)
        if lease is None:
            return self._finish()
        self.lease = lease

        self.leases.subscribe(lambda: self.metrics.leases.set(len(self.leases)))
        self._spawn("watch", self.source.watch, self.leases, self.stop)
        self._spawn("lease", self._keep_lease, lease)
        self._install_masquerade(config, lease, previous)
        while not self.leases.wait_synced(0.5):
            if self.stop.is_set():
                return self._finish()
        for binding in backend.bind(lease):
            self._start_reconciler(binding)
        write_subnet_env(
            self.options.subnet_file,
            SubnetEnv(
                network=config.network if config.enable_ipv4 else None,
                subnet=lease.subnet,
                ipv6_network=config.ipv6_network if config.enable_ipv6 else None,
                ipv6_subnet=lease.ipv6_subnet,
                mtu=backend.mtu,
                ipmasq=self.options.ip_masq,
            ),
        )
        if self.health:
            self.health.ready.set()
        log.info("wrote %s; node is ready", self.options.subnet_file)
        self.stop.wait()
        return self._finish()

    def _acquire(
        self, config: NetworkConfig, attrs: LeaseAttrs, previous: SubnetEnv | None
    ) -> Lease | None:
        """Take the lease, waiting out an unreachable store as flanneld does (None if stopped)."""
        wanted = (previous.subnet, previous.ipv6_subnet) if previous else None
        delay = 1.0
        while not self.stop.is_set():
            try:
                lease = self.source.acquire(config, attrs, wanted)
            except StoreUnavailable as exc:
                log.error("Failed to acquire lease (trying again in %.0f s): %s", delay, exc)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            log.info("acquired lease %s (public IP %s)", lease.key, lease.public_ip)
            return lease
        return None

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.shutdown())

    def _start_health(self) -> None:
        if not self.options.healthz_port:
            return
        where = f"{self.options.healthz_ip}:{self.options.healthz_port}"
        try:
            self.health = HealthServer(
                self.options.healthz_ip, self.options.healthz_port, self.metrics, self.status
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve /healthz on {where}: {exc.strerror}; "
                "choose another --healthz-ip/--healthz-port"
            ) from None
        self.health.start()

    def _masquerade(self, config: NetworkConfig, spec: MasqSpec, *, masq: bool) -> Rules:
        return masquerade_rules(
            spec,
            nftables=config.enable_nftables,
            masq=masq,
            forward=self.options.iptables_forward_rules,
        )

    def _install_masquerade(
        self, config: NetworkConfig, lease: Lease, previous: SubnetEnv | None
    ) -> None:
        spec = _masq_spec(config, lease)
        if previous is not None and previous.network is not None and previous.subnet is not None:
            old = MasqSpec(previous.network, previous.subnet, previous.ipv6_network,
                           previous.ipv6_subnet)  # fmt: skip
            if old != spec or (previous.ipmasq and not self.options.ip_masq):
                # The old set first: both sets share rules, so removing after applying would
                # take part of the new set with it.
                self._masquerade(config, old, masq=previous.ipmasq).remove()
        rules = self._masquerade(config, spec, masq=self.options.ip_masq)
        rules.apply()
        self._spawn("masquerade", rules.keep, self.stop, float(self.options.iptables_resync))

    def _start_reconciler(self, binding: RouteTableBinding) -> None:
        reconciler = Reconciler(binding.table, self.leases, binding.desired, metrics=self.metrics)
        self.reconcilers.append(reconciler)
        self._spawn(f"reconcile-{binding.table.name}", reconciler.run, self.stop)
        watch_drift = getattr(binding.table, "watch_drift", None)
        if watch_drift is not None:
            self._spawn(
                f"drift-{binding.table.name}", watch_drift, reconciler.invalidate, self.stop
            )

    # --- running --------------------------------------------------------------------------

    def _keep_lease(self, lease: Lease) -> None:
        try:
            self.source.keep(lease, self.stop)
        except LeaseRevoked:
            log.warning("Lease has been revoked; shutting down")
            self._revoked.set()
            self.shutdown()

    def _spawn(self, name: str, target: Callable[..., Any], *args: Any) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except Exception as exc:
                if not self.stop.is_set():
                    log.error("%s stopped: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                    self._failure = exc
                    self.shutdown()

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def shutdown(self) -> None:
        self.stop.set()
        for reconciler in self.reconcilers:
            reconciler.wake()

    def _finish(self) -> int:
        for thread in self._threads:
            thread.join(timeout=5)
        if self.health:
            self.health.stop()
        self.source.close()
        if self._revoked.is_set():
            return 0
        if self._failure is not None:
            raise self._failure
        return 0

    def status(self) -> dict[str, Any]:
        routes = {}
        for reconciler in self.reconcilers:
            for destination, st in reconciler.status().items():
                routes[f"{reconciler.table.name} {destination}"] = {
                    "route": str(st.route),
                    "state": st.state.value,
                    "reason": st.reason,
                    "lease": st.route.lease_key,
                }
        return {
            "lease": self.lease.key if self.lease else None,
            "leases": len(self.leases),
            "routes": routes,
        }


def _masq_spec(config: NetworkConfig, lease: Lease | None) -> MasqSpec:
    return MasqSpec(
        network=config.network if config.enable_ipv4 else None,
        subnet=lease.subnet if lease else None,
        ipv6_network=config.ipv6_network if config.enable_ipv6 else None,
        ipv6_subnet=lease.ipv6_subnet if lease else None,
    )

"""The agent: the composition root that wires a lease source, a backend and reconcilers.

Start-up order matters: the node lock comes first (one agent per network namespace), then the
health server (so a liveness probe sees a live agent while it waits for etcd, a config or a
lease), then everything that can be rejected (network config, interface, backend options) is
checked before anything is programmed. Routes are never removed on shutdown, so a restart (or
an upgrade) does not interrupt pod traffic: the next agent adopts them. A deleted lease is the
one way the node leaves, and then the agent exits 0. A lease the source cannot keep (it could
not take its subnet back after etcd lost it) exits 1, for the service manager to restart it.

A network config changed while the agent runs is reported, not applied: the running agent
keeps its lease, backend and rules, and a restart applies the new config. SIGHUP re-reads the
config and says whether it differs; SIGINT and SIGTERM stop the agent.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloudroutes.backend import BackendContext, Coordination, ExternalInterface, backend_factory
from cloudroutes.config import NetworkConfig, parse_config
from cloudroutes.errors import (
    CloudroutesError,
    ConfigError,
    LeaseError,
    LeaseRevoked,
    StoreUnavailable,
)
from cloudroutes.health import HealthServer, Probe
from cloudroutes.interface import choose_interface
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.lease_table import LeaseTable
from cloudroutes.masq import MasqSpec, Rules, masquerade_rules
from cloudroutes.metrics import Metrics
from cloudroutes.node_lock import ROUTE_PROTOCOL, NodeLock, take_node_lock
from cloudroutes.routing import Routing, node_vetting
from cloudroutes.subnet import LeaseSource
from cloudroutes.subnet.etcd_client import EtcdClient, EtcdSettings
from cloudroutes.subnet_env import SubnetEnv, read_previous, write_subnet_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    iface: list[str] = field(default_factory=list)
    iface_regex: list[str] = field(default_factory=list)
    iface_can_reach: str | None = None
    public_ip: str | None = None
    public_ipv6: str | None = None
    subnet_file: str = "/run/flannel/subnet.env"
    state_dir: str = "/var/lib/cloudroutes"
    ip_masq: bool = False
    ip_masq_fully_random_disable: bool = False
    ip_blackhole_route: bool = False  # read by the backends
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
        self.routing: Routing | None = None
        self.health: HealthServer | None = None
        self.lease: Lease | None = None
        self.config: NetworkConfig | None = None
        self._threads: list[threading.Thread] = []
        self._failure: BaseException | None = None
        self._revoked = threading.Event()
        self._node_lock: NodeLock | None = None
        self._coordination_client: EtcdClient | None = None
        self._waiting_for: str | None = "start-up"
        self._config_news = _ConfigNews(where=_config_where(source))

    # --- start-up -------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped or the lease is revoked. Returns the process exit status."""
        self._install_signal_handlers()
        # Before anything is read, acquired or written: a second agent must change nothing.
        self._node_lock = take_node_lock(ROUTE_PROTOCOL, self._config_news.owner)
        try:
            self._start_health()
            return self._run()
        finally:
            self.shutdown()  # also when start-up failed: threads already spawned end too
            if self.health:
                self.health.stop()
            self.source.close()
            if self._coordination_client is not None:
                self._coordination_client.close()
            self._node_lock.release()

    def _run(self) -> int:
        self._waiting_for = f"a network config at {self._config_news.where}"
        try:
            config = self.source.network_config(self.stop)
        except ConfigError:
            if self.stop.is_set():  # stopped while waiting for a config: a clean exit
                return 0
            raise
        self.config = config
        self._watch_config()
        iface = choose_interface(
            self.options.iface,
            self.options.iface_regex,
            self.options.public_ip,
            self.options.public_ipv6,
            iface_can_reach=self.options.iface_can_reach,
            need_ipv4=config.enable_ipv4,
            need_ipv6=config.enable_ipv6,
        )
        log.info(
            "using interface %s (%s), public IP %s",
            iface.name,
            " ".join(str(a) for a in (iface.ip, iface.ipv6) if a) or "no address",
            " ".join(str(a) for a in (iface.public_ip, iface.public_ipv6) if a) or "none",
        )
        context = BackendContext(
            config,
            iface,
            coordination=self._coordination(iface),
            blackhole_own_subnet=self.options.ip_blackhole_route,
            state_dir=self.options.state_dir,
        )
        backend = backend_factory(config.backend_type)(context)
        # Without a lease this programs nothing, but fails now if iptables or nft is missing.
        self._masquerade(config, _masq_spec(config, None), masq=self.options.ip_masq)
        previous = read_previous(self.options.subnet_file)

        attrs = backend.prepare()
        self._waiting_for = "a subnet lease"
        lease = self._acquire(config, attrs, previous)
        if lease is None:
            return self._finish()
        self.lease = lease

        self._waiting_for = "the first listing of every lease"
        self.leases.subscribe(lambda: self.metrics.leases.set(len(self.leases)))
        self._spawn("watch", self.source.watch, self.leases, self.stop)
        self._spawn("lease", self._keep_lease, lease)
        self._install_masquerade(config, lease, previous)
        while not self.leases.wait_synced(0.5):
            if self.stop.is_set():
                return self._finish()
        vetting = node_vetting(config, backend, lease, iface, self._store_endpoints())
        self.routing = Routing(backend, backend.bind(lease), self.leases, vetting, self.metrics)
        self.routing.start(self._spawn, self.stop)
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
        self._waiting_for = None
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

    def _coordination(self, iface: ExternalInterface) -> Coordination | None:
        """Ledgers and elections for cloud backends, in the etcd that holds the leases."""
        settings = getattr(self.source, "settings", None)
        if not isinstance(settings, EtcdSettings):
            return None  # a lease source without etcd: backends that need it say so
        self._coordination_client = EtcdClient(settings)
        member = str(iface.public_ip or iface.public_ipv6)
        return Coordination(
            self._coordination_client,
            settings.prefix,
            member,
            connect=lambda: EtcdClient(settings),
        )

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.shutdown())
        # Left at its default, SIGHUP (sent by `systemctl reload` or a closed terminal) would
        # end the agent silently with status 129; operators expect a reload to re-read config.
        signal.signal(signal.SIGHUP, lambda *_: self._on_sighup())

    def _start_health(self) -> None:
        self.metrics.ready.set_function(lambda: 0.0 if self.probe().not_ready else 1.0)
        self.metrics.config_differs.set_function(lambda: float(self._config_news.differs))
        if not self.options.healthz_port:
            return
        where = f"{self.options.healthz_ip}:{self.options.healthz_port}"
        try:
            self.health = HealthServer(
                self.options.healthz_ip,
                self.options.healthz_port,
                self.metrics,
                self.status,
                self.probe,
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
            # None: use --random-fully where iptables has it, as flanneld does.
            random_fully=False if self.options.ip_masq_fully_random_disable else None,
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

    # --- running --------------------------------------------------------------------------

    def _keep_lease(self, lease: Lease) -> None:
        try:
            self.source.keep(lease, self.stop)
        except LeaseRevoked:
            log.warning("Lease has been revoked; shutting down")
            self._revoked.set()
            self.shutdown()
        except LeaseError as exc:
            # The source re-creates a lease etcd lost; this is when it could not. Exit 1 and
            # let the service manager start a fresh agent, which acquires anew.
            self._fail(LeaseError(f"cannot keep lease {lease.key}: {exc}; exiting to start over"))

    def _watch_config(self) -> None:
        watch_config = getattr(self.source, "watch_config", None)
        if watch_config is None:
            log.info("this lease source cannot watch the network config; SIGHUP re-reads it")
            return
        self._spawn("config", watch_config, self.stop, self._on_config, fatal=False)

    def _on_config(self, text: str | None) -> None:
        """The config watch saw ``text`` (None: deleted): report, once, what that means."""
        if self.config is not None:
            self._config_news.seen(self.config, text)

    def _on_sighup(self) -> None:
        # Not in the handler itself: reading etcd can block, and the handler runs on the main
        # thread, which must stay free to react to SIGTERM.
        threading.Thread(target=self._reread_config, name="sighup", daemon=True).start()

    def _reread_config(self) -> None:
        if self.config is None:
            log.info("SIGHUP: waiting for %s; nothing to re-read yet", self._waiting_for)
            return
        get_config_text = getattr(self.source, "get_config_text", None)
        if get_config_text is None:
            log.info("SIGHUP: this lease source cannot re-read its config; restart to apply one")
            return
        try:
            text = get_config_text()
        except CloudroutesError as exc:
            log.warning("SIGHUP: cannot re-read the network config: %s", exc)
            return
        self._config_news.seen(self.config, text, asked="SIGHUP")

    def _spawn(self, name: str, target: Callable[..., Any], *args: Any, fatal: bool = True) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except Exception as exc:
                if self.stop.is_set():
                    return
                if not fatal:
                    log.error("%s stopped: %s; the agent runs on without it", name, exc)
                    return
                log.error("%s stopped: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                self._fail(exc)

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self.shutdown()

    def shutdown(self) -> None:
        self.stop.set()
        if self.routing is not None:
            self.routing.wake()

    def _finish(self) -> int:
        for thread in self._threads:
            thread.join(timeout=5)
        if self._revoked.is_set():
            return 0
        if self._failure is not None:
            raise self._failure
        return 0

    # --- reporting ------------------------------------------------------------------------

    def probe(self) -> Probe:
        return Probe(waiting_for=self._waiting_for, store_problem=self._store_problem())

    def _store_problem(self) -> str | None:
        problem = getattr(self.source, "store_problem", None)
        return problem if isinstance(problem, str) else None

    def _store_endpoints(self) -> tuple[str, ...]:
        settings = getattr(self.source, "settings", None)
        return tuple(getattr(settings, "endpoints", ()))

    def status(self) -> dict[str, Any]:
        routing = (
            self.routing.status()
            if self.routing is not None
            else {"routes": {}, "refused_leases": {}, "passes": {}}
        )
        return {
            "lease": self.lease.key if self.lease else None,
            "leases": len(self.leases),
            **routing,
            "etcd": self._store_problem() or "ok",
            "waiting_for": self._waiting_for,
            "config": self._config_news.note,
        }


class _ConfigNews:
    """What the network config in the store means for the running agent, said once per change.

    The agent runs with the config it started with; this compares what the store holds now
    against it, so an operator learns whether a restart would change anything.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.note = "as started"
        self.differs = False
        self._lock = threading.Lock()

    @property
    def owner(self) -> str:
        """How the node lock describes this agent to a second one."""
        return f"network config at {self.where}"

    def seen(self, running: NetworkConfig, text: str | None, asked: str | None = None) -> None:
        note, differs = self._judge(running, text)
        with self._lock:
            news = note != self.note
            self.note, self.differs = note, differs
        if asked:
            log.info("%s: %s", asked, note if differs else "network config unchanged")
        elif news and differs:
            log.warning("%s", note)
        elif news:
            log.info("network config %s is the one this agent runs with again", self.where)

    def _judge(self, running: NetworkConfig, text: str | None) -> tuple[str, bool]:
        runs_on = "this agent runs on with the config it started with"
        if text is None:
            return (
                f"network config {self.where} was deleted; {runs_on}, keeping its lease, routes "
                "and rules (write it back with `cloudroutes config set`)",
                True,
            )
        try:
            config = parse_config(text, source=self.where)
        except ConfigError as exc:
            return f"{exc}; {runs_on}", True
        changes = describe_config_change(running, config)
        if changes is None:
            return "as started", False
        return (
            f"network config {self.where} changed ({changes}); {runs_on}, keeping its lease "
            "and backend; restart the agent to apply the new config",
            True,
        )


# flannel's names for NetworkConfig's fields, in the order net-conf.json usually has them.
_FLANNEL_NAMES = {
    "network": "Network",
    "subnet_len": "SubnetLen",
    "subnet_min": "SubnetMin",
    "subnet_max": "SubnetMax",
    "enable_ipv4": "EnableIPv4",
    "ipv6_network": "IPv6Network",
    "ipv6_subnet_len": "IPv6SubnetLen",
    "ipv6_subnet_min": "IPv6SubnetMin",
    "ipv6_subnet_max": "IPv6SubnetMax",
    "enable_ipv6": "EnableIPv6",
    "enable_nftables": "EnableNFTables",
}


def describe_config_change(old: NetworkConfig, new: NetworkConfig) -> str | None:
    """``Network 10.5.0.0/16 -> 10.6.0.0/16, Backend.Type host-gw -> vxlan``; None if equal."""
    changes = [
        f"{label} {getattr(old, name)} -> {getattr(new, name)}"
        for name, label in _FLANNEL_NAMES.items()
        if getattr(old, name) != getattr(new, name)
    ]
    if old.backend_type != new.backend_type:
        changes.append(f"Backend.Type {old.backend_type} -> {new.backend_type}")
    elif old.backend != new.backend:
        changes.append(f"the options of Backend {new.backend_type}")
    return ", ".join(changes) or None


def _config_where(source: LeaseSource) -> str:
    key = getattr(source, "config_key", None)
    return f"etcd {key}" if isinstance(key, str) else "the lease source"


def _masq_spec(config: NetworkConfig, lease: Lease | None) -> MasqSpec:
    return MasqSpec(
        network=config.network if config.enable_ipv4 else None,
        subnet=lease.subnet if lease else None,
        ipv6_network=config.ipv6_network if config.enable_ipv6 else None,
        ipv6_subnet=lease.ipv6_subnet if lease else None,
    )

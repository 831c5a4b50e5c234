"""The lab the agent benchmarks share: one node running a real agent against a real etcd.

It is built with cloudroutes.lab: a switch, an etcd machine and a node, each a namespace, on
the 198.18.0.0/15 underlay. The node's eth0 is 198.18.0.1/15, so the peers of a big cluster
(198.19.x.y) are all on-link, as host-gw routes need. Peer leases are written the way flanneld
writes them, each key on an etcd lease of its own, by a helper inside the etcd namespace
(bench/_etcd_peer.py). The node's routes are followed through rtnetlink events in its
namespace and stamped when read, so a route is seen within a millisecond of its arrival,
without polling the table.

Everything the lab makes (namespaces, the agent, etcd, helpers) is removed when it closes, on
an error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import errno
import http.client
import itertools
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Protocol, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from bench import best_of
from bench.kernel_routes import script
from cloudroutes.lab.cluster import LabCluster, LabNode
from cloudroutes.lab.netns import Netns
from cloudroutes.lease import LeaseAttrs, encode_attrs, subnet_key
from cloudroutes.routes import Route
from providers.kernel import RT_TABLE_MAIN, RTPROT_CLOUDROUTES, KernelRouteTable
from providers.netlink import (
    RTM_DELROUTE,
    RTM_NEWROUTE,
    RTMGRP_IPV4_ROUTE,
    DestKey,
    Netlink,
    dest_key,
    in_netns,
    parse_route,
)

SUBNETS = "/coreos.com/network/subnets/"
# A /8 of /24s: room for 65,000 leases. The node takes one of the first 100 free subnets
# (10.0.1.0/24 up), peers are given 10.1.0.0/24 upwards, so they never collide.
NETWORK_CONFIG = '{"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "host-gw"}}'
UNDERLAY_PREFIX = 15
HEALTHZ_PORT = 9471
PASSES = "cloudroutes_reconcile_duration_seconds_count"
PASS_SECONDS = "cloudroutes_reconcile_duration_seconds_sum"
LEASE_TTL = 3600
REPO = Path(__file__).resolve().parent.parent
_NLMSGHDR = struct.Struct("=IH")


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


@dataclass(frozen=True)
class PeerLease:
    """Peer number ``index``: its lease in etcd and the host-gw route it asks of the node."""

    index: int

    @property
    def subnet(self) -> IPv4Network:
        return IPv4Network(f"10.{1 + self.index // 256}.{self.index % 256}.0/24")

    @property
    def public_ip(self) -> IPv4Address:
        return IPv4Address(f"198.19.{self.index // 256}.{self.index % 256}")

    @property
    def key(self) -> str:
        return SUBNETS + subnet_key(self.subnet)

    @property
    def value(self) -> str:
        return encode_attrs(LeaseAttrs(public_ip=self.public_ip, backend_type="host-gw")).decode()

    @property
    def route(self) -> Route:
        return Route(self.subnet, str(self.public_ip), "eth0")

    @property
    def dest(self) -> DestKey:
        return dest_key(self.subnet)


def peers(first: int, count: int) -> list[PeerLease]:
    return [PeerLease(i) for i in range(first, first + count)]


def percentile(samples: Sequence[float], p: float) -> float:
    """The nearest-rank percentile: p99 of 200 samples is the second largest."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


class EtcdPeer:
    """bench/_etcd_peer.py running in a namespace: ``client`` mode, driven over its pipes."""

    def __init__(self, ns: Netns, endpoint: str) -> None:
        self._proc = _helper(ns, "client", endpoint)
        self._answer("start")  # its first line says it is connected

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        return self._answer(op)

    def _answer(self, op: str) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the etcd helper exited ({self._proc.poll()}) at {op}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"etcd helper, {op}: {answer['error']}")
        return answer

    def put_leases(self, leases: Sequence[PeerLease]) -> tuple[float, float]:
        """Grant each lease its etcd lease (untimed), then write them all in transactions of
        128 puts; returns when the writing started and ended."""
        ids = self.call("grant", count=len(leases), ttl=LEASE_TTL)["ids"]
        items = [[p.key, p.value, i] for p, i in zip(leases, ids, strict=True)]
        answer = self.call("put_all", items=items)
        return answer["start"], answer["end"]

    def close(self) -> None:
        _end(self._proc)


class EtcdWatcher:
    """bench/_etcd_peer.py in ``watch`` mode: when a bare pyetcd watcher sees each key."""

    def __init__(self, ns: Netns, endpoint: str, prefix: str) -> None:
        self._proc = _helper(ns, "watch", endpoint, prefix)
        self._cond = threading.Condition()
        self._seen: dict[str, float] = {}
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the etcd watcher did not start")
        threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            stamp, _, key = line.strip().partition(" ")
            with self._cond:
                self._seen.setdefault(key, float(stamp))
                self._cond.notify_all()

    def wait(self, key: str, timeout: float = 10) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._seen, timeout):
                raise TimeoutError(f"the bare watcher never saw {key}")
            return self._seen[key]

    def close(self) -> None:
        _end(self._proc)


def _helper(ns: Netns, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bench._etcd_peer", *args]
    return ns.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)  # type: ignore[return-value]


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class RouteWatch:
    """The routes of cloudroutes' protocol in a namespace's main table, as rtnetlink announces
    them; each change is stamped with time.monotonic() when read.

    A waiter names a condition; the reader thread checks it after every change and keeps the
    time of the change that first made it true, so that time does not depend on when the
    waiting thread gets to run.
    """

    def __init__(self, netns: str) -> None:
        # Subscribe before the first dump, so no change falls between the two.
        self._events = Netlink(netns, RTMGRP_IPV4_ROUTE)
        self._dumps = KernelRouteTable(netns=netns, name="bench-watch")
        self._cond = threading.Condition()
        self._present: set[DestKey] = set()
        self._until: Callable[[set[DestKey]], bool] | None = None
        self._met: float | None = None
        self._stop = threading.Event()
        self._resync()
        self._thread = threading.Thread(target=self._run, name="route-watch", daemon=True)
        self._thread.start()

    def wait(self, until: Callable[[set[DestKey]], bool], timeout: float, what: str) -> float:
        """Block until ``until(routes)`` holds; the time of the change that made it hold (or
        now, when it already held)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if until(self._present):
                return time.monotonic()
            self._until, self._met = until, None
            try:
                while self._met is None:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        raise TimeoutError(
                            f"timed out after {timeout:.0f} s waiting for {what} "
                            f"({len(self._present)} routes in the kernel)"
                        )
                    self._cond.wait(left)
                return self._met
            finally:
                self._until = None

    def wait_count(self, count: int, timeout: float = 300) -> float:
        return self.wait(lambda routes: len(routes) == count, timeout, f"{count} routes")

    def wait_present(self, dest: DestKey, timeout: float = 10) -> float:
        return self.wait(lambda routes: dest in routes, timeout, "a route to appear")

    def wait_absent(self, dest: DestKey, timeout: float = 10) -> float:
        return self.wait(lambda routes: dest not in routes, timeout, "a route to go")

    def _resync(self) -> None:
        routes = {dest_key(key) for key in self._dumps.observe().owned}
        with self._cond:
            self._present = routes
            self._changed(time.monotonic())

    def _changed(self, now: float) -> None:
        # Called with the lock held.
        if self._until is not None and self._met is None and self._until(self._present):
            self._met = now
            self._cond.notify_all()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._events.sock, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            while True:
                try:
                    data = self._events.sock.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # Announcements were dropped: read the table instead.
                    self._resync()
                    continue
                self._take(data, time.monotonic())

    def _take(self, data: bytes, now: float) -> None:
        offset = 0
        with self._cond:
            while offset + 16 <= len(data):
                length, kind = _NLMSGHDR.unpack_from(data, offset)
                route = parse_route(data[offset + 16 : offset + length])
                offset += max(16, (length + 3) & ~3)
                if (
                    route is None
                    or route.protocol != RTPROT_CLOUDROUTES
                    or route.table != RT_TABLE_MAIN
                ):
                    continue
                if kind == RTM_NEWROUTE:
                    self._present.add(route.key)
                elif kind == RTM_DELROUTE:
                    self._present.discard(route.key)
            self._changed(now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._events.close()
        self._dumps.close()


def scrape(netns: str, port: int = HEALTHZ_PORT) -> dict[str, float]:
    """The agent's /metrics, fetched over a socket opened inside its namespace; histogram
    buckets are left out and labels summed over (there is one route table)."""
    sock = in_netns(netns, lambda: socket.create_connection(("127.0.0.1", port), timeout=10))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.sock = sock
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith(("_bucket", "_created")):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def programmed(n: int) -> Callable[[dict[str, float]], bool]:
    """Whether the agent's metrics count ``n`` routes programmed: the pass that wrote the last
    route has recorded its duration."""
    return lambda m: m.get("cloudroutes_routes_programmed", 0) >= n


def passes(at_least: float) -> Callable[[dict[str, float]], bool]:
    return lambda m: m.get(PASSES, 0) >= at_least


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmHWM is the peak resident set)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0])
    return fields


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class AgentLab:
    """The node (namespace, agent), the etcd machine and the helpers, as a context manager."""

    def __init__(self) -> None:
        self.cluster = LabCluster(0, network="10.0.0.0/8")
        self._addresses = itertools.count(1)
        self._closers: list[Callable[[], None]] = []
        self._node: LabNode | None = None
        self._etcd: EtcdPeer | None = None
        self._watch: RouteWatch | None = None
        self._sigterm: Any = None
        self._log_offset = 0
        self._started_wall = 0.0

    def __enter__(self) -> AgentLab:
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.cluster.build()
            self.cluster.set_config(NETWORK_CONFIG)
            self._node = self.add_node()
            self._etcd = self._closing(EtcdPeer(self.cluster.etcdctl_ns(), self.endpoint))
            self._watch = self._closing(RouteWatch(self._node.ns.name))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _closing(self, thing: C) -> C:
        self._closers.append(thing.close)
        return thing

    @property
    def endpoint(self) -> str:
        return self.cluster.endpoints.split(",")[0]

    @property
    def node(self) -> LabNode:
        assert self._node is not None
        return self._node

    @property
    def etcd(self) -> EtcdPeer:
        assert self._etcd is not None
        return self._etcd

    @property
    def routes(self) -> RouteWatch:
        assert self._watch is not None
        return self._watch

    def add_node(self) -> LabNode:
        """A namespace on the switch at the next 198.18.0.x, as a /15 so every peer is on-link."""
        node = self.cluster.add_node(next(self._addresses))
        node.ns.ip("addr", "flush", "dev", "eth0")
        node.ns.ip("addr", "add", f"{node.address}/{UNDERLAY_PREFIX}", "dev", "eth0")
        return node

    def watcher(self, prefix: str) -> EtcdWatcher:
        """A bare pyetcd watcher in the node's namespace."""
        return self._closing(EtcdWatcher(self.node.ns, self.endpoint, prefix))

    # --- the agent ------------------------------------------------------------------------------

    def start_agent(self) -> float:
        """Start the node's agent; returns the time just before its process was made."""
        self._log_offset = self.node.log_file.stat().st_size if self.node.log_file.exists() else 0
        started = time.monotonic()
        self._started_wall = time.time()
        self.cluster.start_agent(self.node, f"--healthz-port={HEALTHZ_PORT}")
        return started

    def logged_after_start(self, message: str) -> float:
        """Seconds from the agent's start to the first line of its log holding ``message``.

        The log's times are wall-clock to the millisecond; good enough to split a cold start
        of seconds into its stages.
        """
        with self.node.log_file.open("rb") as log:
            log.seek(self._log_offset)
            for raw in log:
                line = raw.decode(errors="replace")
                if message in line:
                    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                    return stamp.timestamp() - self._started_wall
        raise LookupError(f"the agent has not logged {message!r} yet")

    def wait_ready(self) -> None:
        self.cluster.wait_ready(self.node)

    def stop_agent(self) -> None:
        self.cluster.stop_agent(self.node)

    @property
    def agent_pid(self) -> int:
        assert self.node.agent is not None
        # `ip netns exec` execs the agent, so this is the agent's own Python process.
        return self.node.agent.pid

    def metrics(self) -> dict[str, float]:
        return scrape(self.node.ns.name)

    def metrics_when(
        self, done: Callable[[dict[str, float]], bool], timeout: float = 30
    ) -> dict[str, float]:
        """The agent's metrics once ``done`` holds for them. A route reaches the kernel before
        the pass that wrote it records its duration, so a scrape right then may miss it."""
        deadline = time.monotonic() + timeout
        while not done(values := self.metrics()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the agent's metrics did not settle: {values}")
            time.sleep(0.02)
        return values

    def flush_routes(self) -> None:
        """Remove the agent's routes (it leaves them when it stops), as on a new node."""
        self.node.ns.ip("route", "flush", "proto", str(RTPROT_CLOUDROUTES))
        self.routes.wait_count(0, timeout=30)

    # --- the baseline ---------------------------------------------------------------------------

    def ip_batch(self, leases: Iterable[PeerLease], repeat: int = 3) -> float:
        """The best of ``repeat`` runs of ``ip -batch`` adding the routes the leases ask for,
        each into a fresh namespace on the same switch."""
        commands = script("add", [p.route for p in leases])
        fresh: list[LabNode] = []

        def make() -> None:
            fresh.append(self.add_node())

        def add() -> None:
            subprocess.run(
                ["ip", "-n", fresh[-1].ns.name, "-batch", "-"],
                input=commands,
                text=True,
                check=True,
            )

        try:
            return best_of(repeat, add, make)
        finally:
            for node in fresh:
                node.ns.delete()
                self.cluster.nodes.remove(node)

    # --- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        # A Ctrl-C or SIGTERM in the middle of the cleanup would leave namespaces behind: hold
        # it until everything is removed, then act on it.
        held: list[int] = []
        previous: dict[int, Any] = {}
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, lambda signum, frame: held.append(signum))
        try:
            for close in reversed(self._closers):
                try:
                    close()
                except Exception as exc:
                    print(f"  (cleanup: {exc})", flush=True)
            self._closers.clear()
            self.cluster.close()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous[signal.SIGINT])
                # SIGTERM goes back to what it was before the lab (SIG_DFL is falsy: no `or`).
                sigterm, self._sigterm = self._sigterm, None
                signal.signal(
                    signal.SIGTERM, previous[signal.SIGTERM] if sigterm is None else sigterm
                )
        if held:
            raise KeyboardInterrupt

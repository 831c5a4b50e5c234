"""The vxlan route table: one entry per peer, made of three kernel entries, as
flanneld makes them.

A table serves one device and its address family: ``flannel.<VNI>`` for IPv4 peers,
``flannel-v6.<VNI>`` for IPv6 ones (a dual-stack backend has one table each, sharing one
``KernelRouteTable``; each reports only the routes of its own family). A peer is reached
through the device with, in this order:

1. a permanent neighbour entry: the peer's VTEP address (its subnet's network address) has the
   peer's VtepMAC, so the kernel never ARPs (or sends neighbour solicitations) across the
   overlay;
2. a permanent FDB entry (``self``): frames for that MAC go to the peer's public address of
   the family (PublicIP, or PublicIPv6 on the IPv6 device);
3. the route ``<subnet> via <VTEP address> dev <device> onlink``, with cloudroutes' rt
   protocol (157), last, so no packet takes it before its neighbour and FDB entries exist.

The routes live in a ``KernelRouteTable`` (ownership, batching, drift of routes); this table
adds the neighbour and FDB entries around it. Plain routes (DirectRouting's host-gw routes, the
blackhole of ``--ip-blackhole-route``) pass straight through to it, so every route of ours is in
one kernel table, as that table requires.

Ownership: the device is cloudroutes' own, so every permanent neighbour and FDB entry on it is
ours. A peer is reported owned only when its route is ours and its neighbour and FDB entries
agree with it; a route of ours whose other entries are missing or different is reported
BROKEN, so the reconciler replaces it whole. flanneld's own peers (the same three entries with
a ``proto boot`` route) are adoptable in place.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from cloudroutes.errors import Rejected, RouteError, RouteNotFound, Transient
from cloudroutes.routes import (
    Action,
    Change,
    Entry,
    EntryState,
    Foreign,
    Observation,
    Observed,
    Outcome,
    Plan,
    Route,
    TableLimits,
)
from providers.kernel import KernelRouteTable
from providers.netlink import (
    BATCH,
    IFF_UP,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    RECV_SIZE,
    Netlink,
    NetlinkError,
    attributes,
    get_link,
    messages,
)

log = logging.getLogger(__name__)

RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
NDA_DST = 1
NDA_LLADDR = 2
NDA_IFINDEX = 8
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTN_UNICAST = 1
AF_BRIDGE = 7
RTMGRP_NEIGH = 0x4
_NDMSG = struct.Struct("=BBHiHBB")
_U32_ATTR = struct.Struct("=HHI")
_MAC_ATTR = struct.Struct("=HH6sxx")
_ZERO_MAC = "00:00:00:00:00:00"
_WATCH_POLL = 0.2
_WATCH_RETRY = 1.0


@dataclass(frozen=True)
class VxlanPeer:
    """One remote node reached over vxlan: its subnet, VTEP address and MAC, and public IP.

    ``public_ip`` or ``mac`` are empty in an observed peer whose FDB or neighbour entry is
    missing (a BROKEN peer).
    """

    destination: IPv4Network | IPv6Network
    vtep_ip: str
    mac: str
    public_ip: str
    device: str
    lease_key: str = field(default="", compare=False)

    @property
    def key(self) -> IPv4Network | IPv6Network:
        return self.destination

    @property
    def route(self) -> Route:
        """Step 3: the route through the device."""
        return Route(self.destination, self.vtep_ip, self.device, True, self.lease_key)

    def sort_key(self) -> tuple[Any, ...]:
        # The route's own sort key, so that peers and plain routes sort together.
        return self.route.sort_key()

    def __str__(self) -> str:
        return (
            f"{self.destination} via {self.vtep_ip} dev {self.device} onlink "
            f"(lladdr {self.mac or '?'}, dst {self.public_ip or '?'})"
        )


def _route_of(entry: Entry | None) -> Route | None:
    if isinstance(entry, VxlanPeer):
        return entry.route
    return entry if isinstance(entry, Route) else None


def _mac_text(raw: bytes) -> str:
    return raw.hex(":")


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


@dataclass
class _Step:
    """One peer change as it goes through the three kernel steps."""

    change: Change
    peer: VxlanPeer | None  # the peer it programs (None for a delete or a plain route)
    old: VxlanPeer | None  # the peer whose entries it removes or may leave stale
    error: RouteError | None = None
    neighbour_done: bool = False
    fdb_done: bool = False
    # Its route moves onto the device from another one: deleted there, then added (IPv6).
    moved: bool = False


class VxlanRouteTable:
    """Peers on one vxlan device plus plain routes of the same address family, in the main
    kernel table (module doc).

    ``ensure_device`` is the backend's: it creates (or repairs) the device and returns nothing;
    apply() calls it when the device is missing and a peer needs it, so a deleted device comes
    back with every peer on the next pass. ``family`` is ``socket.AF_INET`` or ``AF_INET6``: the
    peers' addresses and the routes this table reports; ``routes`` may be shared with the table
    of the other family.
    """

    def __init__(
        self,
        device: str,
        *,
        ensure_device: Callable[[], None],
        netns: str | None = None,
        routes: KernelRouteTable | None = None,
        name: str = "kernel",
        batch: int = BATCH,
        family: int = socket.AF_INET,
    ) -> None:
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"a vxlan table serves AF_INET or AF_INET6, not family {family}")
        self.device = device
        self.family = family
        self._version = 4 if family == socket.AF_INET else 6
        self.name = name
        self.netns = netns
        self.batch = batch
        self._ensure_device = ensure_device
        self._routes = routes or KernelRouteTable(netns=netns, name=name)
        self.resync_period = self._routes.resync_period
        self.limits = TableLimits()
        self._lock = threading.Lock()
        self._nl: Netlink | None = None
        # What our entries should be, for the drift watch (replaced whole, never changed).
        self._want_neighbours: dict[str, str] = {}
        self._want_fdb: dict[str, str] = {}
        self._ifindex = 0

    def close(self) -> None:
        with self._lock:
            if self._nl is not None:
                self._nl.close()
                self._nl = None
        self._routes.close()

    # --- netlink --------------------------------------------------------------------------------

    def _call(self, work: Callable[[Netlink], Any]) -> Any:
        """Run ``work`` on the socket; a broken or silent socket is reopened next time."""
        with self._lock:
            try:
                if self._nl is None:
                    self._nl = Netlink(self.netns)
                return work(self._nl)
            except NetlinkError as exc:  # the kernel refused a request: the socket is fine
                raise Transient(f"netlink: {exc.strerror}") from None
            except (OSError, Transient) as exc:
                if self._nl is not None:
                    self._nl.close()
                    self._nl = None
                if isinstance(exc, Transient):
                    raise
                raise Transient(f"netlink: {exc.strerror or exc}") from None

    def _device_index(self, nl: Netlink) -> int:
        link = get_link(nl, name=self.device)
        return link.index if link is not None else 0

    def _usable_index(self, nl: Netlink) -> int:
        """The device's index when it is up (the kernel refuses routes through a down one)."""
        link = get_link(nl, name=self.device)
        return link.index if link is not None and link.flags & IFF_UP else 0

    def _dump_neighbours(self, nl: Netlink, index: int) -> tuple[dict[str, str], dict[str, str]]:
        """Permanent neighbour entries (VTEP IP -> MAC) and FDB entries (MAC -> remote IP) on
        the device."""
        neighbours: dict[str, str] = {}
        body = _NDMSG.pack(self.family, 0, 0, 0, 0, 0, 0) + _U32_ATTR.pack(8, NDA_IFINDEX, index)
        for kind, payload in nl.dump(RTM_GETNEIGH, body):
            entry = _parse_neighbour(kind, payload, index)
            if entry is not None and payload[0] == self.family and entry[2] & NUD_PERMANENT:
                neighbours[entry[0]] = entry[1]
        fdb: dict[str, str] = {}
        for kind, payload in nl.dump(RTM_GETNEIGH, _NDMSG.pack(AF_BRIDGE, 0, 0, index, 0, 0, 0)):
            entry = _parse_neighbour(kind, payload, index)
            # The kernel keeps one remote per unicast MAC (it refuses to append another), so
            # only the all-zero and multicast entries, never a peer's, have several.
            if entry is not None and not int(entry[1][:2], 16) & 1 and entry[1] != _ZERO_MAC:
                fdb[entry[1]] = entry[0]
        return neighbours, fdb

    # --- observe --------------------------------------------------------------------------------

    def observe(self) -> Observation:
        routes = self._routes.observe()

        def read(nl: Netlink) -> tuple[int, dict[str, str], dict[str, str]]:
            index = self._device_index(nl)
            if not index:
                return 0, {}, {}
            return (index, *self._dump_neighbours(nl, index))

        index, neighbours, fdb = self._call(read)
        self._ifindex = index
        owned: dict[Any, Observed] = {}
        want_neighbours: dict[str, str] = {}
        want_fdb: dict[str, str] = {}
        for key, observed in routes.owned.items():
            route = observed.entry
            assert isinstance(route, Route)
            if route.destination.version != self._version:
                continue  # the other family's table reports it
            if route.device != self.device:
                owned[key] = observed
                continue
            peer = self._peer(route, neighbours, fdb)
            if peer.mac and peer.public_ip and route.onlink:
                owned[key] = Observed(peer)
                want_neighbours[peer.vtep_ip] = peer.mac
                want_fdb[peer.mac] = peer.public_ip
            else:
                owned[key] = Observed(peer, EntryState.BROKEN)
        foreign: dict[Any, Foreign] = {}
        for key, held in routes.foreign.items():
            route = held.entry
            assert isinstance(route, Route)
            if route.destination.version != self._version:
                continue
            if route.device == self.device and route.onlink:
                peer = self._peer(route, neighbours, fdb)
                if peer.mac and peer.public_ip:
                    # flanneld's peer: taken over in place when it is exactly the wanted one.
                    foreign[key] = Foreign(peer, held.holder, adoptable=True, advice=held.advice)
                else:
                    # flanneld's half-made peer on our device: ours to repair.
                    owned[key] = Observed(peer, EntryState.BROKEN)
                continue
            foreign[key] = held
        self._want_neighbours, self._want_fdb = want_neighbours, want_fdb
        return Observation(owned=owned, foreign=foreign)

    def _peer(self, route: Route, neighbours: dict[str, str], fdb: dict[str, str]) -> VxlanPeer:
        mac = neighbours.get(route.next_hop, "")
        public_ip = fdb.get(mac, "") if mac else ""
        assert isinstance(route.destination, IPv4Network | IPv6Network)
        return VxlanPeer(route.destination, route.next_hop, mac, public_ip, self.device)

    # --- apply ----------------------------------------------------------------------------------

    def apply(self, plan: Plan, deadline: float | None = None) -> list[Outcome]:
        # Like the kernel table's, one batched exchange per step: a deadline never matters here.
        steps = [self._step(c) for c in plan]
        if not steps:
            return []
        building = [s for s in steps if s.peer is not None]
        if building:
            index = self._call(self._usable_index)
            if not index:
                # Deleted or set down by hand: the backend makes it whole again.
                try:
                    self._ensure_device()
                except RouteError as exc:
                    for step in building:
                        step.error = exc
                index = self._call(self._usable_index)
            self._ifindex = index
            if not index:
                for step in building:
                    step.error = step.error or Transient(f"device {self.device} does not exist")
            else:
                self._program_neighbours(building, index)
        route_steps = self._move_routes([s for s in steps if s.error is None])
        route_changes = [self._route_change(s) for s in route_steps]
        if route_changes:
            outcomes = self._routes.apply(Plan(tuple(route_changes)))
            for step, outcome in zip(route_steps, outcomes, strict=True):
                step.error = outcome.error
        self._finish(steps)
        return [self._outcome(s) for s in steps]

    @staticmethod
    def _step(change: Change) -> _Step:
        entry, current = change.entry, change.current
        old = current if isinstance(current, VxlanPeer) else None
        if change.action is Action.DELETE:
            return _Step(change, None, entry if isinstance(entry, VxlanPeer) else None)
        return _Step(change, entry if isinstance(entry, VxlanPeer) else None, old)

    @staticmethod
    def _route_change(step: _Step) -> Change:
        change = step.change
        route = _route_of(change.entry)
        assert route is not None
        if step.moved:
            return Change(Action.ADD, route)
        return Change(change.action, route, _route_of(change.current))

    def _move_routes(self, steps: list[_Step]) -> list[_Step]:
        """Delete the routes that peers' routes replace from another device (a DirectRouting
        route, say) and return the steps still to do. IPv6 checks an onlink gateway against
        the routes already there, the one being replaced included, and refuses it as on
        another device ("Nexthop has invalid gateway or device mismatch"), so such a replace
        is a delete and an add. IPv4 replaces in place."""
        if self.family != socket.AF_INET6:
            return steps
        moving = []
        for step in steps:
            change, current = step.change, _route_of(step.change.current)
            if (
                change.action is Action.REPLACE
                and isinstance(change.entry, VxlanPeer)
                and current is not None
                and current.device != self.device
            ):
                step.moved = True
                moving.append(step)
        if not moving:
            return steps
        deletes = []
        for step in moving:
            current = _route_of(step.change.current)
            assert current is not None
            deletes.append(Change(Action.DELETE, current))
        outcomes = self._routes.apply(Plan(tuple(deletes)))
        for step, outcome in zip(moving, outcomes, strict=True):
            if outcome.error is not None and not isinstance(outcome.error, RouteNotFound):
                step.error = outcome.error
        return [s for s in steps if s.error is None]

    def _program_neighbours(self, steps: list[_Step], index: int) -> None:
        """Steps 1 and 2 for every peer, each step one batch."""
        want_neighbours = dict(self._want_neighbours)
        want_fdb = dict(self._want_fdb)
        for step in steps:
            assert step.peer is not None
            want_neighbours[step.peer.vtep_ip] = step.peer.mac
            want_fdb[step.peer.mac] = step.peer.public_ip
        self._want_neighbours, self._want_fdb = want_neighbours, want_fdb
        live = self._send(
            steps,
            lambda s: _neighbour_request(RTM_NEWNEIGH, index, s.peer.vtep_ip, s.peer.mac),  # type: ignore[union-attr]
            "neighbour",
        )
        for step in live:
            step.neighbour_done = True
        for step in self._send(
            live,
            lambda s: _fdb_request(RTM_NEWNEIGH, index, s.peer.mac, s.peer.public_ip),  # type: ignore[union-attr]
            "FDB entry",
        ):
            step.fdb_done = True

    def _send(
        self, steps: list[_Step], request: Callable[[_Step], tuple[int, int, bytes]], what: str
    ) -> list[_Step]:
        """Send one request per step in batches; the steps that succeeded (the others get
        their error)."""
        if not steps:
            return []
        try:
            results = self._call(lambda nl: nl.transact([request(s) for s in steps], self.batch))
        except Transient as exc:
            for step in steps:
                step.error = Transient(f"{step.change.entry}: {what}: {exc}")
            return []
        done: list[_Step] = []
        for step, result in zip(steps, results, strict=True):
            if result is None:
                done.append(step)
            else:
                step.error = _classify(step.change, what, result)
        return done

    def _finish(self, steps: list[_Step]) -> None:
        """Remove what is no longer wanted: a deleted peer's neighbour and FDB entries, a
        replaced peer's stale FDB entry, and the first steps of a peer whose route failed."""
        index = self._ifindex
        if not index:
            return
        neighbours: list[tuple[str, str]] = []
        fdb: list[str] = []
        want_neighbours = dict(self._want_neighbours)
        want_fdb = dict(self._want_fdb)
        for step in steps:
            gone = step.change.action is Action.DELETE and (
                step.error is None or isinstance(step.error, RouteNotFound)
            )
            switched = step.peer is None and step.old is not None and step.error is None
            if (gone or switched) and step.old is not None:
                old = step.old
                neighbours.append((old.vtep_ip, old.mac))
                if old.mac:
                    fdb.append(old.mac)
            elif step.peer is not None and step.error is None:
                # A peer with a new VtepMAC (#1795): its old MAC's FDB entry is stale.
                old = step.old
                if old is not None and old.mac and old.mac != step.peer.mac:
                    fdb.append(old.mac)
                    want_fdb.pop(old.mac, None)
                continue
            elif step.peer is not None and step.change.action is Action.ADD:
                # Undo: a failed new peer leaves nothing behind.
                if step.fdb_done:
                    fdb.append(step.peer.mac)
                if step.neighbour_done:
                    neighbours.append((step.peer.vtep_ip, step.peer.mac))
                old = step.peer
            else:
                continue
            if want_neighbours.get(old.vtep_ip) == old.mac:
                want_neighbours.pop(old.vtep_ip)
            want_fdb.pop(old.mac, None)
        self._want_neighbours, self._want_fdb = want_neighbours, want_fdb
        requests = [_fdb_request(RTM_DELNEIGH, index, mac, "") for mac in fdb]
        requests += [_neighbour_request(RTM_DELNEIGH, index, ip, mac) for ip, mac in neighbours]
        if not requests:
            return
        try:
            results = self._call(lambda nl: nl.transact(requests, self.batch))
        except Transient as exc:
            log.warning("%s: cannot remove stale neighbour/FDB entries: %s", self.name, exc)
            return
        for result in results:
            if result is not None and result.errno not in (errno.ENOENT, errno.ESRCH):
                log.warning("%s: removing a stale entry on %s: %s", self.name, self.device, result)

    @staticmethod
    def _outcome(step: _Step) -> Outcome:
        # After a failure the table is read again (present UNKNOWN), as the kernel table's.
        return Outcome(step.change, step.error)

    # --- drift ----------------------------------------------------------------------------------

    def watch_drift(self, notify: Callable[[], None], stop: threading.Event) -> None:
        """The kernel table's watch (our routes, the device) plus our neighbour and FDB
        entries: deleting or changing one by hand calls ``notify``."""
        routes = threading.Thread(
            target=self._routes.watch_drift,
            args=(notify, stop),
            name=f"drift-{self.name}-routes",
            daemon=True,
        )
        routes.start()
        try:
            while not stop.is_set():
                try:
                    self._watch_neighbours(notify, stop)
                except OSError as exc:
                    log.warning(
                        "%s: neighbour drift watch failed, restarting it: %s", self.name, exc
                    )
                    notify()
                    stop.wait(_WATCH_RETRY)
        finally:
            routes.join()

    def _watch_neighbours(self, notify: Callable[[], None], stop: threading.Event) -> None:
        nl = Netlink(self.netns, RTMGRP_NEIGH)
        try:
            nl.sock.settimeout(_WATCH_POLL)
            while not stop.is_set():
                try:
                    data = nl.sock.recv(RECV_SIZE)
                except TimeoutError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    notify()  # events were lost
                    continue
                if any(
                    self._is_drift(kind, data[lo:hi])
                    for kind, _f, _s, _p, lo, hi in messages(data, len(data))
                ):
                    notify()
        finally:
            nl.close()

    def _is_drift(self, kind: int, payload: bytes) -> bool:
        """An event that disagrees with what our entries should be (our own writes agree)."""
        if kind not in (RTM_NEWNEIGH, RTM_DELNEIGH) or not self._ifindex:
            return False
        entry = _parse_neighbour(kind, payload, self._ifindex)
        if entry is None:
            return False
        family = payload[0]
        ip, mac, state = entry
        if family == self.family:
            want = self._want_neighbours.get(ip)
            if want is None:
                return False
            return kind == RTM_DELNEIGH or want != mac or not state & NUD_PERMANENT
        if family != AF_BRIDGE:
            return False  # the other family's neighbours (IPv6 ones of flannel.1's link-local)
        want = self._want_fdb.get(mac)
        if want is None:
            return False
        return (kind == RTM_DELNEIGH) == (want == ip)


# --- the neighbour codec --------------------------------------------------------------------------


_ADDRESS_FAMILY = {4: socket.AF_INET, 16: socket.AF_INET6}


def _parse_neighbour(kind: int, payload: bytes, index: int) -> tuple[str, str, int] | None:
    """(IP, MAC, state) of a neighbour entry (IPv4 or IPv6) or an FDB entry (its remote of
    either family) on device ``index``; None otherwise."""
    if kind not in (RTM_NEWNEIGH, RTM_DELNEIGH) or len(payload) < _NDMSG.size:
        return None
    family, _pad1, _pad2, ifindex, state, _flags, _type = _NDMSG.unpack_from(payload, 0)
    if ifindex != index or family not in (socket.AF_INET, socket.AF_INET6, AF_BRIDGE):
        return None
    ip = mac = ""
    for attr, lo, hi in attributes(payload, _NDMSG.size, len(payload)):
        if attr == NDA_DST and hi - lo in _ADDRESS_FAMILY:
            ip = socket.inet_ntop(_ADDRESS_FAMILY[hi - lo], payload[lo:hi])
        elif attr == NDA_LLADDR and hi - lo == 6:
            mac = _mac_text(payload[lo:hi])
    if not mac or (family != AF_BRIDGE and not ip):
        return None
    return ip, mac, state


def _dst_attr(ip: str) -> bytes:
    """NDA_DST: 4 bytes for an IPv4 address, 16 for an IPv6 one."""
    packed = ip_address(ip).packed
    return struct.pack(f"=HH{len(packed)}s", 4 + len(packed), NDA_DST, packed)


def _neighbour_request(kind: int, index: int, ip: str, mac: str) -> tuple[int, int, bytes]:
    """Step 1 (or its removal): the permanent neighbour entry ``ip lladdr mac``."""
    family = _ADDRESS_FAMILY[len(ip_address(ip).packed)]
    body = _NDMSG.pack(family, 0, 0, index, NUD_PERMANENT, 0, RTN_UNICAST) + _dst_attr(ip)
    if kind == RTM_NEWNEIGH:
        body += _MAC_ATTR.pack(10, NDA_LLADDR, _mac_bytes(mac))
        return kind, NLM_F_CREATE | NLM_F_REPLACE, body
    return kind, 0, body


def _fdb_request(kind: int, index: int, mac: str, dst: str) -> tuple[int, int, bytes]:
    """Step 2 (or its removal): the permanent FDB entry ``mac dst <dst> self``; a removal
    without ``dst`` removes every remote of that MAC."""
    body = _NDMSG.pack(AF_BRIDGE, 0, 0, index, NUD_PERMANENT, NTF_SELF, 0)
    body += _MAC_ATTR.pack(10, NDA_LLADDR, _mac_bytes(mac))
    if dst:
        body += _dst_attr(dst)
    flags = NLM_F_CREATE | NLM_F_REPLACE if kind == RTM_NEWNEIGH else 0
    return kind, flags, body


def _classify(change: Change, what: str, error: NetlinkError) -> RouteError:
    detail = error.extack or error.strerror
    text = f"{change.entry}: {what}: {detail}"
    if error.errno in (errno.ENODEV, errno.ENOBUFS, errno.EAGAIN, errno.EBUSY, errno.ENOMEM):
        return Transient(text)
    if error.errno in (errno.EPERM, errno.EACCES):
        return Rejected(f"{text}; cloudroutes needs CAP_NET_ADMIN")
    return Rejected(text)


def peers_in(observation: Observation) -> Iterable[VxlanPeer]:
    """The peers of an observation (for tests and tools)."""
    for observed in observation.owned.values():
        if isinstance(observed.entry, VxlanPeer):
            yield observed.entry


__all__: Sequence[str] = ("VxlanPeer", "VxlanRouteTable", "peers_in")

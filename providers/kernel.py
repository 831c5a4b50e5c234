"""The kernel route table over rtnetlink, shared by the kernel backends (host-gw, vxlan, udp).

Ownership: every route cloudroutes writes carries the rt protocol ``RTPROT_CLOUDROUTES`` (157).
``observe()`` reports only routes with that protocol, and deletes name it, so the kernel itself
refuses to delete a route of anyone else (an operator's ``proto static``/``boot`` route, the
kernel's connected routes, bird, zebra, kube-router). 157 is unassigned in the kernel headers
and in iproute2's rt_protos, and is not used by kube-router (0x11), zebra (11), bird (12),
keepalived (18), babel (42), Calico (80) or openr (99). Operators may add
``157 cloudroutes`` to /etc/iproute2/rt_protos.d/ so that ``ip route`` prints the name.

Plans go to the kernel in batches through ``providers.netlink``.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Iterable
from typing import NamedTuple, TypeVar

from cloudroutes.errors import (
    Rejected,
    RouteConflict,
    RouteError,
    RouteNotFound,
    Transient,
)
from cloudroutes.routes import (
    Action,
    Change,
    Destination,
    Foreign,
    Observation,
    Observed,
    Outcome,
    Plan,
    Route,
)
from providers.netlink import (
    BATCH,
    IFF_LOWER_UP,
    IFF_UP,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    RECV_SIZE,
    RT_SCOPE_LINK,
    RT_SCOPE_NOWHERE,
    RT_SCOPE_UNIVERSE,
    RTA_TABLE,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
    RTMSG,
    RTN_NAMES,
    RTN_UNICAST,
    RTNH_F_ONLINK,
    U32,
    U32_ATTR,
    DestKey,
    KernelRoute,
    Netlink,
    NetlinkError,
    dest_key,
    get_link,
    key_destination,
    messages,
    packed_gateway,
    parse_link,
    parse_route,
    route_message,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
_WATCH_RETRY = 1.0
_WATCH_POLL_MS = 200

RTPROT_CLOUDROUTES = 157
RTPROT_BOOT = 3  # what `ip route add` and flanneld (vishvananda/netlink) leave unset
RTN_BLACKHOLE = 6
BLACKHOLE = "blackhole"  # a Route's next hop for a route that drops its packets
RT_TABLE_MAIN = 254

# --- the route table -----------------------------------------------------------------------------


class _Pending(NamedTuple):
    """A change ready to send, or the outcome it already has."""

    change: Change
    request: tuple[int, int, bytes] | None = None
    error: RouteError | None = None


class KernelRouteTable:
    """Routes in one kernel table, owned through an rt protocol number (see the module doc).

    Keep one object per namespace, protocol and table: two would each see the other's routes
    as their own and delete them. A backend with several kinds of routes (vxlan with
    DirectRouting) puts them all in one table.

    ``offlink_hint`` finishes the message of a route refused because its next hop is not on-link
    (host-gw says: put every node in one L2 segment, or use vxlan).
    """

    resync_period: float = 10.0

    def __init__(
        self,
        *,
        netns: str | None = None,
        protocol: int = RTPROT_CLOUDROUTES,
        table: int = RT_TABLE_MAIN,
        name: str = "kernel",
        offlink_hint: str = "",
        resync_period: float = 10.0,
        batch: int = BATCH,
    ) -> None:
        if not 0 < protocol < 256:
            raise ValueError(f"rt protocol must be 1..255, not {protocol}")
        self.netns = netns
        self.protocol = protocol
        self.table = table
        self.name = name
        self.offlink_hint = offlink_hint
        self.resync_period = resync_period
        self.batch = batch
        self._lock = threading.Lock()
        self._nl: Netlink | None = None
        # Shared with watch_drift's thread; each is replaced whole, never changed in place.
        self._own_port: int | None = None
        # Destinations we hold or want: a foreign route event there is drift too. Observe also
        # reuses the Destination objects, which are slow to build.
        self._known: dict[DestKey, Destination] = {}
        self._devices: frozenset[str] = frozenset()
        self._indexes: frozenset[int] = frozenset()

    # --- plumbing -------------------------------------------------------------------------------

    def _netlink(self) -> Netlink:
        if self._nl is None:
            try:
                self._nl = Netlink(self.netns)
            except FileNotFoundError:
                raise Transient(f"network namespace {self.netns} does not exist") from None
            except OSError as exc:
                raise Transient(f"cannot open a netlink socket: {exc.strerror}") from None
            self._own_port = self._nl.port
        return self._nl

    def _reset(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def close(self) -> None:
        with self._lock:
            self._reset()

    def _call(self, work: Callable[[Netlink], T]) -> T:
        """Run ``work`` on the socket; a broken socket becomes Transient and is reopened later."""
        with self._lock:
            nl = self._netlink()
            try:
                return work(nl)
            except Transient:
                self._reset()
                raise
            except RouteError:
                raise
            except NetlinkError as exc:
                raise Transient(f"netlink: {exc.strerror}") from None
            except OSError as exc:
                self._reset()
                raise Transient(f"netlink: {exc.strerror or exc}") from None

    # --- observe --------------------------------------------------------------------------------

    def _kernel_routes(self, nl: Netlink, protocol: int | None = None) -> list[KernelRoute]:
        """Routes of our table in both families, of one rt protocol (ours by default), or of
        every protocol when ``protocol`` is 0."""
        out: list[KernelRoute] = []
        protocol = self.protocol if protocol is None else protocol
        for family in (socket.AF_INET, socket.AF_INET6):
            # The kernel filters on protocol and table (strict checking); we filter again for
            # kernels that ignore the filter.
            body = RTMSG.pack(family, 0, 0, 0, 0, protocol, 0, 0, 0)
            try:
                messages = nl.dump(RTM_GETROUTE, body + U32_ATTR.pack(8, RTA_TABLE, self.table))
            except NetlinkError as exc:
                if exc.errno == errno.ENOENT:  # the table does not exist yet: nothing in it
                    continue
                if exc.errno == errno.EAFNOSUPPORT and family == socket.AF_INET6:
                    continue  # IPv6 is disabled on this host
                raise
            for kind, payload in messages:
                if kind != RTM_NEWROUTE:
                    continue
                route = parse_route(payload)
                if route is None or route.table != self.table:
                    continue
                if protocol and route.protocol != protocol:
                    continue
                out.append(route)
        return out

    def observe(self) -> Observation:
        """Our routes, and the ``proto boot`` ones as adoptable foreign routes: that is what
        flanneld (and a plain ``ip route add``) leaves, so a node switching from flanneld can
        take its routes over in place when they are exactly what a lease wants."""

        def read(nl: Netlink) -> tuple[list[KernelRoute], list[KernelRoute], dict[int, str]]:
            found = self._kernel_routes(nl)
            boot = [r for r in self._kernel_routes(nl, RTPROT_BOOT) if r.rtype == RTN_UNICAST]
            names: dict[int, str] = {}
            for index in {r.oif for r in (*found, *boot) if r.oif}:
                link = get_link(nl, index=index)
                if link is not None:
                    names[index] = link.name
            return found, boot, names

        found, boot, names = self._call(read)
        known = self._known
        fresh: dict[DestKey, Destination] = {}
        owned: dict[Destination, Observed] = {}
        for r in found:
            destination = known.get(r.key)
            if destination is None:
                destination = key_destination(r.key)
            fresh[r.key] = destination
            owned[destination] = Observed(self._as_route(r, destination, names))
        foreign: dict[Destination, Foreign] = {}
        for r in boot:
            destination = key_destination(r.key)
            if destination not in owned:
                foreign[destination] = Foreign(
                    self._as_route(r, destination, names),
                    holder=f"a route cloudroutes does not own ({r.describe(names.get(r.oif))})",
                    adoptable=True,
                    advice=self._conflict_advice(destination),
                )
        self._known = fresh
        self._watch_devices(names.values(), names.keys())
        return Observation(owned=owned, foreign=foreign)

    @staticmethod
    def _as_route(r: KernelRoute, destination: Destination, names: dict[int, str]) -> Route:
        next_hop = r.gateway if r.rtype == RTN_UNICAST else RTN_NAMES.get(r.rtype, "?")
        return Route(destination, next_hop, names.get(r.oif), r.onlink)

    def _watch_devices(self, names: Iterable[str], indexes: Iterable[int]) -> None:
        self._devices = self._devices | set(names)
        self._indexes = self._indexes | set(indexes)

    # --- apply ----------------------------------------------------------------------------------

    def apply(self, plan: Plan, deadline: float | None = None) -> list[Outcome]:
        # One batched netlink exchange is fast enough that a deadline never matters here.
        changes = list(plan)
        if not changes:
            return []
        known = dict(self._known)
        for change in changes:
            if change.action is not Action.DELETE:
                destination = _route(change).destination
                known.setdefault(dest_key(destination), destination)
        self._known = known
        return self._call(lambda nl: self._apply(nl, changes))

    def _apply(self, nl: Netlink, changes: list[Change]) -> list[Outcome]:
        devices = self._resolve_devices(nl, changes)
        pending = [self._encode(c, devices) for c in changes]
        sendable = [p for p in pending if p.request is not None]
        results = nl.transact([p.request for p in sendable], self.batch)  # type: ignore[misc]
        errors: dict[int, RouteError | None] = {id(p.change): p.error for p in pending}
        existing: list[_Pending] = []
        for item, result in zip(sendable, results, strict=True):
            if result is not None and result.errno == errno.EEXIST:
                existing.append(item)
            else:
                errors[id(item.change)] = self._classify(item.change, result)
        if existing:
            errors.update(self._resolve_existing(nl, existing))
        return [Outcome(c, errors[id(c)]) for c in changes]

    def _resolve_devices(self, nl: Netlink, changes: list[Change]) -> dict[str, int | None]:
        names = {
            _route(c).device for c in changes if _route(c).device and c.action is not Action.DELETE
        }
        devices: dict[str, int | None] = {}
        for name in names:
            link = get_link(nl, name=name)
            devices[name] = link.index if link is not None else None
        self._watch_devices(names, (i for i in devices.values() if i))
        return devices

    def _encode(self, change: Change, devices: dict[str, int | None]) -> _Pending:
        route = _route(change)
        key = dest_key(route.destination)
        gateway = packed_gateway(route.next_hop, len(key[0]))
        if change.action is Action.DELETE:
            # Naming our protocol makes the kernel match only our route at that destination.
            body = route_message(
                key,
                protocol=self.protocol,
                table=self.table,
                scope=RT_SCOPE_NOWHERE,
                rtype=0,
                gateway=gateway if isinstance(gateway, bytes) else None,
            )
            return _Pending(change, (RTM_DELROUTE, 0, body))
        if route.next_hop == BLACKHOLE:
            body = route_message(
                key,
                protocol=self.protocol,
                table=self.table,
                scope=RT_SCOPE_UNIVERSE,
                rtype=RTN_BLACKHOLE,
            )
            flags = NLM_F_CREATE | (NLM_F_EXCL if change.action is Action.ADD else NLM_F_REPLACE)
            return _Pending(change, (RTM_NEWROUTE, flags, body))
        if isinstance(gateway, str):
            return _Pending(change, error=Rejected(f"{route}: {gateway}"))
        oif = 0
        if route.device:
            index = devices.get(route.device)
            if index is None:
                # A device that a backend is (re)creating comes back; retry rather than fail.
                return _Pending(
                    change, error=Transient(f"{route}: device {route.device} does not exist")
                )
            oif = index
        elif gateway is None:
            return _Pending(
                change, error=Rejected(f"{route}: a route needs a next hop or a device")
            )
        body = route_message(
            key,
            protocol=self.protocol,
            table=self.table,
            scope=RT_SCOPE_LINK if gateway is None else RT_SCOPE_UNIVERSE,
            rtype=RTN_UNICAST,
            flags=RTNH_F_ONLINK if route.onlink else 0,
            gateway=gateway,
            oif=oif,
        )
        if change.action is Action.ADD:
            return _Pending(change, (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body))
        # REPLACE is planned only over a route of ours, ADOPT over an identical proto boot
        # route: the kernel swaps the route in place, so traffic never lacks one. CREATE also
        # covers a route that vanished since it was observed.
        return _Pending(change, (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body))

    def _classify(self, change: Change, error: NetlinkError | None) -> RouteError | None:
        if error is None:
            return None
        route = _route(change)
        code = error.errno
        detail = error.extack or os.strerror(code)
        if code in (errno.ESRCH, errno.ENOENT):
            return RouteNotFound(f"{route}: no such route of ours in the kernel")
        if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            text = f"{route.destination}: next hop {route.next_hop} is not on-link"
            if route.device:
                text += f" on {route.device}"
            if self.offlink_hint:
                text += f": {self.offlink_hint}"
            return Rejected(f"{text} (kernel: {detail})")
        if code in (errno.EPERM, errno.EACCES):
            return Rejected(f"{route}: {detail}; cloudroutes needs CAP_NET_ADMIN")
        if code == errno.ENODEV:
            return Transient(f"{route}: device {route.device} does not exist")
        if code in (errno.ENOBUFS, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ENOMEM):
            return Transient(f"{route}: {detail}")
        return Rejected(f"{change.action.value} {route}: {detail}")

    def _resolve_existing(self, nl: Netlink, items: list[_Pending]) -> dict[int, RouteError | None]:
        """ADDs refused with EEXIST: replace the ones where a route of ours stands (our picture
        was stale), and report the foreign ones as conflicts naming who holds the destination."""
        present: dict[DestKey, list[KernelRoute]] = {}
        for route in self._kernel_routes(nl, 0):
            present.setdefault(route.key, []).append(route)
        out: dict[int, RouteError | None] = {}
        ours: list[_Pending] = []
        for item in items:
            holders = present.get(dest_key(_route(item.change).destination), [])
            foreign = [r for r in holders if r.protocol != self.protocol]
            if foreign:
                out[id(item.change)] = self._conflict(nl, _route(item.change), foreign[0])
            elif holders:
                ours.append(item)
            else:
                out[id(item.change)] = Transient(
                    f"{_route(item.change)}: the kernel reported a route there that is gone now"
                )
        if ours:
            requests = [
                (kind, NLM_F_CREATE | NLM_F_REPLACE, body)
                for kind, _flags, body in (i.request for i in ours)  # type: ignore[misc]
            ]
            for item, result in zip(ours, nl.transact(requests, self.batch), strict=True):
                out[id(item.change)] = self._classify(item.change, result)
        return out

    def _conflict(self, nl: Netlink, route: Route, holder: KernelRoute) -> RouteConflict:
        link = get_link(nl, index=holder.oif) if holder.oif else None
        return RouteConflict(
            f"{route.destination} is held by a route cloudroutes does not own "
            f"({holder.describe(link.name if link else None)}); "
            + self._conflict_advice(route.destination)
        )

    def _conflict_advice(self, destination: Destination) -> str:
        family = "-6 " if destination.version == 6 else ""
        table = "" if self.table == RT_TABLE_MAIN else f" table {self.table}"
        return (
            "if this subnet belongs to the pod network, delete it: "
            f"ip {family}route del {destination}{table}"
        )

    # --- drift ----------------------------------------------------------------------------------

    def watch_drift(self, notify: Callable[[], None], stop: threading.Event) -> None:
        """Call ``notify`` when someone else changes or deletes one of our routes, puts a route
        at a destination we use, or changes a device we route through (up/down, addresses).

        Blocks until ``stop`` is set, and returns within about 0.2 s of it.
        """
        groups = (
            RTMGRP_LINK
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_ROUTE
        )
        while not stop.is_set():
            try:
                nl = Netlink(self.netns, groups)
            except OSError as exc:
                log.warning("%s: cannot watch for drift: %s", self.name, exc)
                stop.wait(_WATCH_RETRY)
                continue
            link_states: dict[int, int] = {}
            try:
                poller = select.poll()
                poller.register(nl.sock, select.POLLIN)
                while not stop.is_set():
                    if poller.poll(_WATCH_POLL_MS) and self._drained_drift(nl, link_states):
                        notify()
            except OSError as exc:
                # Events may have been missed: have the table read again, then watch anew.
                log.warning("%s: drift watch failed, restarting it: %s", self.name, exc)
                notify()
                stop.wait(_WATCH_RETRY)
            finally:
                nl.close()

    def _drained_drift(self, nl: Netlink, link_states: dict[int, int]) -> bool:
        """Read every queued event; True when any of them is drift."""
        drift = False
        while True:
            try:
                data = nl.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return drift
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                drift = True  # events were lost: assume the worst
                continue
            for kind, _flags, _seq, pid, start, end in messages(data, len(data)):
                drift |= self._is_drift(kind, pid, data[start:end], link_states)

    def _is_drift(self, kind: int, pid: int, payload: bytes, link_states: dict[int, int]) -> bool:
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            if pid == self._own_port:
                return False  # our own write
            route = parse_route(payload)
            if route is None or route.table != self.table:
                return False
            return route.protocol == self.protocol or route.key in self._known
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            link = parse_link(payload)
            if link.name not in self._devices and link.index not in self._indexes:
                return False
            state = link.flags & (IFF_UP | IFF_LOWER_UP) if kind == RTM_NEWLINK else -1
            before = link_states.get(link.index)
            link_states[link.index] = state
            return before != state
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            # Removing an address drops the IPv4 routes through it without any route event;
            # adding one may make a refused next hop reachable.
            (index,) = U32.unpack_from(payload, 4)
            return index in self._indexes
        return False


def _route(change: Change) -> Route:
    """Kernel tables hold plain routes."""
    entry = change.entry
    assert isinstance(entry, Route), f"a kernel table holds routes, not {entry!r}"
    return entry

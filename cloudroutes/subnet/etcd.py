"""The etcd lease source: flanneld's etcd v3 schema, so both can share one cluster.

Keys live under ``<prefix>/subnets/<key>``, values are encode_attrs() JSON, each key carries an
etcd lease of ``lease_ttl`` seconds (a key without one is a reservation and never expires).
Where flanneld gives up (a lost compare-and-create race, a watch error, a lost lease) this
source retries or repairs.

Everything under the prefix is untrusted: a key that is not exactly a lease key is ignored, a
value that does not decode is skipped (its subnet still counts as taken), each with one warning
per key revision.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network

from cloudroutes.config import NetworkConfig, parse_config
from cloudroutes.errors import ConfigError, LeaseError, LeaseRevoked, StoreUnavailable
from cloudroutes.lease import Lease, LeaseAttrs, decode_attrs, encode_attrs, parse_subnet_key
from cloudroutes.lease_table import EventType, LeaseEvent, LeaseTable
from cloudroutes.subnet.allocation import Allocation, choose_subnet, is_compatible, is_own
from cloudroutes.subnet.etcd_client import (
    Compacted,
    EtcdClient,
    EtcdSettings,
    KeyValue,
    Rewound,
    WatchBatch,
    WatchEvent,
    WatchStream,
)

__all__ = ["CONFIG_NOT_FOUND", "EtcdLeaseSource", "EtcdPeriods", "EtcdSettings"]

log = logging.getLogger(__name__)

CONFIG_NOT_FOUND = (
    "flannel config not found in etcd store. Did you create your config using etcdv3 API?"
)
RACE_RETRIES = 10
# etcd deletes an expired key a little after our clock says the lease ends (we count from the
# grant's answer); a delete seen earlier than this before that was not an expiry.
_EXPIRY_SLACK = 1.0
_SHOWN_KEY = 200  # characters of a bad key shown in a warning


@dataclass(frozen=True)
class EtcdPeriods:
    """Waits of the source's loops, in seconds; flanneld's values by default, short in tests."""

    config_retry: float = 1.0  # between reads of a missing network config
    renew_retry: float = 60.0  # after a failed renewal (at most a tenth of the lease TTL)
    backoff_initial: float = 0.1  # first wait before re-opening a lost watch, doubling...
    backoff_max: float = 5.0  # ...up to this
    poll: float = 0.5  # how often blocked loops look at their stop event
    # The lease watch lists everything again this often: a safety net under lost events.
    relist: float = 600.0


@dataclass
class _Listing:
    leases: list[Lease] = field(default_factory=list)
    # Lease keys whose value does not decode: not routable, but their subnets are taken.
    unreadable: list[Lease] = field(default_factory=list)
    mod_revisions: dict[str, int] = field(default_factory=dict)  # lease key → its last write
    revision: int = 0


class EtcdLeaseSource:
    """The LeaseSource for etcd (cloudroutes.subnet.LeaseSource)."""

    def __init__(self, settings: EtcdSettings, periods: EtcdPeriods | None = None) -> None:
        self._settings = settings
        self._periods = periods or EtcdPeriods()
        self._client = EtcdClient(settings)
        self._skipped = _SkipLog()
        self._problems = _Problems()

    @property
    def settings(self) -> EtcdSettings:
        """How this source reaches etcd, for the connections of cloud ledgers and elections."""
        return self._settings

    @property
    def config_key(self) -> str:
        return f"{self._settings.prefix}/config"

    @property
    def subnets_prefix(self) -> str:
        return f"{self._settings.prefix}/subnets/"

    @property
    def endpoint(self) -> str:
        """The URL of the etcd member in use now."""
        return self._client.endpoint

    @property
    def store_problem(self) -> str | None:
        """Why etcd is not answering the watches or renewals, in one line; None while it is.

        Set and cleared by watch(), watch_config() and keep(), for /readyz and /status.
        """
        return self._problems.first()

    def lease_path(self, lease_key: str) -> str:
        """``10.5.34.0-24`` → ``/coreos.com/network/subnets/10.5.34.0-24``."""
        return self.subnets_prefix + lease_key

    def close(self) -> None:
        self._client.close()

    # The network config, also for `cloudroutes config get|set`.

    def get_config_text(self) -> str | None:
        kv, _ = self._client.get(self.config_key)
        return _text(kv)

    def put_config(self, text: str) -> NetworkConfig:
        """Validate, then write the network config; an invalid one raises ConfigError unwritten."""
        config = parse_config(text, source=f"etcd {self.config_key}")
        self._client.put(self.config_key, text.encode())
        return config

    def network_config(self, stop: threading.Event | None = None) -> NetworkConfig:
        """The network config, waiting (as flanneld does, retrying every second) until it exists.

        An invalid config raises ConfigError at once: it needs the operator, not a retry.
        """
        stop = stop or threading.Event()
        while True:
            try:
                text = self.get_config_text()
            except StoreUnavailable as exc:
                log.warning("Couldn't fetch network config: %s", exc)
                self._problems.report("config", str(exc))
            else:
                self._problems.report("config", None)
                if text is not None:
                    return parse_config(text, source=f"etcd {self.config_key}")
                log.warning(CONFIG_NOT_FOUND)
            if stop.wait(self._periods.config_retry):
                raise ConfigError(
                    f"stopped while waiting for a network config at etcd {self.config_key}; "
                    "write one with `cloudroutes config set`"
                )

    def watch_config(self, stop: threading.Event, notify: Callable[[str | None], None]) -> None:
        """Call ``notify`` with the config's new text each time it changes, None when deleted.

        Not called for the text found at the start. Runs until ``stop``, re-opening a lost
        watch with backoff; after a reconnect the config is read again and a change reported.
        """
        client = EtcdClient(self._settings)
        stream = WatchStream(client, self.config_key, prefix=False)
        failures = 0
        known = False
        last: str | None = None
        try:
            while not stop.is_set():
                try:
                    if not stream.is_started:
                        kv, revision = client.get(self.config_key)
                        text = _text(kv)
                        if known and text != last:
                            notify(text)
                        known, last = True, text
                        stream.start(revision + 1)
                        stream.open()
                        log.debug("watching the network config %s", self.config_key)
                    batch = stream.next(timeout=self._periods.poll)
                    if batch is not None:
                        for event in batch.events:
                            text = None if event.deleted else _text(event.kv)
                            if text != last:
                                last = text
                                notify(text)
                        stream.advance(batch)
                    failures = 0
                    self._problems.report("config", None)
                except (Compacted, Rewound):
                    stream.close()  # read again, then watch
                except StoreUnavailable as exc:
                    failures += 1
                    stream.close()
                    self._problems.report("config", str(exc))
                    self._pause(
                        stop, failures, f"watching the network config {self.config_key}", exc
                    )
        finally:
            stream.close()
            client.close()

    # Listing.

    def list_leases(self) -> list[Lease]:
        """Every readable lease under the prefix, with its expiration (`cloudroutes leases`)."""
        return self._list(self._client, _Expirations(self._client)).leases

    def _list(self, client: EtcdClient, expirations: _Expirations | None = None) -> _Listing:
        kvs, revision = client.get_prefix(self.subnets_prefix)
        ends = expirations.resolve(kv.lease_id for kv in kvs) if expirations else {}
        listing = _Listing(revision=revision)
        for kv in kvs:
            found = self._read(kv, ends.get(kv.lease_id) if kv.lease_id else None)
            if found is None:
                continue
            lease, readable = found
            listing.mod_revisions[lease.key] = kv.mod_revision
            (listing.leases if readable else listing.unreadable).append(lease)
        self._skipped.retain({kv.key for kv in kvs})
        return listing

    def _read(self, kv: KeyValue, expiration: datetime | None) -> tuple[Lease, bool] | None:
        """The lease stored at ``kv`` and whether its value was readable; None for a key that
        is not a lease key. Each problem is logged once per key revision.
        """
        parsed = parse_subnet_key(kv.key.removeprefix(self.subnets_prefix))
        if parsed is None:
            self._skipped.warn(
                kv,
                "ignoring %s: not a lease key (the subnet's network address and length, such "
                "as 10.5.34.0-24 or 10.5.34.0-24&fc00::-64)",
                kv.key[:_SHOWN_KEY],
            )
            return None
        try:
            attrs = decode_attrs(kv.value, where=kv.key)
        except ConfigError as exc:
            self._skipped.warn(kv, "skipping lease %s (its subnet stays taken)", exc)
            attrs = None
        subnet, ipv6_subnet = parsed
        lease = Lease(
            subnet=subnet,
            ipv6_subnet=ipv6_subnet,
            attrs=attrs or LeaseAttrs(),
            expiration=expiration,
            store_lease_id=kv.lease_id,
        )
        return lease, attrs is not None

    # Acquiring this node's lease.

    def acquire(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        previous: tuple[IPv4Network | None, IPv6Network | None] | None = None,
    ) -> Lease:
        """Take a subnet for this node by flannel's rules (see allocation.py).

        A lost compare-and-create race (another node took the subnet between our list and our
        write) is retried with a fresh list, up to 10 times.
        """
        for _ in range(RACE_RETRIES):
            listing = self._list(self._client)
            choice = choose_subnet(
                config, listing.leases, attrs, previous, unreadable=listing.unreadable
            )
            self._delete_stale(choice, attrs, listing)
            lease = self._claim(choice, attrs, listing)
            if lease is not None:
                return lease
            log.info("subnet %s was taken by another node meanwhile; trying again", choice.key)
        raise LeaseError(
            f"max retries reached trying to acquire a subnet: {RACE_RETRIES} chosen subnets "
            f"were taken by other nodes first under {self.subnets_prefix}"
        )

    def _delete_stale(self, choice: Allocation, attrs: LeaseAttrs, listing: _Listing) -> None:
        for stale in choice.stale:
            log.info(
                "Found lease (%s) for current IP (%s) but not compatible with current config, "
                "deleting",
                stale.key,
                attrs.public_ip,
            )
            self._client.delete(self.lease_path(stale.key), listing.mod_revisions[stale.key])

    def _claim(self, choice: Allocation, attrs: LeaseAttrs, listing: _Listing) -> Lease | None:
        """Write the chosen lease; None when another node changed the key first."""
        path, value = self.lease_path(choice.key), encode_attrs(attrs)
        reused = choice.reused
        lease = Lease(subnet=choice.subnet, ipv6_subnet=choice.ipv6_subnet, attrs=attrs)
        if reused is not None and reused.is_reservation:
            # A reservation stays one: rewrite the attributes, attach no TTL.
            if not self._client.update(path, value, 0, listing.mod_revisions[reused.key]):
                return None
            log.info(
                "Found reservation %s for current IP (%s), reusing", choice.key, attrs.public_ip
            )
            return lease

        lease_id, ttl = self._client.grant(self._settings.lease_ttl)
        expiration = _now() + timedelta(seconds=ttl)
        try:
            if reused is not None:
                written = self._client.update(
                    path, value, lease_id, listing.mod_revisions[reused.key]
                )
            else:
                written = self._client.create(path, value, lease_id)
        except StoreUnavailable:
            self._client.revoke(lease_id)
            raise
        if not written:
            self._client.revoke(lease_id)
            return None
        log.info("%s lease %s for current node (%s)", _HOW[choice.how], choice.key, attrs.public_ip)
        return replace(lease, expiration=expiration, store_lease_id=lease_id)

    # Holding this node's lease.

    def keep(self, lease: Lease, stop: threading.Event) -> None:
        """Hold the lease until ``stop``: renew it before it expires, and put it back if lost.

        Raises LeaseRevoked when an operator deletes the key (a delete seen on the live watch
        before the lease could have expired): the node must stop, as flanneld does ("Lease has
        been revoked", exit 0). A lease lost otherwise (etcd wiped or restored from a backup,
        expired during an outage) is created again with the same subnet, and a value
        rewritten by someone else is written back. Raises LeaseError when that cannot be done:
        another node holds the subnet now, or it no longer fits the network config.
        """
        _Keeper(self, lease, stop).run()

    # Watching every lease.

    def watch(self, table: LeaseTable, stop: threading.Event) -> None:
        """Fill ``table`` with a snapshot of all leases, then their changes, until ``stop``.

        The node's own lease is included. After compaction, a store that went back, and every
        ``EtcdPeriods.relist`` seconds the snapshot is taken again; after a lost stream the
        watch resumes after the last event it handled, with backoff (100 ms doubling to 5 s).
        """
        # A connection of its own: pyetcd's failover state and its one shared watch stream
        # are not safe to share with keep() when a member dies under both at once.
        client = EtcdClient(self._settings)
        stream = WatchStream(client, self.subnets_prefix, prefix=True)
        failures = 0
        relist_at = 0.0
        try:
            while not stop.is_set():
                try:
                    if not stream.is_started or time.monotonic() >= relist_at:
                        stream.start(self._snapshot(client, table) + 1)
                        relist_at = time.monotonic() + self._periods.relist
                    batch = stream.next(timeout=self._periods.poll)
                    if batch is not None:
                        self._apply(table, batch)
                        stream.advance(batch)
                    failures = 0
                    self._problems.report("watch", None)
                except (Compacted, Rewound) as exc:
                    log.warning("lease watch: %s; listing again", exc)
                    stream.close()
                except StoreUnavailable as exc:
                    failures += 1
                    # A lost stream resumes after its last event; only compaction needs a list.
                    stream.pause()
                    self._problems.report("watch", str(exc))
                    self._pause(stop, failures, "watching leases", exc)
        finally:
            stream.close()
            client.close()

    # The watch leaves peers' expirations unresolved: routes never need them, and one TTL
    # lookup per lease made a 10,000-lease snapshot 8x slower (only `cloudroutes leases`
    # shows them, and it looks them up itself).

    def _snapshot(self, client: EtcdClient, table: LeaseTable) -> int:
        listing = self._list(client)
        table.replace_all(listing.leases, listing.revision)
        log.info("listed %d leases at revision %d", len(listing.leases), listing.revision)
        return listing.revision

    def _apply(self, table: LeaseTable, batch: WatchBatch) -> None:
        if not batch.events:
            return
        events: list[LeaseEvent] = []
        for event in batch.events:
            change = self._change(event)
            if change is not None:
                events.append(change)
        table.apply(events, batch.events[-1].kv.mod_revision)

    def _change(self, event: WatchEvent) -> LeaseEvent | None:
        kv = event.kv
        if event.deleted:
            self._skipped.forget(kv.key)
            parsed = parse_subnet_key(kv.key.removeprefix(self.subnets_prefix))
            if parsed is None:
                return None
            return LeaseEvent(EventType.REMOVED, Lease(subnet=parsed[0], ipv6_subnet=parsed[1]))
        found = self._read(kv, None)
        if found is None:
            return None
        lease, readable = found
        # A lease whose value went bad is no longer routable: it leaves the table.
        return LeaseEvent(EventType.ADDED if readable else EventType.REMOVED, lease)

    def _pause(self, stop: threading.Event, failures: int, doing: str, exc: Exception) -> None:
        periods = self._periods
        delay = min(periods.backoff_max, periods.backoff_initial * 2 ** (failures - 1))
        log.warning("%s: %s; retrying in %.1f s", doing, exc, delay)
        stop.wait(delay)


class _Keeper:
    """keep(): the lease as last written, the revision of that write, when to renew it.

    The key is watched so a change by someone else is handled at once, not at the renewal.
    After a lost connection the key is read again and judged by what it holds, never by the
    events missed meanwhile: only a delete seen live can be an operator's revocation.
    """

    def __init__(self, source: EtcdLeaseSource, lease: Lease, stop: threading.Event) -> None:
        self._source = source
        self._client = source._client
        self._settings = source._settings
        self._periods = source._periods
        self._stop = stop
        self._path = source.lease_path(lease.key)
        self._value = encode_attrs(lease.attrs)
        self._stream = WatchStream(self._client, self._path, prefix=False)
        self.lease = lease
        self._written = 0  # mod revision of the key as we last wrote or found it; 0: unknown
        self._due = self._renewal_due()
        self._changed = False  # a renewal found the key changed; its watch event is due
        self._last_repair = -math.inf
        self._revision = 0  # the newest store revision seen, to notice it going back

    def run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    if not self._stream.is_started:
                        self._recover()
                        self._stream.open()
                        self._problem("lease", None)
                        log.debug("watching own lease %s", self._path)
                    wait = min(self._periods.poll, max(0.0, self._due - time.monotonic()))
                    batch = self._stream.next(timeout=wait)
                    if batch is not None:
                        self._revision = max(self._revision, batch.revision)
                        for event in batch.events:
                            self._on_event(event)
                        self._stream.advance(batch)
                    failures = 0
                except Compacted:
                    self._stream.close()  # restarted from a fresh read of the key
                except StoreUnavailable as exc:
                    failures += 1
                    self._stream.close()
                    self._problem("lease", str(exc))
                    doing = f"watching own lease {self._path}"
                    self._source._pause(self._stop, failures, doing, exc)
                # Renewed when due whatever the watch does: an outage costs no more than that.
                if time.monotonic() >= self._due and not self._stop.is_set():
                    self._renew()
        finally:
            self._stream.close()

    def _problem(self, slot: str, problem: str | None) -> None:
        self._source._problems.report(slot, problem)

    # What the key holds.

    def _recover(self) -> None:
        """Read the key, make it this node's lease again if it is not, and watch from there."""
        kv, revision = self._client.get(self._path)
        if revision < self._revision:
            log.warning(
                "etcd's revision went back from %d to %d (wiped or restored from a backup); "
                "checking own lease %s",
                self._revision,
                revision,
                self._path,
            )
        self._revision = revision
        self._written = 0
        self._changed = False
        if kv is None:
            self._recreate("it was not in etcd when read again: wiped, restored, or expired")
        else:
            self._check(kv)
        self._stream.start(revision + 1)

    def _on_event(self, event: WatchEvent) -> None:
        kv = event.kv
        if kv.mod_revision <= self._written:
            return  # our own write, or older than it
        if not event.deleted:
            self._check(kv)
        elif self._expired():
            self._recreate("it expired: renewals failed for longer than its TTL")
        else:
            raise _revoked(self._path)

    def _expired(self) -> bool:
        expiration = self.lease.expiration
        if expiration is None:
            return False  # a reservation never expires
        slack = min(_EXPIRY_SLACK, self._settings.lease_ttl / 4)
        return _now() >= expiration - timedelta(seconds=slack)

    def _check(self, kv: KeyValue) -> None:
        """Accept the key when it holds our value on our etcd lease; else write ours back.

        Raises LeaseError when it holds another node's lease: it was moved or taken.
        """
        if kv.value == self._value and kv.lease_id == self.lease.store_lease_id:
            self._written = kv.mod_revision
            return
        try:
            found = decode_attrs(kv.value, where=self._path)
        except ConfigError as exc:
            what = f"a value that does not decode ({str(exc).removeprefix(self._path + ': ')})"
        else:
            if not is_own(Lease(subnet=None, attrs=found), self.lease.attrs):
                raise LeaseError(
                    f"own lease {self._path} now holds the lease of another node (PublicIP "
                    f"{found.public_ip}): someone moved it or the node took the subnet while "
                    "ours was lost; restart cloudroutes to acquire a new subnet"
                )
            same = kv.value == self._value
            what = "this node's value on another etcd lease" if same else "other attributes"
        self._repair(kv, what)

    def _repair(self, kv: KeyValue, what: str) -> None:
        # Two writers fighting over the key (say, two agents with one public IP) would rewrite
        # it in a tight loop: one repair per backoff_max at most.
        wait = self._last_repair + self._periods.backoff_max - time.monotonic()
        if wait > 0 and self._stop.wait(wait):
            return
        self._last_repair = time.monotonic()
        mod_revision = kv.mod_revision

        def put(value: bytes, lease_id: int) -> int:
            return self._client.update(self._path, value, lease_id, mod_revision)

        # Not written: changed again since, and its event comes next.
        if self._write(put, ttl=not self.lease.is_reservation):
            log.warning("own lease %s held %s; wrote this node's lease back", self._path, what)

    def _recreate(self, why: str) -> None:
        """Create the lost key again with the same subnet and value (if nobody took it)."""
        config = self._wait_for_config()
        if config is None:
            return  # stopped
        if not is_compatible(config, self.lease):
            raise LeaseError(
                f"own lease {self._path} is gone and subnet {self.lease.key} no longer fits "
                f"the network config at {self._source.config_key}; restart cloudroutes to "
                "acquire a new subnet"
            )

        def create(value: bytes, lease_id: int) -> int:
            return self._client.create(self._path, value, lease_id)

        if self._write(create, ttl=True):
            log.warning(
                "own lease %s was lost (%s); created it again with the same subnet",
                self._path,
                why,
            )
            return
        kv, _ = self._client.get(self._path)
        if kv is not None:
            self._check(kv)  # written first by someone: ours to repair, or another node's

    def _wait_for_config(self) -> NetworkConfig | None:
        key = self._source.config_key
        logged = False
        while True:
            kv, _ = self._client.get(key)
            text = _text(kv)
            if text is not None:
                return parse_config(text, source=f"etcd {key}")
            if not logged:
                log.warning(
                    "own lease %s is gone and so is the network config %s; waiting for the "
                    "config before creating the lease again",
                    self._path,
                    key,
                )
                logged = True
            if self._stop.wait(self._periods.config_retry):
                return None

    # Writing the key.

    def _write(self, put: Callable[[bytes, int], int], *, ttl: bool) -> bool:
        """Put our value by ``put`` on a new etcd lease of the full TTL (flanneld's renewal:
        the new lease is revoked when the put fails); False when its condition failed.
        """
        lease_id, expiration = 0, None
        if ttl:
            lease_id, granted = self._client.grant(self._settings.lease_ttl)
            expiration = _now() + timedelta(seconds=granted)
        try:
            revision = put(self._value, lease_id)
        except StoreUnavailable:
            if lease_id:
                self._client.revoke(lease_id)
            raise
        if not revision:
            if lease_id:
                self._client.revoke(lease_id)
            return False
        self._written = revision
        self._changed = False
        self.lease = replace(self.lease, expiration=expiration, store_lease_id=lease_id)
        self._due = self._renewal_due()
        self._problem("renewal", None)  # etcd takes writes again, whichever this one was
        return True

    def _renewal_due(self) -> float:
        """The monotonic time to renew at: expiration - margin (never, for a reservation)."""
        if self.lease.expiration is None:
            return math.inf
        margin = timedelta(minutes=self._settings.renew_margin)
        ttl = timedelta(seconds=self._settings.lease_ttl)
        if margin >= ttl:
            # A TTL shorter than the margin would renew in a tight loop: renew halfway instead.
            margin = ttl / 2
        wait = (self.lease.expiration - margin - _now()).total_seconds()
        return time.monotonic() + max(0.0, wait)

    def _renew(self) -> None:
        written = self._written

        def put(value: bytes, lease_id: int) -> int:
            # Only over the key as we last saw it: a deleted lease must not come back by a
            # renewal, nor another node's be overwritten.
            return self._client.update(self._path, value, lease_id, written)

        try:
            renewed = bool(written) and self._write(put, ttl=True)
        except StoreUnavailable as exc:
            # A short TTL must still be renewed in time: retry within a tenth of it.
            retry = min(self._periods.renew_retry, self._settings.lease_ttl / 10)
            log.error("Error renewing lease (trying again in %.1f s): %s", retry, exc)
            self._problem("renewal", str(exc))
            self._due = time.monotonic() + retry
            return
        self._problem("renewal", None)
        if renewed:
            log.info("Lease renewed, new expiration: %s", self.lease.expiration)
        elif not self._changed:
            # Changed or deleted since we last saw it: the watch event saying how is on its
            # way. Renew again after it.
            self._changed = True
            self._due = time.monotonic() + max(1.0, self._periods.poll)
        else:
            self._stream.close()  # no event came: read the key again and act on that


_HOW = {"public-ip": "Reused", "previous": "Reused previous", "random": "Allocated"}


def _now() -> datetime:
    return datetime.now(UTC)


def _text(kv: KeyValue | None) -> str | None:
    return kv.value.decode(errors="replace") if kv else None


def _revoked(path: str) -> LeaseRevoked:
    log.error("Lease has been revoked (%s was deleted)", path)
    return LeaseRevoked("Lease has been revoked")


class _SkipLog:
    """Warns once per key revision about a key or value that is skipped.

    The watch, its re-lists and acquire read the same keys again and again; a bad key is
    reported when it is written, not at every read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._warned: dict[str, int] = {}  # key → the mod revision warned about

    def warn(self, kv: KeyValue, message: str, *args: object) -> None:
        with self._lock:
            if self._warned.get(kv.key) == kv.mod_revision:
                return
            self._warned[kv.key] = kv.mod_revision
        log.warning(message, *args)

    def forget(self, key: str) -> None:
        with self._lock:
            self._warned.pop(key, None)

    def retain(self, keys: set[str]) -> None:
        """Forget keys that a full listing no longer holds."""
        with self._lock:
            self._warned = {k: r for k, r in self._warned.items() if k in keys}


class _Problems:
    """What each loop talking to etcd last found wrong, for store_problem."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_loop: dict[str, str] = {}

    def report(self, loop: str, problem: str | None) -> None:
        with self._lock:
            if problem is None:
                self._by_loop.pop(loop, None)
            else:
                self._by_loop[loop] = problem

    def first(self) -> str | None:
        with self._lock:
            return next(iter(self._by_loop.values()), None)


class _Expirations:
    """When each etcd lease ends, looked up once per lease id.

    flanneld and this source renew by granting a new lease, so a lease id's end never moves,
    and each renewal costs one lookup. Nobody keeps flannel leases alive in place; if someone
    did, the time shown would be early until that key is written again.
    """

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self._ends: dict[int, datetime] = {}

    def resolve(self, lease_ids: Iterable[int]) -> dict[int, datetime]:
        wanted = {lease_id for lease_id in lease_ids if lease_id}
        missing = wanted - self._ends.keys()
        if missing:
            now = _now()
            for lease_id, ttl in self._client.time_to_live(missing).items():
                # -1: the lease is already gone; its keys are about to be deleted.
                self._ends[lease_id] = now + timedelta(seconds=max(ttl, 0))
        return {lease_id: self._ends[lease_id] for lease_id in wanted}

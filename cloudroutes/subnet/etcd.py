"""The etcd lease source: flanneld's etcd v3 schema, so both can share one cluster.

Keys live under ``<prefix>/subnets/<key>``, values are encode_attrs() JSON, each key carries an
etcd lease of ``lease_ttl`` seconds (a key without one is a reservation and never expires).
Where flanneld gives up (a lost compare-and-create race, a watch error) this source retries.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network

from cloudroutes.config import NetworkConfig, parse_config
from cloudroutes.errors import ConfigError, LeaseError, LeaseRevoked, StoreUnavailable
from cloudroutes.lease import Lease, LeaseAttrs, decode_attrs, encode_attrs, parse_subnet_key
from cloudroutes.lease_table import EventType, LeaseEvent, LeaseTable
from cloudroutes.subnet.allocation import Allocation, choose_subnet
from cloudroutes.subnet.etcd_client import (
    Compacted,
    EtcdClient,
    EtcdSettings,
    KeyValue,
    WatchBatch,
)

__all__ = ["CONFIG_NOT_FOUND", "EtcdLeaseSource", "EtcdPeriods", "EtcdSettings"]

log = logging.getLogger(__name__)

CONFIG_NOT_FOUND = (
    "flannel config not found in etcd store. Did you create your config using etcdv3 API?"
)
RACE_RETRIES = 10


@dataclass(frozen=True)
class EtcdPeriods:
    """Waits of the source's loops, in seconds; flanneld's values by default, short in tests."""

    config_retry: float = 1.0  # between reads of a missing network config
    renew_retry: float = 60.0  # after a failed renewal
    backoff_initial: float = 0.1  # first wait before re-opening a lost watch, doubling...
    backoff_max: float = 5.0  # ...up to this
    poll: float = 0.5  # how often blocked loops look at their stop event


@dataclass(frozen=True)
class _Listing:
    leases: list[Lease]
    mod_revisions: dict[str, int]  # lease key → revision of its last write
    revision: int


class EtcdLeaseSource:
    """The LeaseSource for etcd (cloudroutes.subnet.LeaseSource)."""

    def __init__(self, settings: EtcdSettings, periods: EtcdPeriods | None = None) -> None:
        self._settings = settings
        self._periods = periods or EtcdPeriods()
        self._client = EtcdClient(settings)

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

    def lease_path(self, lease_key: str) -> str:
        """``10.5.34.0-24`` → ``/coreos.com/network/subnets/10.5.34.0-24``."""
        return self.subnets_prefix + lease_key

    def close(self) -> None:
        self._client.close()

    # The network config, also for `cloudroutes config get|set`.

    def get_config_text(self) -> str | None:
        kv, _ = self._client.get(self.config_key)
        return kv.value.decode(errors="replace") if kv else None

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
            else:
                if text is not None:
                    return parse_config(text, source=f"etcd {self.config_key}")
                log.warning(CONFIG_NOT_FOUND)
            if stop.wait(self._periods.config_retry):
                raise ConfigError(
                    f"stopped while waiting for a network config at etcd {self.config_key}; "
                    "write one with `cloudroutes config set`"
                )

    # Listing.

    def list_leases(self) -> list[Lease]:
        """Every lease under the prefix, with its expiration (for `cloudroutes leases`)."""
        return self._list(self._client, _Expirations(self._client)).leases

    def _list(self, client: EtcdClient, expirations: _Expirations | None = None) -> _Listing:
        kvs, revision = client.get_prefix(self.subnets_prefix)
        ends = expirations.resolve(kv.lease_id for kv in kvs) if expirations else {}
        leases: list[Lease] = []
        mod_revisions: dict[str, int] = {}
        for kv in kvs:
            lease = self._decode(kv, ends)
            if lease is not None:
                leases.append(lease)
                mod_revisions[lease.key] = kv.mod_revision
        return _Listing(leases, mod_revisions, revision)

    def _decode(self, kv: KeyValue, ends: dict[int, datetime]) -> Lease | None:
        """The lease stored at ``kv``; None (after a warning) when flanneld would skip it too."""
        parsed = parse_subnet_key(kv.key.removeprefix(self.subnets_prefix))
        if parsed is None:
            log.warning("skipping %s: not a subnet lease key", kv.key)
            return None
        try:
            attrs = decode_attrs(kv.value, where=kv.key)
        except ConfigError as exc:
            log.warning("skipping lease %s", exc)
            return None
        subnet, ipv6_subnet = parsed
        return Lease(
            subnet=subnet,
            ipv6_subnet=ipv6_subnet,
            attrs=attrs,
            expiration=ends.get(kv.lease_id) if kv.lease_id else None,
            store_lease_id=kv.lease_id,
        )

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
            choice = choose_subnet(config, listing.leases, attrs, previous)
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
        """Renew the lease before it expires, until ``stop`` is set.

        Raises LeaseRevoked when the key is deleted (by an operator, or by expiry after renewals
        failed): the node must stop, as flanneld does ("Lease has been revoked", exit 0).
        """
        path = self.lease_path(lease.key)
        stream = _WatchStream(self._client, path, prefix=False)
        failures = 0
        due = self._renewal_due(lease)
        try:
            while not stop.is_set():
                try:
                    if not stream.is_started:
                        stream.start(self._own_key_revision(path) + 1)
                    wait = min(self._periods.poll, max(0.0, due - time.monotonic()))
                    batch = stream.next(timeout=wait)
                    if batch is not None:
                        if any(event.deleted for event in batch.events):
                            raise _revoked(path)
                        stream.advance(batch)
                    failures = 0
                except Compacted:
                    stream.close()  # restarted from a fresh read of the key
                except StoreUnavailable as exc:
                    failures += 1
                    stream.close()
                    self._pause(stop, failures, f"watching own lease {path}", exc)
                if time.monotonic() >= due and not stop.is_set():
                    lease, due = self._renew_or_retry(lease)
        finally:
            stream.close()

    def _own_key_revision(self, path: str) -> int:
        kv, revision = self._client.get(path)
        if kv is None:
            raise _revoked(path)
        return revision

    def _renewal_due(self, lease: Lease) -> float:
        """The monotonic time to renew at: expiration - margin (never, for a reservation)."""
        if lease.expiration is None:
            return math.inf
        margin = timedelta(minutes=self._settings.renew_margin)
        ttl = timedelta(seconds=self._settings.lease_ttl)
        if margin >= ttl:
            # A TTL shorter than the margin would renew in a tight loop: renew halfway instead.
            margin = ttl / 2
        wait = (lease.expiration - margin - _now()).total_seconds()
        return time.monotonic() + max(0.0, wait)

    def _renew_or_retry(self, lease: Lease) -> tuple[Lease, float]:
        try:
            renewed = self._renew(lease)
        except StoreUnavailable as exc:
            retry = self._periods.renew_retry
            log.error("Error renewing lease (trying again in %.0f s): %s", retry, exc)
            return lease, time.monotonic() + retry
        log.info("Lease renewed, new expiration: %s", renewed.expiration)
        return renewed, self._renewal_due(renewed)

    def _renew(self, lease: Lease) -> Lease:
        """flanneld's renewal: a new lease of the full TTL, and the key written with it."""
        path = self.lease_path(lease.key)
        lease_id, ttl = self._client.grant(self._settings.lease_ttl)
        expiration = _now() + timedelta(seconds=ttl)
        try:
            # Only while the key exists: a deleted lease must not come back by our renewal.
            written = self._client.update_existing(path, encode_attrs(lease.attrs), lease_id)
        except StoreUnavailable:
            self._client.revoke(lease_id)
            raise
        if not written:
            self._client.revoke(lease_id)
            raise _revoked(path)
        return replace(lease, expiration=expiration, store_lease_id=lease_id)

    # Watching every lease.

    def watch(self, table: LeaseTable, stop: threading.Event) -> None:
        """Fill ``table`` with a snapshot of all leases, then their changes, until ``stop``.

        The node's own lease is included. After compaction the snapshot is taken again; after
        a lost stream the watch resumes where it stopped, with backoff (100 ms doubling to 5 s).
        """
        # A connection of its own: pyetcd's failover state and its one shared watch stream
        # are not safe to share with keep() when a member dies under both at once.
        client = EtcdClient(self._settings)
        stream = _WatchStream(client, self.subnets_prefix, prefix=True)
        failures = 0
        try:
            while not stop.is_set():
                try:
                    if not stream.is_started:
                        stream.start(self._snapshot(client, table) + 1)
                    batch = stream.next(timeout=self._periods.poll)
                    if batch is not None:
                        self._apply(table, batch)
                        stream.advance(batch)
                    failures = 0
                except Compacted as exc:
                    log.warning("lease watch fell behind (%s); listing again", exc)
                    stream.close()
                except StoreUnavailable as exc:
                    failures += 1
                    # A lost stream resumes at its revision; only compaction needs a new list.
                    stream.pause()
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
        events: list[LeaseEvent] = []
        for event in batch.events:
            if event.deleted:
                parsed = parse_subnet_key(event.kv.key.removeprefix(self.subnets_prefix))
                if parsed is not None:
                    gone = Lease(subnet=parsed[0], ipv6_subnet=parsed[1])
                    events.append(LeaseEvent(EventType.REMOVED, gone))
            else:
                lease = self._decode(event.kv, {})
                if lease is not None:
                    events.append(LeaseEvent(EventType.ADDED, lease))
        table.apply(events, batch.revision)

    def _pause(self, stop: threading.Event, failures: int, doing: str, exc: Exception) -> None:
        periods = self._periods
        delay = min(periods.backoff_max, periods.backoff_initial * 2 ** (failures - 1))
        log.warning("%s: %s; retrying in %.1f s", doing, exc, delay)
        stop.wait(delay)


_HOW = {"public-ip": "Reused", "previous": "Reused previous", "random": "Allocated"}


def _now() -> datetime:
    return datetime.now(UTC)


def _revoked(path: str) -> LeaseRevoked:
    log.error("Lease has been revoked (%s was deleted)", path)
    return LeaseRevoked("Lease has been revoked")


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


class _WatchStream:
    """One etcd watch, re-opened at the revision after the last batch handled.

    pyetcd delivers on its own thread; batches go through a queue so the caller reads them
    with a timeout, and so a batch is only counted as handled once the caller advanced past it.
    """

    def __init__(self, client: EtcdClient, key: str, *, prefix: bool) -> None:
        self._client = client
        self._key = key
        self._prefix = prefix
        self._next_revision: int | None = None
        self._watch_id: int | None = None
        self._endpoint = client.endpoint  # the member the stream is on, for messages
        self._queue: queue.Queue[WatchBatch | BaseException | None] | None = None

    @property
    def is_started(self) -> bool:
        return self._next_revision is not None

    def start(self, revision: int) -> None:
        self.close()
        self._next_revision = revision

    def next(self, timeout: float) -> WatchBatch | None:
        """The next batch, or None when none came within ``timeout`` seconds.

        Raises Compacted when the watch fell behind, StoreUnavailable when the stream broke.
        """
        assert self._next_revision is not None, "start() first"
        if self._queue is None:
            self._open(self._next_revision)
        assert self._queue is not None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, WatchBatch):
            return item
        self.pause()
        if isinstance(item, Compacted):
            raise item
        why = _describe(item)
        raise StoreUnavailable(f"lost the watch on {self._key} at {self._endpoint}: {why}")

    def advance(self, batch: WatchBatch) -> None:
        self._next_revision = batch.revision + 1

    def _open(self, revision: int) -> None:
        # A fresh queue per watch: late deliveries of an old watch cannot be mistaken for ours.
        deliveries: queue.Queue[WatchBatch | BaseException | None] = queue.Queue()
        self._watch_id = self._client.watch(
            self._key, deliveries.put, prefix=self._prefix, start_revision=revision
        )
        self._endpoint = self._client.endpoint
        self._queue = deliveries

    def pause(self) -> None:
        """Drop the watch but remember where to resume."""
        if self._watch_id is not None:
            self._client.cancel_watch(self._watch_id)
        self._watch_id = None
        self._queue = None

    def close(self) -> None:
        """Drop the watch and the revision: the next start() decides where to begin."""
        self.pause()
        self._next_revision = None


def _describe(item: BaseException | None) -> str:
    if item is None:
        return "the stream was closed"
    details = getattr(item, "details", None)
    return (details() if callable(details) else None) or str(item) or type(item).__name__

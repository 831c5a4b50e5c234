"""A leader elected through etcd, and the fence its writes carry.

In cluster mode one process programs every route; in node mode one agent removes the routes of
leases that are gone. Both are chosen here: each candidate tries to create one key (the leader
key) bound to an etcd lease of ``ttl`` seconds; whoever creates it leads and keeps the lease
alive; the others watch the key and try again when it is deleted (resign, or the lease expired).

A deposed leader stops writing before a new one starts. The leader holds a Fence and checks it
before every write:

- locally: ``Fence.valid()`` holds until ``sent + ttl * FENCE_FRACTION``, where ``sent`` is the
  moment the last successful keepalive (or the grant of the lease) was *sent*. etcd starts the
  new TTL when it handles the request, which is after we sent it, and a lease only expires on
  its own after a full ``ttl`` (a change of etcd leader renews every lease, which only makes it
  later). Another candidate can only create the key once the lease expired, so no earlier than
  ``sent + ttl``: the partitioned leader stopped ``ttl * (1 - FENCE_FRACTION)`` before that.
  That margin must cover what happens between ``valid()`` and the write landing: the write's
  own timeout (cloud calls made under a fence need a timeout below ``ttl / 2``) and pauses of
  the process (a stopped or swapped-out leader can exceed any margin; etcd writes are then
  still refused, as follows);
- in etcd: fenced transactions compare the leader key's create revision with the fence's, so a
  write of a leader whose key expired, was resigned or re-created by another fails there
  (Deposed) and changes nothing.

Deleting the leader key by hand hands over at once, without waiting for the old leader: it
notices within one keepalive period (``ttl / KEEPALIVE_PER_TTL``), and its etcd writes are
refused from the moment the key is gone.

The key's value says who leads (``{"candidate": ..., "since": <unix time>}``); it is only shown,
never trusted: a value that does not parse is reported and the key's lease decides. A leader
key without an etcd lease would never expire and block every election, so candidates delete it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import grpc
from pyetcd import etcdrpc
from pyetcd import transactions as etcd_ops

from cloudroutes.errors import CloudroutesError, ConfigError, StoreUnavailable
from cloudroutes.subnet.etcd_client import EtcdClient, WatchBatch, mark_failed_member

log = logging.getLogger(__name__)

FENCE_FRACTION = 0.5  # of the TTL after a keepalive was sent, during which the leader writes
KEEPALIVE_PER_TTL = 6  # keepalives per TTL: two may fail before the fence lapses
_MAX_CANDIDATE = 253
_MAX_SHOWN = 80  # characters of an unreadable value shown in a warning


class Deposed(CloudroutesError):
    """A fenced write was refused: this process no longer leads (or cannot be sure it does)."""


def election_key(prefix: str, cluster: str, duty: str) -> str:
    """The leader key of one duty (``cluster`` routing, ``gc`` of node mode) of one cluster."""
    if not cluster or not duty:
        raise ConfigError("an election needs a cluster name and a duty; neither may be empty")
    return (
        f"{prefix.rstrip('/')}/cloudroutes/leader/{quote(cluster, safe='')}/{quote(duty, safe='')}"
    )


class _Term:
    """One stretch of leadership: the etcd lease and key incarnation it rests on."""

    def __init__(self, lease_id: int, create_revision: int, deadline: float) -> None:
        self.lease_id = lease_id
        self.create_revision = create_revision
        self.deadline = deadline  # time.monotonic() until which writes are safe
        self.ended = False


@dataclass(frozen=True)
class Fence:
    """What a leader passes to its writes: the leader key and the incarnation it created.

    A fence belongs to one term: once that term ends it never becomes valid again, even if the
    same process wins a later election (that term has a new fence). Within a term, a fence that
    lapsed for want of keepalives is valid again once one gets through: the lease never
    expired, so the key was never free and nobody else can have led meanwhile.
    """

    key: str
    create_revision: int
    _term: _Term = field(repr=False, compare=False)

    def valid(self) -> bool:
        """Whether writing is safe now; check it right before each write."""
        term = self._term
        return not term.ended and time.monotonic() < term.deadline

    @property
    def deadline(self) -> float:
        """The time.monotonic() at which the fence lapses unless a keepalive extends it."""
        return self._term.deadline

    def check(self) -> None:
        """Raise Deposed unless the fence is valid."""
        if self._term.ended:
            raise Deposed(f"no longer the leader of {self.key}; not writing")
        if not self.valid():
            raise Deposed(
                f"leadership of {self.key} unconfirmed (no keepalive reached etcd in time); "
                "not writing until it is"
            )

    def compare(self) -> Any:
        """The etcd comparison a fenced transaction must include."""
        return etcd_ops.Create(self.key) == self.create_revision

    def end(self) -> None:
        """A fenced write found the key changed: this term is over."""
        self._term.ended = True


# etcd requests EtcdClient has no method for (create revisions, lease keepalives, transactions
# of several operations), sent through its _call for failover, re-login and our errors.


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store revision after the transaction (that of its writes, if any)
    responses: list[Any]  # etcdrpc.ResponseOp, one per operation of the branch taken


def transaction(
    client: EtcdClient,
    compare: Sequence[Any],
    success: Sequence[Any],
    failure: Sequence[Any] = (),
    timeout: float | None = None,
) -> TxnResult:
    """One etcd transaction of pyetcd.transactions compares and operations (nesting allowed)."""

    def send(c: Any) -> TxnResult:
        request = etcdrpc.TxnRequest(
            compare=[item.build_message() for item in compare],
            success=c._ops_to_requests(list(success)),
            failure=c._ops_to_requests(list(failure)),
        )
        response = _unary(c, c.kvstub.Txn, request, timeout)
        return TxnResult(response.succeeded, response.header.revision, list(response.responses))

    return client._call(send)


def read_key(client: EtcdClient, key: str, timeout: float | None = None) -> tuple[Any, int]:
    """The key's etcd KeyValue (with create_revision and lease) or None, and the revision."""

    def send(c: Any) -> tuple[Any, int]:
        request = etcdrpc.RangeRequest(key=key.encode())
        response = _unary(c, c.kvstub.Range, request, timeout)
        return (response.kvs[0] if response.kvs else None), response.header.revision

    return client._call(send)


def keep_alive(client: EtcdClient, lease_id: int, timeout: float | None = None) -> int:
    """Renew an etcd lease once; its TTL in seconds, 0 when it no longer exists."""

    def send(c: Any) -> int:
        request = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)
        try:
            call = c.leasestub.LeaseKeepAlive(
                iter([request]),
                timeout or c.timeout,
                credentials=c.call_credentials,
                metadata=c.metadata,
            )
            try:
                return int(next(call).TTL)
            finally:
                call.cancel()
        except grpc.RpcError as exc:
            mark_failed_member(c, exc)
            raise
        except StopIteration:  # the stream closed without an answer
            raise StoreUnavailable(
                f"etcd gave no answer to a keepalive of lease {lease_id:x}"
            ) from None

    return client._call(send)


def _unary(c: Any, method: Any, request: Any, timeout: float | None) -> Any:
    try:
        return method(
            request, timeout or c.timeout, credentials=c.call_credentials, metadata=c.metadata
        )
    except grpc.RpcError as exc:
        mark_failed_member(c, exc)
        raise


@dataclass(frozen=True)
class _Pending:
    """A lease granted for a create whose answer was lost: the key may be ours."""

    lease_id: int
    sent: float


class Election:
    """One candidate for the leader key. Run it with run(); read leadership or fence().

    Give it an EtcdClient of its own: pyetcd's failover state and watch stream are not safe to
    share with another loop when a member dies under both.
    """

    def __init__(
        self,
        client: EtcdClient,
        key: str,
        candidate_id: str,
        ttl: int = 15,
        *,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not 2 <= ttl <= 3600:
            raise ConfigError(f"the election TTL must be 2 to 3600 seconds, got {ttl}")
        if not candidate_id or len(candidate_id) > _MAX_CANDIDATE or not candidate_id.isprintable():
            raise ConfigError(
                f"candidate id {candidate_id[:_MAX_SHOWN]!r} must be 1 to {_MAX_CANDIDATE} "
                "printable characters"
            )
        self.key = key
        self.candidate_id = candidate_id
        self.ttl = ttl
        # Set while this candidate leads with a valid fence; the reconciler can wait on it.
        self.leadership = threading.Event()
        self._client = client
        self._on_change = on_change
        self._lock = threading.RLock()
        self._term: _Term | None = None
        self._fence: Fence | None = None
        self._pending: _Pending | None = None
        self._leader: str | None = None
        self._resigned = threading.Event()
        self._failing = False
        self._revision = 0  # of the last read of the key: where a new watch starts
        self._wake = threading.Event()
        self._watch_id: int | None = None
        self._watch_broken = False
        self._warned_value: tuple[int, int] | None = None  # (create, mod) revision warned of

    @property
    def _rpc_timeout(self) -> float:
        # A keepalive stuck longer than this would leave `leadership` set past the deadline.
        return self.ttl / 4

    # These read without the lock, which a pass holds across its etcd requests: a reconciler
    # asking must not wait for a keepalive.

    def is_leader(self) -> bool:
        fence = self._fence
        return fence is not None and fence.valid()

    def fence(self) -> Fence | None:
        """The fence of the current term (check valid() before each write), or None."""
        return self._fence

    def leader(self) -> str | None:
        """Who leads, as last read from etcd; None when nobody does or it cannot be read."""
        return self._leader

    # The loop.

    def run(self, stop: threading.Event) -> None:
        """Campaign, lead and keep the lease alive until ``stop`` or resign(); then resign."""
        try:
            while not stop.is_set() and not self._resigned.is_set():
                self._wake.clear()  # before the pass: a change seen during it wakes the next
                delay = self.step()
                self._ensure_watch()
                self._sleep(delay, stop)
        finally:
            self._cancel_watch()
            self.resign()

    def _sleep(self, delay: float, stop: threading.Event) -> None:
        """Until the next pass is due or the watch saw the key change; stop is looked at
        every 0.2 s."""
        due = time.monotonic() + delay
        while not stop.is_set() and not self._resigned.is_set():
            left = due - time.monotonic()
            if left <= 0 or self._wake.wait(min(left, 0.2)):
                return

    def step(self) -> float:
        """One pass: keep the lease alive when leading, else try to lead.

        Returns the seconds until the next pass is due. ConfigError (etcd refused access)
        is raised; an unreachable etcd is logged once and tried again.
        """
        changed: bool | None = None
        with self._lock:
            if self._resigned.is_set():
                return self.ttl
            try:
                if self._term is not None:
                    self._keep_leading(self._term)
                else:
                    self._campaign()
                if self._failing:
                    log.info("election %s: etcd answers again", self.key)
                self._failing = False
            except StoreUnavailable as exc:
                if not self._failing:
                    log.warning("election %s: %s; retrying", self.key, exc)
                self._failing = True
            changed = self._sync_leadership()
            delay = self._next_delay()
        self._notify(changed)
        return delay

    def resign(self) -> None:
        """Stop writing, stop campaigning and hand over: revoking the lease deletes the key."""
        term = self._term
        if term is not None:  # at once, even while a pass holds the lock
            term.ended = True
        with self._lock:
            self._resigned.set()
            term, pending = self._term, self._pending
            self._end_term()
            self._pending = None
            changed = self._sync_leadership()
        self._notify(changed)
        self._wake.set()
        for lease_id in (t.lease_id for t in (term, pending) if t is not None):
            self._client.revoke(lease_id)
        if term is not None:
            log.info("resigned as leader of %s", self.key)

    # Leading.

    def _keep_leading(self, term: _Term) -> None:
        if term.ended:  # a fenced write found the key changed
            self._depose("a write found the leader key changed")
            return
        sent = time.monotonic()
        if keep_alive(self._client, term.lease_id, self._rpc_timeout) <= 0:
            self._depose("its etcd lease expired")
            return
        kv, self._revision = read_key(self._client, self.key, self._rpc_timeout)
        if kv is None or kv.create_revision != term.create_revision or kv.lease != term.lease_id:
            self._depose("the leader key was deleted or rewritten")
            self._client.revoke(term.lease_id)
            return
        term.deadline = max(term.deadline, sent + self.ttl * FENCE_FRACTION)

    def _depose(self, why: str) -> None:
        log.warning("lost the leadership of %s: %s", self.key, why)
        self._end_term()

    def _end_term(self) -> None:
        if self._term is not None:
            self._term.ended = True
        self._term = None
        self._fence = None
        if self._leader == self.candidate_id:
            self._leader = None

    # Campaigning.

    def _campaign(self) -> None:
        kv, self._revision = read_key(self._client, self.key, self._rpc_timeout)
        if kv is not None:
            self._follow(kv)
            return
        if self._pending is not None:  # the key is absent: that create did not happen
            self._client.revoke(self._pending.lease_id)
            self._pending = None
        sent = time.monotonic()
        lease_id, _ = self._client.grant(self.ttl)
        self._pending = _Pending(lease_id, sent)
        value = json.dumps({"candidate": self.candidate_id, "since": int(time.time())})
        result = transaction(
            self._client,
            [etcd_ops.Version(self.key) == 0],
            [etcd_ops.Put(self.key, value.encode(), lease_id)],
            timeout=self._rpc_timeout,
        )
        if not result.succeeded:  # another candidate was faster
            self._pending = None
            self._client.revoke(lease_id)
            self._wake.set()  # read who leads now
            return
        self._lead(lease_id, result.revision, sent)

    def _follow(self, kv: Any) -> None:
        pending = self._pending
        if pending is not None and kv.lease == pending.lease_id:
            self._lead(pending.lease_id, kv.create_revision, pending.sent)  # lost answer
            return
        if pending is not None:
            self._client.revoke(pending.lease_id)
            self._pending = None
        self._leader = self._describe(kv)
        if kv.lease == 0:
            log.warning(
                "leader key %s has no etcd lease, so it would never expire (written by hand?); "
                "deleting it so a leader can be elected",
                self.key,
            )
            transaction(
                self._client,
                [etcd_ops.Mod(self.key) == kv.mod_revision],
                [etcd_ops.Delete(self.key)],
                timeout=self._rpc_timeout,
            )
            self._wake.set()

    def _lead(self, lease_id: int, create_revision: int, sent: float) -> None:
        self._pending = None
        self._term = _Term(lease_id, create_revision, sent + self.ttl * FENCE_FRACTION)
        self._fence = Fence(self.key, create_revision, self._term)
        self._leader = self.candidate_id
        log.info("%s is now the leader of %s", self.candidate_id, self.key)

    def _describe(self, kv: Any) -> str | None:
        try:
            candidate = json.loads(kv.value)["candidate"]
            if isinstance(candidate, str) and 0 < len(candidate) <= _MAX_CANDIDATE:
                return candidate
        except (ValueError, TypeError, KeyError):
            pass
        seen = (kv.create_revision, kv.mod_revision)
        if self._warned_value != seen:
            self._warned_value = seen
            shown = bytes(kv.value[:_MAX_SHOWN]).decode(errors="replace")
            log.warning(
                "leader key %s holds an unreadable value %r; waiting for its etcd lease to end",
                self.key,
                shown,
            )
        return None

    # Timing and notification.

    def _next_delay(self) -> float:
        every = self.ttl / KEEPALIVE_PER_TTL
        if self._term is None:
            return every if self._failing else self.ttl * FENCE_FRACTION
        until_lapse = self._term.deadline - time.monotonic()
        # Wake at the deadline too, so `leadership` is cleared when the fence lapses.
        return min(every, until_lapse) if until_lapse > 0 else every

    def _sync_leadership(self) -> bool | None:
        leading = self._fence is not None and self._fence.valid()
        if leading == self.leadership.is_set():
            return None
        if not leading and self._fence is not None:
            log.warning(
                "leadership of %s unconfirmed: no keepalive reached etcd in %.1f s; "
                "not writing until one does",
                self.key,
                self.ttl * FENCE_FRACTION,
            )
        if leading:
            self.leadership.set()
        else:
            self.leadership.clear()
        return leading

    def _notify(self, changed: bool | None) -> None:
        if changed is not None and self._on_change is not None:
            self._on_change(changed)

    # The watch only wakes the loop early; each pass reads the key itself.

    def _ensure_watch(self) -> None:
        if self._watch_id is not None and not self._watch_broken:
            return
        self._cancel_watch()
        self._watch_broken = False
        try:
            self._watch_id = self._client.watch(
                self.key, self._on_watch, prefix=False, start_revision=self._revision + 1
            )
        except StoreUnavailable:
            self._watch_broken = True  # the next pass tries again; polling covers the gap

    def _on_watch(self, item: WatchBatch | BaseException | None) -> None:
        if not isinstance(item, WatchBatch):
            self._watch_broken = True
        self._wake.set()

    def _cancel_watch(self) -> None:
        if self._watch_id is not None:
            self._client.cancel_watch(self._watch_id)
        self._watch_id = None

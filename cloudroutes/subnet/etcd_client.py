"""The connection to etcd: settings, TLS, auth, member failover, and errors in our terms.

It wraps etcd-sdk-python (``pyetcd``), whose client needs help in three places:

- auth: its token travels as gRPC call credentials, which gRPC refuses to send on a plaintext
  channel, and it never logs in again when the token expires. We log in ourselves and send the
  token as metadata, and log in again when etcd says the token is invalid;
- failover: its multi-endpoint client marks a member failed after an UNAVAILABLE answer and
  moves to the next, but only for the next call, and avoids a failed member for 300 s by
  default (with one member, that is 300 s of "no server"). We shorten that;
- errors: gRPC and pyetcd exceptions become StoreUnavailable or ConfigError, one line that
  names the endpoint and never the password or key material.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import events as pyetcd_events
from pyetcd import exceptions as etcd_errors

from cloudroutes.errors import ConfigError, StoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_ENDPOINTS = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
DEFAULT_PREFIX = "/coreos.com/network"
# etcd refuses requests ("too many requests") when far more are in flight than it has applied;
# lease lookups are sent in windows of this many.
_WINDOW = 512
T = TypeVar("T")


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd and hold leases there; the ``--etcd-*`` flags of flanneld."""

    endpoints: tuple[str, ...] = DEFAULT_ENDPOINTS
    prefix: str = DEFAULT_PREFIX
    keyfile: str | None = None
    certfile: str | None = None
    cafile: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    renew_margin: int = 60  # minutes before expiry to renew: --subnet-lease-renew-margin
    lease_ttl: int = 86400  # seconds
    request_timeout: float = 10.0  # seconds for one request
    failed_member_retry: float = 2.0  # seconds a member is avoided after it failed

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str):
            object.__setattr__(self, "endpoints", tuple(self.endpoints.split(",")))
        else:
            object.__setattr__(self, "endpoints", tuple(self.endpoints))
        object.__setattr__(self, "prefix", "/" + self.prefix.strip("/"))
        if not self.endpoints:
            raise ConfigError("--etcd-endpoints is empty; give a URL like http://127.0.0.1:2379")
        for url in self.endpoints:
            parse_endpoint(url)
        if bool(self.keyfile) != bool(self.certfile):
            raise ConfigError("--etcd-keyfile and --etcd-certfile must be given together")
        if bool(self.username) != bool(self.password):
            raise ConfigError("--etcd-username and --etcd-password must be given together")
        if not 1 <= self.renew_margin <= 1439:
            raise ConfigError(
                f"--subnet-lease-renew-margin must be 1 to 1439 minutes, got {self.renew_margin}"
            )
        if self.lease_ttl < 1:
            raise ConfigError(f"the lease TTL must be at least 1 second, got {self.lease_ttl}")

    @property
    def tls(self) -> bool:
        """Whether to speak TLS: when both a key and a certificate are given (flanneld's rule),
        and also for https:// endpoints without them (server verified, no client certificate).
        """
        return bool(self.keyfile and self.certfile) or any(
            url.startswith("https://") for url in self.endpoints
        )


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease_id: int


@dataclass(frozen=True)
class WatchEvent:
    deleted: bool
    kv: KeyValue


@dataclass(frozen=True)
class WatchBatch:
    """One watch response: its events, and the store revision to resume after."""

    revision: int
    events: list[WatchEvent]


class Compacted(Exception):
    """The watch started before the oldest revision etcd keeps: list again, then watch."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd compacted its history up to revision {revision}")
        self.revision = revision


class Rewound(Exception):
    """The store's revision went back (wiped, or restored from a backup): list again.

    A watch resumed at a revision the store has not reached would see nothing until it does.
    """

    def __init__(self, was: int, now: int) -> None:
        super().__init__(
            f"etcd's revision went back from {was} to {now} (wiped or restored from a backup)"
        )


def parse_endpoint(url: str) -> tuple[str, int]:
    """``http://127.0.0.1:2379`` → (host, port) as gRPC wants them (IPv6 hosts bracketed)."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port or 2379
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ConfigError(
            f"--etcd-endpoints: {url!r} is not an etcd URL such as http://127.0.0.1:2379"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return host, port


class _PyEtcd(pyetcd.MultiEndpointEtcd3Client):
    """pyetcd's client, with a login that works on plaintext channels too."""

    def login(self, user: str, password: str) -> None:
        request = etcdrpc.AuthenticateRequest(name=user, password=password)
        try:
            token = self.authstub.Authenticate(request, self.timeout).token
        except grpc.RpcError as exc:
            mark_failed_member(self, exc)
            raise
        self.metadata = (("token", token),)
        # gRPC refuses call credentials on plaintext channels; the metadata carries the token.
        self.call_credentials = None
        self._clear_old_stubs()  # the watcher was built with the old token


class EtcdClient:
    """Every etcd request cloudroutes makes, with failover, re-login and our error classes."""

    def __init__(self, settings: EtcdSettings) -> None:
        self._settings = settings
        self._urls: dict[str, str] = {}
        self._lock = threading.Lock()
        self._logged_in = False
        self._client = _PyEtcd(
            endpoints=self._endpoints(), timeout=settings.request_timeout, failover=True
        )

    def _endpoints(self) -> list[pyetcd.Endpoint]:
        settings = self._settings
        creds = _credentials(settings) if settings.tls else None
        options = [
            # Reconnect soon after a member comes back, as flanneld's watch does (<= 5 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 5000),
            # Notice a dead connection under a quiet watch; etcd allows pings every 5 s.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]
        endpoints = []
        for url in settings.endpoints:
            host, port = parse_endpoint(url)
            endpoint = pyetcd.Endpoint(
                host,
                port,
                secure=settings.tls,
                creds=creds,
                time_retry=settings.failed_member_retry,
                opts=options,
            )
            self._urls[endpoint.netloc] = url
            endpoints.append(endpoint)
        return endpoints

    @property
    def endpoint(self) -> str:
        """The URL of the member in use."""
        current = self._client.endpoint_in_use
        return self._urls.get(current.netloc, current.netloc) if current else "?"

    def close(self) -> None:
        self._client.close()

    # Requests. Each goes through _call, which maps errors and logs in again when needed.

    def get(self, key: str) -> tuple[KeyValue | None, int]:
        """The key (or None) and the store revision it was read at."""
        response = self._call(lambda c: c.get_response(key))
        kvs = [_kv(kv) for kv in response.kvs]
        return (kvs[0] if kvs else None), response.header.revision

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        response = self._call(lambda c: c.get_prefix_response(prefix))
        return [_kv(kv) for kv in response.kvs], response.header.revision

    def put(self, key: str, value: bytes, lease_id: int = 0) -> int:
        """Write the key; returns the revision of the write."""
        return self._call(lambda c: c.put(key, value, lease=lease_id)).header.revision

    def create(self, key: str, value: bytes, lease_id: int) -> int:
        """Write the key only if it does not exist (flanneld's createSubnet).

        Like the other conditional writes: the revision of the write, 0 when not written.
        """
        return self._txn_put(key, value, lease_id, lambda t: t.version(key) == 0)

    def update(self, key: str, value: bytes, lease_id: int, mod_revision: int) -> int:
        """Write the key only if nobody changed it since ``mod_revision``."""
        return self._txn_put(key, value, lease_id, lambda t: t.mod(key) == mod_revision)

    def _txn_put(self, key: str, value: bytes, lease_id: int, compare: Callable[[Any], Any]) -> int:
        def txn(c: _PyEtcd) -> int:
            put = c.transactions.put(key, value, lease=lease_id)
            succeeded, responses = c.transaction(
                compare=[compare(c.transactions)], success=[put], failure=[]
            )
            return responses[0].response_put.header.revision if succeeded else 0

        return self._call(txn)

    def revision(self, key: str) -> int:
        """The store's current revision, read cheaply (a count of ``key``)."""
        return self._call(lambda c: c.get_response(key, count_only=True)).header.revision

    def delete(self, key: str, mod_revision: int | None = None) -> bool:
        """Delete the key (only if unchanged since ``mod_revision`` when given)."""
        if mod_revision is None:
            return self._call(lambda c: c.delete(key))

        def txn(c: _PyEtcd) -> bool:
            compare = [c.transactions.mod(key) == mod_revision]
            succeeded, _ = c.transaction(
                compare=compare, success=[c.transactions.delete(key)], failure=[]
            )
            return succeeded

        return self._call(txn)

    def grant(self, ttl: int) -> tuple[int, int]:
        """A new etcd lease: (id, granted TTL in seconds)."""
        lease = self._call(lambda c: c.lease(ttl))
        return lease.id, lease.ttl

    def revoke(self, lease_id: int) -> None:
        """Revoke a lease, best effort: one left behind only lives until its TTL ends."""
        try:
            self._call(lambda c: c.revoke_lease(lease_id))
        except (StoreUnavailable, ConfigError) as exc:
            log.warning(
                "could not revoke etcd lease %x (it will expire by itself): %s", lease_id, exc
            )

    def time_to_live(self, lease_ids: Iterable[int]) -> dict[int, int]:
        """Remaining TTL in seconds of each lease (-1 when it is gone), looked up concurrently.

        One request per lease is unavoidable (etcd has no batch call), but sending a window of
        them at once on the one HTTP/2 connection is several times faster than in turn.
        """
        ids = list(lease_ids)
        found: dict[int, int] = {}
        for start in range(0, len(ids), _WINDOW):
            window = ids[start : start + _WINDOW]
            found.update(self._call(lambda c, window=window: _ttl_window(c, window)))
        return found

    def watch(
        self,
        key: str,
        deliver: Callable[[WatchBatch | BaseException | None], None],
        *,
        prefix: bool,
        start_revision: int,
    ) -> int:
        """Start a watch from ``start_revision``; returns its id for cancel_watch.

        ``deliver`` runs on pyetcd's watch thread with each WatchBatch; then, when the watch
        ends, with Compacted (it fell behind compaction), an error, or None (stream closed).
        """

        def translate(item: Any) -> None:
            if isinstance(item, etcd_errors.RevisionCompactedError):
                deliver(Compacted(item.compacted_revision))
            elif isinstance(item, BaseException) or item is None:
                # The member is not marked failed here: by now another thread may have failed
                # over, and we would mark the healthy one. Re-opening the watch on a dead
                # member fails, and that marks it.
                deliver(item)
            else:
                deliver(_batch(item))

        if self._settings.username:
            # etcd cancels a watch at creation when the user may not read the key or the token
            # is no longer valid, and pyetcd drops that answer: the watch would wait forever.
            # A read first logs in again, or raises the refusal.
            self.revision(key)
        kwargs = {"start_revision": start_revision, "callback": translate}
        if prefix:
            return self._call(lambda c: c.add_watch_prefix_callback(key, **kwargs))
        return self._call(lambda c: c.add_watch_callback(key, **kwargs))

    def cancel_watch(self, watch_id: int) -> None:
        # When the stream is gone, the watch went with it.
        with contextlib.suppress(StoreUnavailable, ConfigError):
            self._call(lambda c: c.cancel_watch(watch_id))

    def compact(self, revision: int) -> None:
        self._call(lambda c: c.compact(revision, physical=True))

    # Error handling.

    def _call(self, request: Callable[[_PyEtcd], T]) -> T:
        self._ensure_login()
        try:
            return self._translate(request)
        except _TokenExpired:
            log.info("etcd auth token expired; logging in again")
            self._logged_in = False
            self._ensure_login()
            return self._translate(request)

    def _ensure_login(self) -> None:
        settings = self._settings
        if not settings.username or self._logged_in:
            return
        with self._lock:
            if self._logged_in:
                return
            try:
                self._translate(lambda c: c.login(settings.username, settings.password))
            except (ConfigError, _TokenExpired) as exc:
                # etcd's reason ("authentication failed, invalid user ID or password",
                # "authentication is not enabled") never repeats the password.
                raise ConfigError(
                    f"etcd at {self.endpoint} refused to log in user {settings.username!r}: "
                    f"{exc}; check --etcd-username and --etcd-password"
                ) from None
            self._logged_in = True

    def _translate(self, request: Callable[[_PyEtcd], T]) -> T:
        # The endpoint is named after the failure: pyetcd may have failed over before it.
        try:
            return request(self._client)
        except etcd_errors.NoServerAvailableError:
            raise StoreUnavailable(self._unreachable(", ".join(self._settings.endpoints))) from None
        except etcd_errors.ConnectionTimeoutError:
            raise StoreUnavailable(self._unreachable(self.endpoint, "timed out")) from None
        except (etcd_errors.ConnectionFailedError, etcd_errors.InternalServerError) as exc:
            # pyetcd raised it while handling gRPC's error, which has the reason.
            cause = exc.__context__
            if isinstance(cause, grpc.RpcError):
                raise self._rpc_error(cause, self.endpoint) from None
            raise StoreUnavailable(self._unreachable(self.endpoint)) from None
        except etcd_errors.WatchTimedOut:
            # A member that cannot start a watch in a whole request timeout is not healthy.
            endpoint = self.endpoint
            self._client.endpoint_in_use.fail()
            raise StoreUnavailable(f"etcd at {endpoint} did not start a watch in time") from None
        except etcd_errors.Etcd3Exception as exc:
            what = str(exc) or type(exc).__name__
            raise StoreUnavailable(f"etcd at {self.endpoint} failed a request: {what}") from None
        except grpc.RpcError as exc:
            raise self._rpc_error(exc, self.endpoint) from None

    def _unreachable(self, endpoint: str, why: str = "connection failed") -> str:
        return f"cannot reach etcd at {endpoint} ({why}); is it running? check --etcd-endpoints"

    def _rpc_error(self, exc: grpc.RpcError, endpoint: str) -> Exception:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else "") or str(code)
        if "invalid auth token" in details:
            return _TokenExpired()
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION) and (
            "auth" in details
        ):
            return ConfigError(details)
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED) or (
            "user name is empty" in details
        ):
            return ConfigError(
                f"etcd at {endpoint} denied access ({details}); give a user with read/write "
                f"access to {self._settings.prefix} via --etcd-username/--etcd-password"
            )
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            if any(
                word in details.lower()
                for word in ("ssl", "tls", "tsi_", "handshake", "certificate")
            ):
                return StoreUnavailable(
                    f"TLS with etcd at {endpoint} failed ({details}); check --etcd-cafile, "
                    "--etcd-certfile and --etcd-keyfile, and https:// in --etcd-endpoints"
                )
            return StoreUnavailable(self._unreachable(endpoint, details))
        return StoreUnavailable(f"etcd at {endpoint} failed a request: {details}")


class _TokenExpired(Exception):
    """etcd forgot our auth token (it lives 5 minutes unused by default): log in again."""


def _ttl_window(client: _PyEtcd, window: list[int]) -> dict[int, int]:
    stub = client.leasestub
    futures = [
        stub.LeaseTimeToLive.future(
            etcdrpc.LeaseTimeToLiveRequest(ID=lease_id),
            client.timeout,
            credentials=client.call_credentials,
            metadata=client.metadata,
        )
        for lease_id in window
    ]
    try:
        return {lease_id: f.result().TTL for lease_id, f in zip(window, futures, strict=True)}
    except grpc.RpcError as exc:
        mark_failed_member(client, exc)
        raise


_MEMBER_DOWN = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
)


def mark_failed_member(client: _PyEtcd, exc: grpc.RpcError) -> None:
    """Make the next request go to another member, as pyetcd's own calls do on such errors."""
    if exc.code() in _MEMBER_DOWN:
        client.endpoint_in_use.fail()
        client._clear_old_stubs()


def _batch(response: Any) -> WatchBatch:
    events = [
        WatchEvent(
            deleted=isinstance(event, pyetcd_events.DeleteEvent),
            kv=KeyValue(
                event.key.decode(errors="replace"), event.value, event.mod_revision, event.lease
            ),
        )
        for event in response.events
    ]
    return WatchBatch(response.header.revision, events)


def _kv(kv: Any) -> KeyValue:
    return KeyValue(kv.key.decode(errors="replace"), kv.value, kv.mod_revision, kv.lease)


def _credentials(settings: EtcdSettings) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.cafile, "--etcd-cafile"),
        private_key=_read(settings.keyfile, "--etcd-keyfile"),
        certificate_chain=_read(settings.certfile, "--etcd-certfile"),
    )


def _read(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror})") from None


class WatchStream:
    """One etcd watch, re-opened after the last event handled.

    pyetcd delivers on its own thread; batches go through a queue so the caller reads them
    with a timeout, and so a batch only counts as handled once the caller advanced past it.
    """

    def __init__(self, client: EtcdClient, key: str, *, prefix: bool) -> None:
        self._client = client
        self._key = key
        self._prefix = prefix
        self._next_revision: int | None = None
        self._resuming = False
        self._watch_id: int | None = None
        self._endpoint = client.endpoint  # the member the stream is on, for messages
        self._queue: queue.Queue[WatchBatch | BaseException | None] | None = None

    @property
    def is_started(self) -> bool:
        return self._next_revision is not None

    def start(self, revision: int) -> None:
        """Watch from ``revision`` (the one after a read of what is being watched)."""
        self.close()
        self._next_revision = revision

    def open(self) -> None:
        """Open the watch now rather than at the first next() (no-op when open).

        Raises Rewound when resuming at a revision the store no longer reaches, and
        StoreUnavailable when etcd cannot be reached.
        """
        if self._queue is not None:
            return
        assert self._next_revision is not None, "start() first"
        if self._resuming:
            now = self._client.revision(self._key)
            if now < self._next_revision - 1:
                raise Rewound(self._next_revision - 1, now)
        # A fresh queue per watch: late deliveries of an old watch cannot be mistaken for ours.
        deliveries: queue.Queue[WatchBatch | BaseException | None] = queue.Queue()
        self._watch_id = self._client.watch(
            self._key, deliveries.put, prefix=self._prefix, start_revision=self._next_revision
        )
        self._endpoint = self._client.endpoint
        self._queue = deliveries
        self._resuming = False

    def next(self, timeout: float) -> WatchBatch | None:
        """The next batch, or None when none came within ``timeout`` seconds.

        Raises Compacted when the watch fell behind, Rewound when the store went back,
        StoreUnavailable when the stream broke.
        """
        self.open()
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
        """Resume after ``batch``'s last event.

        Not after its header revision: while catching up etcd sends the current revision with
        each batch of older events, so resuming there after a break would skip the rest. A
        response without events (a progress notice) moves nothing.
        """
        assert self._next_revision is not None, "start() first"
        self._next_revision = resume_revision(self._next_revision, batch)

    def pause(self) -> None:
        """Drop the watch but remember where to resume."""
        if self._watch_id is not None:
            self._client.cancel_watch(self._watch_id)
        self._watch_id = None
        self._queue = None
        self._resuming = self._next_revision is not None

    def close(self) -> None:
        """Drop the watch and the revision: the next start() decides where to begin."""
        self.pause()
        self._next_revision = None
        self._resuming = False


def resume_revision(current: int, batch: WatchBatch) -> int:
    """The revision to resume a watch at after handling ``batch`` (see WatchStream.advance)."""
    if not batch.events:
        return current
    return max(current, batch.events[-1].kv.mod_revision + 1)


def _describe(item: BaseException | None) -> str:
    if item is None:
        return "the stream was closed"
    details = getattr(item, "details", None)
    return (details() if callable(details) else None) or str(item) or type(item).__name__

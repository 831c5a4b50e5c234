"""A local Alibaba Cloud for the ali-vpc backend's tests, the demo and the benchmarks.

- ``AlibabaVpcApi``: a fake of the VPC RPC API (version 2016-04-28) for route entries, on a
  free port. It speaks the real wire format, so the real aliyun-python-sdk-core and
  aliyun-python-sdk-vpc clients talk to it as they talk to Alibaba: ``POST /`` with every
  parameter in the query string, an HMAC-SHA1 signature it verifies, JSON answers, and errors
  as HTTP 4xx/5xx with ``{"RequestId","HostId","Code","Message","Recommend"}``.
- ``EcsMetadata``: the ECS instance metadata server (``/latest/meta-data/...``) of one
  instance, with RAM-role credentials the fake API accepts with their ``SecurityToken``.
- ``make_alibaba_vpc``: the scenario every test needs (a VPC in 198.18.0.0/16 with its vRouter,
  route tables, a vSwitch, instances and an access key), returned as typed ids.
- ``alibaba_client`` and ``at``: an ``AcsClient`` and its requests aimed at a lab endpoint
  (http, the SDK's retries off).
- ``AlibabaLab``: all of it for a cluster of agents, the API behind a counting fault proxy.

What the fake does as Alibaba does, because the backend must cope with it:
- A new entry is ``Pending`` for ``pending_seconds`` (0 by default), then ``Available``; one
  retargeted in place (``ModifyRouteEntry`` with ``NewNextHopId``) is ``Modifying`` as long;
  a deleted one is ``Deleting`` for ``delete_seconds`` (0: gone at once). Time comes from
  ``clock`` (``ManualClock`` lets a test move it).
- Changes conflict, all with HTTP 400:
  - a change to an entry that is not ``Available``: ``IncorrectRouteEntryStatus``;
  - any other write into a VPC while one of its entries is not Available (a route task in
    progress): ``conflict_code``, ``TaskConflict`` by default (Alibaba also documents
    ``IncorrectRouteEntryStatus`` for it);
  - a write into a VPC a test holds with ``hold_task``: ``TaskConflict`` or the code it
    names (e.g. ``OperationConflict``);
  - a write sooner than ``write_interval`` seconds (0 by default) after the last one in the
    VPC: ``TaskConflict`` (Alibaba allows route changes about every 5 s).
- A second entry for one destination in a table is ``InvalidCIDRBlock.Duplicate``; deleting a
  missing entry is ``InvalidRouteEntry.NotFound``; more custom entries in a table than
  ``route_quota`` (200 by default, per table with ``set_route_quota``) is ``QuotaExceeded``.
- The batch calls take at most 50 entries and answer per entry: ``SuccessCount``,
  ``FailedCount``, ``RouteEntryIds`` (create) and ``FailedRouteEntries`` with ``FailedCode``:
  ``VPC_ROUTE_ENTRY_CIDR_BLOCK_DUPLICATE`` and ``VPC_ROUTER_ENTRY_NOT_EXIST`` as Alibaba's
  documentation shows them, otherwise the code the single call would give (``QuotaExceeded``,
  ``InvalidNextHopId.NotFound``, ...). Request-level errors (signature, region, conflict,
  throttling) fail the whole call.
- ``forbid(action)`` answers ``Forbidden.RAM`` (403) for one action, for permission tests;
  ``DryRun=true`` on a write answers ``DryRunOperation`` (400) once credentials and permission
  pass, and changes nothing.
- Every call that names an action is counted per action (``counts()``), whatever its answer.

Throttling, 5xx and dropped answers come from the fault proxy in front of the fake
(cloudroutes.lab.fault_proxy, dialect ``ALIBABA``), as for the other clouds.

The SDK is imported only inside the functions that need it: importing cloudroutes.lab must
stay cheap for the demo and the tests that never touch Alibaba.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import math
import random
import secrets
import string
import threading
import time
import urllib.parse
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any

from cloudroutes.lab.fault_proxy import ALIBABA, FaultProxy
from cloudroutes.lab.http_service import (
    LOOPBACK,
    HttpService,
    LabCloud,
    LabHandler,
    TokenMetadataService,
)

# AcsClient is built at run time; the SDK ships no type information.
AcsClient = Any

API_VERSION = "2016-04-28"
DEFAULT_REGION = "cn-hangzhou"
# Part of 198.18.0.0/15, the benchmarking range (RFC 2544): never routed on the internet.
VPC_CIDR = "198.18.0.0/16"
DEFAULT_ROUTE_QUOTA = 200
BATCH_LIMIT = 50
MAX_RESULT_LIMIT = 100
DEFAULT_MAX_RESULT = 10
# Alibaba refuses requests signed more than 15 minutes away from its clock.
TIMESTAMP_SKEW = timedelta(minutes=15)
_STAMP = "%Y-%m-%dT%H:%M:%SZ"
# Alibaba's own cloud-service range; custom routes may not point into it.
_SERVICE_CIDR = ipaddress.ip_network("100.64.0.0/10")
_ID_CHARS = string.ascii_lowercase + string.digits
_ALWAYS = -math.inf
_TOO_FREQUENT = "The operation is too frequent, please wait a moment and try again."


class ManualClock:
    """A clock a test moves by hand: ``advance(30)`` makes a Pending entry Available without
    waiting 30 s."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


@dataclass(frozen=True)
class AccessKey:
    """An AccessKey pair the fake accepts; ``security_token`` is set for STS (RAM role)
    credentials. Secrets stay out of repr."""

    key_id: str
    secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
    expiration: datetime | None = None


@dataclass(frozen=True)
class LabRouteEntry:
    """One entry of a route table as the fake holds it (for a test's checks)."""

    entry_id: str
    table_id: str
    destination: str
    next_hop_type: str
    next_hop_id: str
    name: str
    description: str
    kind: str  # "Custom" | "System"
    status: str  # "Pending" | "Available" | "Deleting"


class ApiError(Exception):
    """An error answer of the API: code, message, HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(eq=False)
class _Entry:
    entry_id: str
    table_id: str
    destination: str
    next_hop_type: str
    next_hop_id: str
    name: str
    description: str
    kind: str
    seq: int
    ready_at: float
    modifying_until: float = _ALWAYS
    deleting_until: float | None = None

    def status(self, now: float) -> str:
        if self.deleting_until is not None:
            return "Deleting"
        if now < self.ready_at:
            return "Pending"
        return "Modifying" if now < self.modifying_until else "Available"


@dataclass(eq=False)
class _Table:
    table_id: str
    vpc_id: str
    vrouter_id: str
    kind: str  # "System" (the vRouter's own) | "Custom"
    name: str
    created: str
    entries: dict[str, _Entry] = field(default_factory=dict)


@dataclass(eq=False)
class _Vpc:
    vpc_id: str
    region: str
    cidr: str
    name: str
    vrouter_id: str
    created: str
    vswitches: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (cidr, zone)
    table_ids: list[str] = field(default_factory=list)
    last_write: float | None = None


@dataclass(frozen=True)
class _Instance:
    instance_id: str
    vpc_id: str
    vswitch_id: str
    private_ip: str
    name: str


Params = Mapping[str, str]


class AlibabaVpcApi(HttpService):
    """The fake VPC API on a free port of ``host`` (in ``netns`` if given).

    Set-up goes through methods, not HTTP (``add_vpc``, ``add_instance``, ``add_access_key``,
    or ``make_alibaba_vpc``). Behaviour knobs may change at any time, from any thread:
    ``pending_seconds``, ``delete_seconds``, ``write_interval``, ``conflict_code``,
    ``route_quota`` / ``set_route_quota``,
    ``hold_task`` / ``release_task``, ``forbid`` / ``allow``. ``reset()`` forgets everything.
    """

    def __init__(
        self,
        host: str = LOOPBACK,
        netns: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        pending_seconds: float = 0.0,
        delete_seconds: float = 0.0,
        write_interval: float = 0.0,
        route_quota: int = DEFAULT_ROUTE_QUOTA,
        seed: int = 0,
    ) -> None:
        super().__init__(host, netns)
        self.clock = clock
        self._initial_clock = clock
        self.pending_seconds = pending_seconds
        self.delete_seconds = delete_seconds
        self.write_interval = write_interval
        # Alibaba documents both for a write while a route task runs; a test picks one.
        self.conflict_code = "TaskConflict"
        self.route_quota = route_quota
        self._seed = seed
        self._lock = threading.RLock()
        self._reset_state()

    def _reset_state(self) -> None:
        self._random = random.Random(self._seed)
        self._vpcs: dict[str, _Vpc] = {}
        self._tables: dict[str, _Table] = {}
        self._instances: dict[str, _Instance] = {}
        self._keys: dict[str, AccessKey] = {}
        self._quota_overrides: dict[str, int] = {}
        self._held: dict[str, str] = {}
        self._forbidden: dict[str, str] = {}
        self._nonces: OrderedDict[str, None] = OrderedDict()
        self._client_tokens: dict[tuple[str, str], dict[str, Any]] = {}
        self._counts: Counter[str] = Counter()
        self._seq = 0

    # -- set-up (not over HTTP) -----------------------------------------------------------

    def reset(self) -> None:
        """Forget every VPC, key, entry, knob and count; the clock is the one it started with."""
        with self._lock:
            self._reset_state()
            self.clock = self._initial_clock
            self.pending_seconds = 0.0
            self.delete_seconds = 0.0
            self.write_interval = 0.0
            self.conflict_code = "TaskConflict"
            self.route_quota = DEFAULT_ROUTE_QUOTA

    def new_id(self, prefix: str, length: int = 22) -> str:
        with self._lock:
            return prefix + "".join(self._random.choice(_ID_CHARS) for _ in range(length))

    def add_access_key(self, key_id: str | None = None, secret: str | None = None) -> AccessKey:
        """A long-term AccessKey pair the API accepts."""
        key = AccessKey(
            key_id or "LTAI" + secrets.token_hex(10), secret or secrets.token_urlsafe(22)
        )
        with self._lock:
            self._keys[key.key_id] = key
        return key

    def issue_sts_credentials(self, lifetime: timedelta = timedelta(hours=1)) -> AccessKey:
        """Temporary credentials (what a RAM role gives an instance): valid with their
        ``SecurityToken`` until ``expiration``."""
        key = AccessKey(
            key_id="STS." + secrets.token_hex(12),
            secret=secrets.token_urlsafe(30),
            security_token=secrets.token_urlsafe(90),
            expiration=(datetime.now(UTC) + lifetime).replace(microsecond=0),
        )
        with self._lock:
            self._keys[key.key_id] = key
        return key

    def revoke(self, key_id: str) -> None:
        with self._lock:
            self._keys.pop(key_id, None)

    def add_vpc(self, region: str = DEFAULT_REGION, cidr: str = VPC_CIDR, name: str = "") -> str:
        """A VPC with its vRouter and the vRouter's system route table; returns the VPC id."""
        with self._lock:
            vpc = _Vpc(
                vpc_id=self.new_id("vpc-"),
                region=region,
                cidr=str(ipaddress.ip_network(cidr)),
                name=name,
                vrouter_id=self.new_id("vrt-"),
                created=_now_stamp(),
            )
            self._vpcs[vpc.vpc_id] = vpc
            self._add_table(vpc, "System", "")
            return vpc.vpc_id

    def vrouter_id(self, vpc_id: str) -> str:
        with self._lock:
            return self._vpcs[vpc_id].vrouter_id

    def route_table_ids(self, vpc_id: str) -> tuple[str, ...]:
        """The VPC's route tables, the vRouter's system table first."""
        with self._lock:
            return tuple(self._vpcs[vpc_id].table_ids)

    def add_route_table(self, vpc_id: str, name: str = "") -> str:
        """A custom route table in the VPC's vRouter; returns its id."""
        with self._lock:
            return self._add_table(self._vpcs[vpc_id], "Custom", name).table_id

    def _add_table(self, vpc: _Vpc, kind: str, name: str) -> _Table:
        table = _Table(self.new_id("vtb-"), vpc.vpc_id, vpc.vrouter_id, kind, name, _now_stamp())
        self._tables[table.table_id] = table
        vpc.table_ids.append(table.table_id)
        # Every table routes the vSwitches of its VPC and Alibaba's service range itself.
        for cidr, _zone in vpc.vswitches.values():
            self._put(table, cidr, "local", "", kind="System")
        self._put(table, str(_SERVICE_CIDR), "service", "", kind="System")
        return table

    def add_vswitch(self, vpc_id: str, cidr: str, zone: str = "") -> str:
        """A vSwitch (subnet) of the VPC; each table gets its System entry."""
        with self._lock:
            vpc = self._vpcs[vpc_id]
            net = ipaddress.ip_network(cidr)
            if not net.subnet_of(ipaddress.ip_network(vpc.cidr)):  # type: ignore[arg-type]
                raise ValueError(f"vSwitch {cidr} is not inside VPC {vpc.cidr}")
            vswitch_id = self.new_id("vsw-")
            vpc.vswitches[vswitch_id] = (str(net), zone or f"{vpc.region}-a")
            for table_id in vpc.table_ids:
                self._put(self._tables[table_id], str(net), "local", "", kind="System")
            return vswitch_id

    def add_instance(self, vpc_id: str, vswitch_id: str, private_ip: str, name: str = "") -> str:
        """An ECS instance in the vSwitch; a route's next hop may name it."""
        with self._lock:
            vpc = self._vpcs[vpc_id]
            cidr, _zone = vpc.vswitches[vswitch_id]
            if ipaddress.ip_address(private_ip) not in ipaddress.ip_network(cidr):
                raise ValueError(f"{private_ip} is not in vSwitch {cidr}")
            instance_id = self.new_id("i-", 20)
            self._instances[instance_id] = _Instance(
                instance_id, vpc_id, vswitch_id, private_ip, name
            )
            return instance_id

    def remove_instance(self, instance_id: str) -> None:
        """The instance is released: new routes may no longer name it (existing ones stay)."""
        with self._lock:
            self._instances.pop(instance_id, None)

    def put_entry(
        self,
        table_id: str,
        destination: str,
        next_hop_id: str,
        *,
        next_hop_type: str = "Instance",
        name: str = "",
        description: str = "",
    ) -> str:
        """An Available custom entry made outside the API (another tool's route); no checks,
        no counts. Returns its id."""
        with self._lock:
            net = str(ipaddress.ip_network(destination))
            entry = self._put(self._tables[table_id], net, next_hop_type, next_hop_id)
            entry.name, entry.description = name, description
            return entry.entry_id

    def _put(
        self,
        table: _Table,
        destination: str,
        next_hop_type: str,
        next_hop_id: str,
        kind: str = "Custom",
        ready_at: float | None = None,
    ) -> _Entry:
        self._seq += 1
        entry = _Entry(
            entry_id=self.new_id("rte-"),
            table_id=table.table_id,
            destination=destination,
            next_hop_type=next_hop_type,
            next_hop_id=next_hop_id,
            name="",
            description="",
            kind=kind,
            seq=self._seq,
            # Entries made by set-up are ready whatever clock a test switches to later.
            ready_at=_ALWAYS if ready_at is None else ready_at,
        )
        table.entries[entry.entry_id] = entry
        return entry

    # -- knobs ----------------------------------------------------------------------------

    def set_route_quota(self, limit: int, table_id: str | None = None) -> None:
        """Custom entries allowed in ``table_id`` (every table without an own limit: None)."""
        with self._lock:
            if table_id is None:
                self.route_quota = limit
            else:
                self._quota_overrides[table_id] = limit

    def hold_task(self, vpc_id: str, code: str = "TaskConflict") -> None:
        """Pretend a route task runs in the VPC: every write into it fails with ``code``
        until ``release_task``."""
        with self._lock:
            self._held[vpc_id] = code

    def release_task(self, vpc_id: str) -> None:
        with self._lock:
            self._held.pop(vpc_id, None)

    def forbid(self, action: str, code: str = "Forbidden.RAM") -> None:
        """Calls of ``action`` fail with 403 ``code``, as for a RAM user without the right."""
        with self._lock:
            self._forbidden[action] = code

    def allow(self, action: str) -> None:
        with self._lock:
            self._forbidden.pop(action, None)

    # -- checks ---------------------------------------------------------------------------

    def counts(self) -> Counter[str]:
        """Calls per action that reached the fake (every answer counts, errors too)."""
        with self._lock:
            return Counter(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def entries(self, table_id: str, kind: str | None = "Custom") -> tuple[LabRouteEntry, ...]:
        """The entries of a table (custom ones unless ``kind`` says otherwise), oldest first."""
        with self._lock:
            table = self._tables[table_id]
            now = self._expire(table)
            return tuple(
                LabRouteEntry(
                    e.entry_id,
                    e.table_id,
                    e.destination,
                    e.next_hop_type,
                    e.next_hop_id,
                    e.name,
                    e.description,
                    e.kind,
                    e.status(now),
                )
                for e in sorted(table.entries.values(), key=lambda e: e.seq)
                if kind is None or e.kind == kind
            )

    # -- HTTP -----------------------------------------------------------------------------

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _api_handler(self)

    def answer(self, method: str, params: Params) -> tuple[int, dict[str, Any]]:
        """The (status, JSON document) for one request's parameters (query and form)."""
        request_id = str(uuid.uuid4()).upper()
        region = params.get("RegionId", "")
        try:
            body = self._dispatch(method, params)
        except Exception as exc:
            # A bug in the fake must reach the test as an API error, not a reset connection.
            err = (
                exc
                if isinstance(exc, ApiError)
                else ApiError("InternalError", f"lab: {type(exc).__name__}: {exc}", 500)
            )
            return err.status, {
                "RequestId": request_id,
                "HostId": f"vpc.{region}.aliyuncs.com" if region else "vpc.aliyuncs.com",
                "Code": err.code,
                "Message": err.message,
                "Recommend": f"https://api.aliyun.com/troubleshoot?q={err.code}&product=Vpc",
            }
        return 200, {"RequestId": request_id, **body}

    def _dispatch(self, method: str, params: Params) -> dict[str, Any]:
        action = params.get("Action", "")
        if not action:
            raise ApiError("MissingAction", "Action is mandatory for this request.", 400)
        with self._lock:
            self._counts[action] += 1
        handler = _ACTIONS.get(action)
        if handler is None:
            raise ApiError(
                "InvalidAction.NotFound",
                "Specified api is not found, please check your url and method.",
                404,
            )
        if params.get("Version") != API_VERSION:
            raise ApiError(
                "InvalidVersion",
                f"Specified parameter Version is not valid (Vpc {API_VERSION}).",
                400,
            )
        self._authenticate(method, params)
        with self._lock:
            code = self._forbidden.get(action)
        if code is not None:
            raise ApiError(
                code,
                "User not authorized to operate on the specified resource, or this API "
                "doesn't support RAM.",
                403,
            )
        _require(params, "RegionId")
        if params.get("DryRun", "").lower() == "true" and not action.startswith("Describe"):
            # Checks credentials and permission only (a backend's start-up check); the
            # parameters are not validated as the real dry run would.
            raise ApiError(
                "DryRunOperation", "Request validation has been passed with DryRun flag set."
            )
        with self._lock:
            return handler(self, params)

    def _authenticate(self, method: str, params: Params) -> None:
        for name in ("AccessKeyId", "Signature", "SignatureNonce", "Timestamp"):
            _require(params, name)
        if params.get("SignatureMethod", "HMAC-SHA1") != "HMAC-SHA1":
            raise ApiError(
                "InvalidSignatureMethod", "Specified signature method is not supported.", 400
            )
        try:
            stamp = datetime.strptime(params["Timestamp"], _STAMP).replace(tzinfo=UTC)
        except ValueError:
            raise ApiError(
                "InvalidTimeStamp.Format",
                "Specified time stamp or date value is not well formatted.",
                400,
            ) from None
        if abs(datetime.now(UTC) - stamp) > TIMESTAMP_SKEW:
            raise ApiError(
                "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired.", 400
            )
        with self._lock:
            key = self._keys.get(params["AccessKeyId"])
        if key is None:
            raise ApiError("InvalidAccessKeyId.NotFound", "Specified access key is not found.", 404)
        to_sign = string_to_sign(method, {k: v for k, v in params.items() if k != "Signature"})
        if not hmac.compare_digest(
            sign(to_sign, key.secret).encode(), params["Signature"].encode()
        ):
            raise ApiError(
                "SignatureDoesNotMatch",
                "Specified signature is not matched with our calculation. "
                f"server string to sign is:{to_sign}",
                400,
            )
        if key.security_token is not None:
            token = params.get("SecurityToken")
            if not token:
                raise ApiError(
                    "MissingSecurityToken", "SecurityToken is mandatory for this action.", 400
                )
            if not hmac.compare_digest(token.encode(), key.security_token.encode()):
                raise ApiError(
                    "InvalidSecurityToken.MismatchWithAccessKey",
                    "Specified SecurityToken mismatch with the AccessKey.",
                    400,
                )
            if key.expiration is not None and datetime.now(UTC) >= key.expiration:
                raise ApiError(
                    "InvalidSecurityToken.Expired", "Specified SecurityToken is expired.", 400
                )
        with self._lock:
            nonce = params["SignatureNonce"]
            if nonce in self._nonces:
                raise ApiError(
                    "SignatureNonceUsed", "Specified signature nonce was used already.", 400
                )
            self._nonces[nonce] = None
            while len(self._nonces) > 100_000:
                self._nonces.popitem(last=False)

    # -- state helpers (called with the lock held) ----------------------------------------

    def _expire(self, table: _Table) -> float:
        """Drop entries whose deletion finished; returns the time it judged by."""
        now = self.clock()
        for entry in list(table.entries.values()):
            if entry.deleting_until is not None and now >= entry.deleting_until:
                del table.entries[entry.entry_id]
        return now

    def _table(self, params: Params, table_id: str) -> _Table:
        table = self._tables.get(table_id)
        if table is None or self._vpcs[table.vpc_id].region != params["RegionId"]:
            raise ApiError(
                "InvalidRouteTableId.NotFound", "Specified route table does not exist.", 404
            )
        self._expire(table)
        return table

    def _check_vpc_idle(self, vpc_id: str) -> None:
        held = self._held.get(vpc_id)
        if held is not None:
            raise ApiError(held, _TOO_FREQUENT)
        now = self.clock()
        vpc = self._vpcs[vpc_id]
        if vpc.last_write is not None and now - vpc.last_write < self.write_interval:
            raise ApiError("TaskConflict", _TOO_FREQUENT)
        for table_id in vpc.table_ids:
            table = self._tables[table_id]
            self._expire(table)
            if any(e.status(now) != "Available" for e in table.entries.values()):
                raise ApiError(
                    self.conflict_code,
                    _TOO_FREQUENT
                    if self.conflict_code == "TaskConflict"
                    else "Some route entry status blocked this operation.",
                )

    def _quota(self, table_id: str) -> int:
        return self._quota_overrides.get(table_id, self.route_quota)

    def _validate_new(
        self, table: _Table, destination: str, hop_type: str, hop_id: str, name: str, desc: str
    ) -> str:
        """The normalised destination of a new custom entry, or the ApiError refusing it."""
        net = _cidr(destination)
        vpc = self._vpcs[table.vpc_id]
        if net.version == 4 and (
            net.overlaps(_SERVICE_CIDR)
            or any(net.overlaps(ipaddress.ip_network(c)) for c, _z in vpc.vswitches.values())
        ):
            raise ApiError(
                "InvalidCidrBlock",
                f"Specified CIDR block is not valid: {net} overlaps a vSwitch of the VPC or "
                "100.64.0.0/10.",
            )
        if hop_type != "Instance":
            raise ApiError("InvalidNextHopType", 'Specified parameter "NextHopType" is not valid')
        if not hop_id:
            raise ApiError("MissingNextHopId", "NextHopId is mandatory for this action.")
        instance = self._instances.get(hop_id)
        if instance is None or instance.vpc_id != table.vpc_id:
            raise ApiError("InvalidNextHopId.NotFound", "Specified next hop does not exist.", 404)
        _check_text(name, "RouteEntryName", 128)
        _check_text(desc, "Description", 256)
        if any(e.destination == str(net) for e in table.entries.values()):
            raise ApiError("InvalidCIDRBlock.Duplicate", "Specified CIDR block is already exists.")
        custom = sum(1 for e in table.entries.values() if e.kind == "Custom")
        if custom >= self._quota(table.table_id):
            raise ApiError("QuotaExceeded", "Route entry quota exceeded in this route table.")
        return str(net)

    def _batch(self, params: Params) -> tuple[list[dict[str, str]], list[_Table]]:
        """The entries of a batch call and their tables, once the whole call may go ahead."""
        items = _repeat_list(params, "RouteEntries")
        if not items:
            raise ApiError("MissingRouteEntries", "RouteEntries is mandatory for this action.")
        if len(items) > BATCH_LIMIT:
            raise ApiError(
                "InvalidParameter.RouteEntries",
                f"At most {BATCH_LIMIT} route entries may be given in one call.",
            )
        tables = [self._table(params, _require(item, "RouteTableId")) for item in items]
        for vpc_id in dict.fromkeys(t.vpc_id for t in tables):
            self._check_vpc_idle(vpc_id)
        return items, tables

    def _wrote(self, table: _Table) -> None:
        self._vpcs[table.vpc_id].last_write = self.clock()

    def _create(self, table: _Table, destination: str, hop_id: str, name: str, desc: str) -> _Entry:
        entry = self._put(
            table,
            destination,
            "Instance",
            hop_id,
            ready_at=self.clock() + self.pending_seconds,
        )
        entry.name, entry.description = name, desc
        self._wrote(table)
        return entry

    def _find_entry(
        self, region: str, table: _Table | None, entry_id: str, destination: str, hop_id: str
    ) -> _Entry:
        """The custom entry a change names: by id, or by table and destination (and, if
        given, next hop)."""
        missing = ApiError("InvalidRouteEntry.NotFound", "Route entry not exists.")
        if entry_id:
            tables = [table] if table is not None else self._region_tables(region)
            for t in tables:
                self._expire(t)
                if entry_id in t.entries:
                    entry = t.entries[entry_id]
                    break
            else:
                raise missing
        else:
            if table is None:
                raise ApiError("MissingRouteTableId", "RouteTableId is mandatory for this action.")
            net = str(_cidr(destination))
            found = [e for e in table.entries.values() if e.destination == net]
            if not found or (hop_id and found[0].next_hop_id != hop_id):
                raise missing
            entry = found[0]
        if entry.kind != "Custom":
            raise ApiError(
                "OperationDenied", "Specified operation is denied as route entry type is system."
            )
        return entry

    def _region_tables(self, region: str) -> list[_Table]:
        return [t for t in self._tables.values() if self._vpcs[t.vpc_id].region == region]

    def _entry_to_change(self, params: Params, hop_param: str) -> _Entry:
        """The one entry a DeleteRouteEntry or ModifyRouteEntry call names, once it may
        change: Available, in a VPC with no route task running."""
        entry_id = params.get("RouteEntryId", "")
        table_id = params.get("RouteTableId", "")
        table = self._table(params, table_id) if table_id else None
        if not entry_id:
            _require(params, "DestinationCidrBlock")
        entry = self._find_entry(
            params["RegionId"],
            table,
            entry_id,
            params.get("DestinationCidrBlock", ""),
            params.get(hop_param, ""),
        )
        if entry.status(self.clock()) != "Available":
            raise ApiError("IncorrectRouteEntryStatus", "Specified routeEntry status error.")
        self._check_vpc_idle(self._tables[entry.table_id].vpc_id)
        return entry

    def _delete(self, entry: _Entry) -> None:
        now = self.clock()
        if entry.status(now) != "Available":
            raise ApiError("IncorrectRouteEntryStatus", "Specified routeEntry status error.")
        table = self._tables[entry.table_id]
        if self.delete_seconds > 0:
            entry.deleting_until = now + self.delete_seconds
        else:
            del table.entries[entry.entry_id]
        self._wrote(table)

    def _render(self, entry: _Entry, now: float) -> dict[str, Any]:
        hop = {"NextHopType": entry.next_hop_type, "NextHopId": entry.next_hop_id, "Enabled": 1}
        return {
            "RouteEntryId": entry.entry_id,
            "RouteTableId": entry.table_id,
            "DestinationCidrBlock": entry.destination,
            "Type": entry.kind,
            "Status": entry.status(now),
            "RouteEntryName": entry.name,
            "Description": entry.description,
            "IpVersion": _ip_version(entry.destination),
            "NextHops": {"NextHop": [hop]},
        }

    # -- actions --------------------------------------------------------------------------

    def _create_route_entry(self, params: Params) -> dict[str, Any]:
        table_id = _require(params, "RouteTableId")
        destination = _require(params, "DestinationCidrBlock")
        cached = self._replay(params)
        if cached is not None:
            return cached
        table = self._table(params, table_id)
        net = _cidr(destination)
        existing = [e for e in table.entries.values() if e.destination == str(net)]
        now = self.clock()
        if existing and existing[0].status(now) != "Available":
            raise ApiError(
                "IncorrectRouteEntryStatus", "Some route entry status blocked this operation."
            )
        self._check_vpc_idle(table.vpc_id)
        name, desc = params.get("RouteEntryName", ""), params.get("Description", "")
        hop_id = params.get("NextHopId", "")
        dest = self._validate_new(
            table, destination, params.get("NextHopType", "Instance"), hop_id, name, desc
        )
        entry = self._create(table, dest, hop_id, name, desc)
        return self._remember(params, {"RouteEntryId": entry.entry_id})

    def _create_route_entries(self, params: Params) -> dict[str, Any]:
        items, tables = self._batch(params)
        ids: list[str] = []
        failed: list[dict[str, str]] = []
        for item, table in zip(items, tables, strict=True):
            destination = item.get("DstCidrBlock", "")
            hop_id = item.get("NextHop", "")
            name, desc = item.get("Name", ""), item.get("Description", "")
            try:
                if not destination:
                    raise ApiError("MissingDstCidrBlock", "DstCidrBlock is mandatory.")
                dest = self._validate_new(
                    table, destination, item.get("NextHopType", "Instance"), hop_id, name, desc
                )
            except ApiError as err:
                code = err.code
                message = err.message
                if code == "InvalidCIDRBlock.Duplicate":
                    code = "VPC_ROUTE_ENTRY_CIDR_BLOCK_DUPLICATE"
                    message = (
                        f"Specified CIDR block is already exists, entry.cidrBlock={destination}"
                    )
                failed.append(
                    {
                        "DstCidrBlock": destination,
                        "NextHop": hop_id,
                        "FailedCode": code,
                        "FailedMessage": message,
                    }
                )
                continue
            ids.append(self._create(table, dest, hop_id, name, desc).entry_id)
        return {
            "SuccessCount": len(ids),
            "FailedCount": len(failed),
            "RouteEntryIds": ids,
            "FailedRouteEntries": failed,
        }

    def _delete_route_entry(self, params: Params) -> dict[str, Any]:
        self._delete(self._entry_to_change(params, "NextHopId"))
        return {}

    def _modify_route_entry(self, params: Params) -> dict[str, Any]:
        """Rename an entry, or retarget it in place (NewNextHopId): no moment without it."""
        entry = self._entry_to_change(params, "")
        name = params.get("RouteEntryName", entry.name)
        desc = params.get("Description", entry.description)
        _check_text(name, "RouteEntryName", 128)
        _check_text(desc, "Description", 256)
        new_hop = params.get("NewNextHopId", "")
        if new_hop and new_hop != entry.next_hop_id:
            if params.get("NewNextHopType", "Instance") != "Instance":
                raise ApiError(
                    "InvalidNextHopType", 'Specified parameter "NewNextHopType" is not valid'
                )
            instance = self._instances.get(new_hop)
            if instance is None or instance.vpc_id != self._tables[entry.table_id].vpc_id:
                raise ApiError(
                    "InvalidNextHopId.NotFound", "Specified next hop does not exist.", 404
                )
            entry.next_hop_id = new_hop
            entry.modifying_until = self.clock() + self.pending_seconds
        entry.name, entry.description = name, desc
        self._wrote(self._tables[entry.table_id])
        return {}

    def _delete_route_entries(self, params: Params) -> dict[str, Any]:
        items, tables = self._batch(params)
        done = 0
        failed: list[dict[str, str]] = []
        for item, table in zip(items, tables, strict=True):
            entry_id = item.get("RouteEntryId", "")
            destination = item.get("DstCidrBlock", "")
            hop = item.get("NextHop", "")
            try:
                if not entry_id and not (destination and hop):
                    raise ApiError(
                        "MissingParameter",
                        "RouteEntryId, or DstCidrBlock and NextHop, is required.",
                    )
                entry = self._find_entry(params["RegionId"], table, entry_id, destination, hop)
                self._delete(entry)
            except ApiError as err:
                code, message = err.code, err.message
                if code == "InvalidRouteEntry.NotFound":
                    code, message = "VPC_ROUTER_ENTRY_NOT_EXIST", "vRouterEntry not exists"
                failed.append(
                    {
                        "RouteEntryId": entry_id,
                        "DstCidrBlock": destination,
                        "NextHop": hop,
                        "FailedCode": code,
                        "FailedMessage": message,
                    }
                )
                continue
            done += 1
        return {"SuccessCount": done, "FailedCount": len(failed), "FailedRouteEntries": failed}

    def _describe_route_entry_list(self, params: Params) -> dict[str, Any]:
        table = self._table(params, _require(params, "RouteTableId"))
        limit = _int_param(params, "MaxResult", DEFAULT_MAX_RESULT, 1, MAX_RESULT_LIMIT)
        after = _decode_token(params.get("NextToken", ""))
        now = self.clock()
        wanted_dest = params.get("DestinationCidrBlock", "")
        if wanted_dest:
            wanted_dest = str(_cidr(wanted_dest))
        # DestCidrBlockList.N: only these destinations (a backend asking for its own).
        only = {str(_cidr(d)) for key, d in params.items() if key.startswith("DestCidrBlockList.")}
        filters: dict[str, Callable[[_Entry], bool]] = {
            "RouteEntryType": lambda e: e.kind == params["RouteEntryType"],
            "RouteEntryId": lambda e: e.entry_id == params["RouteEntryId"],
            "DestinationCidrBlock": lambda e: e.destination == wanted_dest,
            "NextHopId": lambda e: e.next_hop_id == params["NextHopId"],
            "NextHopType": lambda e: e.next_hop_type == params["NextHopType"],
            "RouteEntryName": lambda e: e.name == params["RouteEntryName"],
            "IpVersion": lambda e: _ip_version(e.destination) == params["IpVersion"].lower(),
        }
        active = [check for name, check in filters.items() if params.get(name)]
        if only:
            active.append(lambda e: e.destination in only)
        matching = [
            e
            for e in sorted(table.entries.values(), key=lambda e: e.seq)
            if all(check(e) for check in active)
        ]
        page = [e for e in matching if e.seq > after][:limit]
        more = page and any(e.seq > page[-1].seq for e in matching)
        return {
            "NextToken": _encode_token(page[-1].seq) if more else "",
            "TotalCount": len(matching),
            "RouteEntrys": {"RouteEntry": [self._render(e, now) for e in page]},
        }

    def _describe_vpcs(self, params: Params) -> dict[str, Any]:
        wanted = _id_list(params.get("VpcId", ""))
        vpcs = [
            v
            for v in self._vpcs.values()
            if v.region == params["RegionId"] and (not wanted or v.vpc_id in wanted)
        ]
        page, number, size = _page(params, vpcs)
        return {
            "TotalCount": len(vpcs),
            "PageNumber": number,
            "PageSize": size,
            "Vpcs": {
                "Vpc": [
                    {
                        "VpcId": v.vpc_id,
                        "RegionId": v.region,
                        "Status": "Available",
                        "VpcName": v.name,
                        "CreationTime": v.created,
                        "CidrBlock": v.cidr,
                        "VRouterId": v.vrouter_id,
                        "IsDefault": False,
                        "VSwitchIds": {"VSwitchId": list(v.vswitches)},
                        "RouterTableIds": {"RouterTableIds": list(v.table_ids)},
                    }
                    for v in page
                ]
            },
        }

    def _describe_vrouters(self, params: Params) -> dict[str, Any]:
        wanted = params.get("VRouterId", "")
        vpcs = [
            v
            for v in self._vpcs.values()
            if v.region == params["RegionId"] and (not wanted or v.vrouter_id == wanted)
        ]
        page, number, size = _page(params, vpcs)
        return {
            "TotalCount": len(vpcs),
            "PageNumber": number,
            "PageSize": size,
            "VRouters": {
                "VRouter": [
                    {
                        "VRouterId": v.vrouter_id,
                        "RegionId": v.region,
                        "VpcId": v.vpc_id,
                        "VRouterName": "",
                        "Description": "",
                        "CreationTime": v.created,
                        "RouteTableIds": {"RouteTableId": list(v.table_ids)},
                    }
                    for v in page
                ]
            },
        }

    def _describe_route_table_list(self, params: Params) -> dict[str, Any]:
        want_vpc = params.get("VpcId", "")
        want_router = params.get("RouterId", "")
        want_table = params.get("RouteTableId", "")
        tables = [
            t
            for t in self._tables.values()
            if self._vpcs[t.vpc_id].region == params["RegionId"]
            and (not want_vpc or t.vpc_id == want_vpc)
            and (not want_router or t.vrouter_id == want_router)
            and (not want_table or t.table_id == want_table)
        ]
        page, number, size = _page(params, tables)
        return {
            "TotalCount": len(tables),
            "PageNumber": number,
            "PageSize": size,
            "RouterTableList": {
                "RouterTableListType": [
                    {
                        "RouteTableId": t.table_id,
                        "RouteTableType": t.kind,
                        "RouterType": "VRouter",
                        "RouterId": t.vrouter_id,
                        "VpcId": t.vpc_id,
                        "RouteTableName": t.name,
                        "Description": "",
                        "Status": "Available",
                        "CreationTime": t.created,
                        "VSwitchIds": {"VSwitchId": []},
                    }
                    for t in page
                ]
            },
        }

    # -- idempotency (ClientToken) --------------------------------------------------------

    def _replay(self, params: Params) -> dict[str, Any] | None:
        token = params.get("ClientToken")
        return self._client_tokens.get((params["Action"], token)) if token else None

    def _remember(self, params: Params, body: dict[str, Any]) -> dict[str, Any]:
        token = params.get("ClientToken")
        if token:
            self._client_tokens[(params["Action"], token)] = body
        return body


_ACTIONS: dict[str, Callable[[AlibabaVpcApi, Params], dict[str, Any]]] = {
    "CreateRouteEntry": AlibabaVpcApi._create_route_entry,
    "CreateRouteEntries": AlibabaVpcApi._create_route_entries,
    "DeleteRouteEntry": AlibabaVpcApi._delete_route_entry,
    "DeleteRouteEntries": AlibabaVpcApi._delete_route_entries,
    "ModifyRouteEntry": AlibabaVpcApi._modify_route_entry,
    "DescribeRouteEntryList": AlibabaVpcApi._describe_route_entry_list,
    "DescribeVpcs": AlibabaVpcApi._describe_vpcs,
    "DescribeVRouters": AlibabaVpcApi._describe_vrouters,
    "DescribeRouteTableList": AlibabaVpcApi._describe_route_table_list,
}


# -- the wire format ------------------------------------------------------------------------


def percent_encode(value: str) -> str:
    """Alibaba's percent-encoding: RFC 3986, only unreserved characters left as they are."""
    return urllib.parse.quote(value, safe="-_.~")


def string_to_sign(method: str, params: Params) -> str:
    """What an RPC request's signature covers: method, "/", and the sorted, encoded query."""
    canonical = "&".join(
        f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(params.items())
    )
    return f"{method}&{percent_encode('/')}&{percent_encode(canonical)}"


def sign(to_sign: str, secret: str) -> str:
    digest = hmac.new(f"{secret}&".encode(), to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _ip_version(destination: str) -> str:
    return "ipv6" if ":" in destination else "ipv4"


def _now_stamp() -> str:
    return datetime.now(UTC).strftime(_STAMP)


def _require(params: Params, name: str) -> str:
    value = params.get(name, "")
    if not value:
        raise ApiError(f"Missing{name}", f"{name} is mandatory for this action.")
    return value


def _check_text(value: str, what: str, limit: int) -> None:
    if value and (len(value) > limit or value.startswith(("http://", "https://"))):
        raise ApiError(
            f"Invalid{what}.Malformed",
            f"Specified {what} is not valid: 1 to {limit} characters, not starting with "
            "http:// or https://.",
        )


def _cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        # A bare address is a /32 (a /128), as Alibaba reads it.
        return ipaddress.ip_network(value.strip())
    except ValueError:
        raise ApiError("InvalidCidrBlock.Malformed", "Specified CIDR block is not valid.") from None


def _int_param(params: Params, name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(
            f"InvalidParameter.{name}", f"Specified {name} is not valid: {low} to {high}."
        )
    return value


def _page(params: Params, items: Sequence[Any]) -> tuple[Sequence[Any], int, int]:
    number = _int_param(params, "PageNumber", 1, 1, 1_000_000)
    size = _int_param(params, "PageSize", 10, 1, 50)
    return items[(number - 1) * size : number * size], number, size


def _id_list(value: str) -> set[str]:
    return {v.strip() for v in value.split(",") if v.strip()}


def _repeat_list(params: Params, name: str) -> list[dict[str, str]]:
    """``Name.N.Field`` parameters as a list of dicts, in N order."""
    found: dict[int, dict[str, str]] = {}
    prefix = name + "."
    for key, value in params.items():
        if not key.startswith(prefix):
            continue
        index, _, sub = key[len(prefix) :].partition(".")
        if not index.isdigit() or not sub:
            raise ApiError(f"InvalidParameter.{name}", f"Specified parameter {key} is not valid.")
        found.setdefault(int(index), {})[sub] = value
    return [found[i] for i in sorted(found)]


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"rte:{seq}".encode()).decode()


def _decode_token(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, seq = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "rte":
            return int(seq)
    except (ValueError, UnicodeDecodeError):
        pass
    raise ApiError("InvalidNextToken", "Specified NextToken is not valid.")


def request_params(path: str, content_type: str, body: bytes) -> dict[str, str]:
    """The parameters of an RPC request: query string, and a form body if there is one."""
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query, keep_blank_values=True))
    if "x-www-form-urlencoded" in content_type and body:
        params.update(
            urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        )
    return params


def _send_json(handler: BaseHTTPRequestHandler, status: int, document: Mapping[str, Any]) -> None:
    data = json.dumps(document).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json;charset=utf-8")
    handler.send_header("Content-Length", str(len(data)))
    if "RequestId" in document:
        handler.send_header("x-acs-request-id", str(document["RequestId"]))
    handler.end_headers()
    handler.wfile.write(data)


def _api_handler(api: AlibabaVpcApi) -> type[BaseHTTPRequestHandler]:
    class Handler(LabHandler):
        def _call(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or self.headers.get("Transfer-Encoding"):
                # The body's end is unknown: answer and close rather than misread the stream.
                self.close_connection = True
                _send_json(self, 400, {"Code": "InvalidRequest", "Message": "No usable length."})
                return
            body = self.rfile.read(length)
            if urllib.parse.urlsplit(self.path).path != "/":
                _send_json(
                    self, 404, {"Code": "InvalidAction.NotFound", "Message": "No such path."}
                )
                return
            params = request_params(self.path, self.headers.get("Content-Type", ""), body)
            status, document = api.answer(self.command, params)
            _send_json(self, status, document)

        do_GET = do_POST = _call

    return Handler


# -- the ECS metadata server ----------------------------------------------------------------


@dataclass(frozen=True)
class LabEcsInstance:
    """An ECS instance of the lab VPC: what its metadata server tells the agent."""

    instance_id: str
    name: str
    region: str
    zone_id: str
    vpc_id: str
    vswitch_id: str
    private_ip: str
    mac: str


TOKEN_HEADER = "X-aliyun-ecs-metadata-token"
TTL_HEADER = "X-aliyun-ecs-metadata-token-ttl-seconds"
MAX_TOKEN_TTL = 21600


class EcsMetadata(TokenMetadataService):
    """The metadata server of one instance, on its own port (one per node).

    Serves ``/latest/meta-data/{region-id,zone-id,instance-id,vpc-id,vswitch-id,private-ipv4,
    mac,hostname,vpc-cidr-block,vswitch-cidr-block}`` and, when ``role`` is set, the RAM role's
    name at ``ram/security-credentials/`` and its STS credentials (issued by ``api``, so it
    accepts them) at ``ram/security-credentials/<role>``. ``require_token=True`` is the
    hardened mode: a GET needs a token from ``PUT /latest/api/token`` or gets 403.
    ``hits`` counts GETs per path; ``rotate_credentials()`` issues new credentials.
    """

    token_header = TOKEN_HEADER
    ttl_header = TTL_HEADER
    max_token_ttl = MAX_TOKEN_TTL
    refusal = (403, "Forbidden")

    def __init__(
        self,
        instance: LabEcsInstance,
        api: AlibabaVpcApi,
        role: str | None = "cloudroutes-node",
        *,
        vpc_cidr: str = VPC_CIDR,
        vswitch_cidr: str = "",
        require_token: bool = False,
        credential_lifetime: timedelta = timedelta(hours=1),
        host: str = LOOPBACK,
        netns: str | None = None,
    ) -> None:
        super().__init__(host, netns, require_token=require_token)
        self.instance = instance
        self.api = api
        self.role = role
        self.vpc_cidr = vpc_cidr
        self.vswitch_cidr = vswitch_cidr
        self.credential_lifetime = credential_lifetime
        self.credentials = api.issue_sts_credentials(credential_lifetime) if role else None

    def rotate_credentials(self) -> AccessKey:
        """New STS credentials for the role; the old ones stay valid until they expire."""
        self.credentials = self.api.issue_sts_credentials(self.credential_lifetime)
        return self.credentials

    def paths(self) -> dict[str, str]:
        inst = self.instance
        md = "latest/meta-data/"
        out = {
            f"{md}region-id": inst.region,
            f"{md}zone-id": inst.zone_id,
            f"{md}instance-id": inst.instance_id,
            f"{md}vpc-id": inst.vpc_id,
            f"{md}vswitch-id": inst.vswitch_id,
            f"{md}private-ipv4": inst.private_ip,
            f"{md}mac": inst.mac,
            f"{md}hostname": inst.name,
            f"{md}vpc-cidr-block": self.vpc_cidr,
            f"{md}vswitch-cidr-block": self.vswitch_cidr,
        }
        if self.role and self.credentials is not None:
            creds = self.credentials
            assert creds.expiration is not None and creds.security_token is not None
            out[f"{md}ram/security-credentials/"] = self.role
            out[f"{md}ram/security-credentials/{self.role}"] = json.dumps(
                {
                    "AccessKeyId": creds.key_id,
                    "AccessKeySecret": creds.secret,
                    "SecurityToken": creds.security_token,
                    "Expiration": creds.expiration.strftime(_STAMP),
                    "LastUpdated": _now_stamp(),
                    "Code": "Success",
                },
                indent=2,
            )
        # The index lists the top-level names, directories with a trailing "/", as ECS does.
        names = {p[len(md) :].partition("/")[0] + ("/" if "/" in p[len(md) :] else "") for p in out}
        out[md] = "\n".join(sorted(names))
        return out


# -- the scenario -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LabAlibabaVpc:
    """The ids of one lab VPC, as ``make_alibaba_vpc`` built it. ``route_table_ids[0]`` is
    the vRouter's system table; the others are custom tables of the same vRouter."""

    region: str
    vpc_id: str
    cidr: str
    vrouter_id: str
    route_table_ids: tuple[str, ...]
    vswitch_id: str
    vswitch_cidr: str
    zone_id: str
    instances: tuple[LabEcsInstance, ...]
    credentials: AccessKey

    @property
    def route_table_id(self) -> str:
        return self.route_table_ids[0]


def make_alibaba_vpc(
    api: AlibabaVpcApi,
    nodes: int = 3,
    tables: int = 1,
    *,
    region: str = DEFAULT_REGION,
    name: str = "cloudroutes-lab",
    private_ips: Sequence[str] | None = None,
) -> LabAlibabaVpc:
    """Build a VPC (198.18.0.0/16) with its vRouter, ``tables`` route tables (the system one
    and ``tables - 1`` custom ones), one /20 vSwitch, ``nodes`` instances at vSwitch base +
    10 + i (or at ``private_ips``), and a fresh AccessKey pair the API accepts."""
    if nodes < 0 or tables < 1 or nodes > 4000:
        raise ValueError("make_alibaba_vpc: 0 <= nodes <= 4000, tables >= 1")
    vswitch_net = next(ipaddress.ip_network(VPC_CIDR).subnets(new_prefix=20))
    if private_ips is None:
        ips = [str(vswitch_net.network_address + 10 + i) for i in range(nodes)]
    else:
        ips = list(private_ips)
        if len(ips) != nodes or len(set(ips)) != nodes:
            raise ValueError(f"make_alibaba_vpc: private_ips must be {nodes} distinct addresses")
    zone = f"{region}-a"
    vpc_id = api.add_vpc(region, VPC_CIDR, name)
    vswitch_id = api.add_vswitch(vpc_id, str(vswitch_net), zone)
    for i in range(tables - 1):
        api.add_route_table(vpc_id, f"{name}-rt{i + 1}")
    instances = []
    for i, ip in enumerate(ips):
        node_name = f"{name}-node{i}"
        instance_id = api.add_instance(vpc_id, vswitch_id, ip, node_name)
        mac = "00:16:3e:" + ":".join(f"{b:02x}" for b in (i >> 16 & 255, i >> 8 & 255, i & 255))
        instances.append(
            LabEcsInstance(instance_id, node_name, region, zone, vpc_id, vswitch_id, ip, mac)
        )
    return LabAlibabaVpc(
        region=region,
        vpc_id=vpc_id,
        cidr=VPC_CIDR,
        vrouter_id=api.vrouter_id(vpc_id),
        route_table_ids=api.route_table_ids(vpc_id),
        vswitch_id=vswitch_id,
        vswitch_cidr=str(vswitch_net),
        zone_id=zone,
        instances=tuple(instances),
        credentials=api.add_access_key(),
    )


def alibaba_client(
    endpoint_url: str,
    key: AccessKey,
    region: str = DEFAULT_REGION,
    timeout: float | None = None,
) -> AcsClient:
    """An AcsClient for the lab: the SDK's own retries off, STS credentials when ``key`` has a
    token. Requests must still be pointed at the lab with ``at(request, endpoint_url)``."""
    from aliyunsdkcore.auth.credentials import AccessKeyCredential, StsTokenCredential
    from aliyunsdkcore.client import AcsClient as Client

    port = urllib.parse.urlsplit(endpoint_url).port
    credential: object
    if key.security_token:
        credential = StsTokenCredential(key.key_id, key.secret, key.security_token)
    else:
        credential = AccessKeyCredential(key.key_id, key.secret)
    kwargs: dict[str, Any] = {}
    if timeout is not None:
        kwargs = {"timeout": timeout, "connect_timeout": timeout}
    return Client(region_id=region, credential=credential, port=port, auto_retry=False, **kwargs)


def at(request: Any, endpoint_url: str, region: str = DEFAULT_REGION) -> Any:
    """``request`` aimed at the lab endpoint, with the RegionId the real API requires.

    The SDK appends the client's port to the endpoint itself (an endpoint of
    ``http://host:port`` on a client with ``port=port`` becomes ``host:port:port``), so the
    request names the host only and the protocol separately; the port is the client's.
    """
    parts = urllib.parse.urlsplit(endpoint_url)
    request.set_endpoint(parts.hostname)
    request.set_protocol_type(parts.scheme)
    request.add_query_param("RegionId", region)
    return request


@dataclass(frozen=True)
class AlibabaNodeEndpoints:
    """What node i's agent needs to reach its cloud: the VPC API (through the lab's counting
    fault proxy) and its own metadata server. Region and credentials come from metadata."""

    api_url: str
    metadata_url: str
    region: str


@dataclass(eq=False)
class AlibabaLab(LabCloud):
    """A whole fake Alibaba Cloud for a cluster of agents: what the demo and benchmarks start.

    The fake API listens on loopback, for the lab's own set-up and checks (``admin``). The
    agents reach it through a counting ``FaultProxy`` (dialect ``ALIBABA``) and each has its
    own ``EcsMetadata`` whose RAM role's credentials the API accepts; those listen on ``host``
    inside ``netns`` when given (the demo's "cloud" namespace), else on loopback.
    """

    node_ips: Sequence[str]
    _: KW_ONLY
    region: str = DEFAULT_REGION
    tables: int = 1
    host: str = LOOPBACK
    netns: str | None = None
    seed: int = 0
    pending_seconds: float = 0.0
    api: AlibabaVpcApi = field(init=False)
    proxy: FaultProxy | None = field(default=None, init=False)
    metadata: list[EcsMetadata] = field(default_factory=list, init=False)
    vpc: LabAlibabaVpc | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.api = AlibabaVpcApi(pending_seconds=self.pending_seconds, seed=self.seed)

    def _start(self, started: ExitStack) -> None:
        started.enter_context(self.api)
        self.vpc = make_alibaba_vpc(
            self.api,
            nodes=len(self.node_ips),
            tables=self.tables,
            region=self.region,
            private_ips=self.node_ips,
        )
        proxy = FaultProxy(
            self.api.url, dialect=ALIBABA, seed=self.seed, host=self.host, netns=self.netns
        )
        self.proxy = started.enter_context(proxy)
        for instance in self.vpc.instances:
            server = EcsMetadata(
                instance,
                self.api,
                vswitch_cidr=self.vpc.vswitch_cidr,
                host=self.host,
                netns=self.netns,
            )
            self.metadata.append(started.enter_context(server))

    def admin(self) -> AcsClient:
        """A client straight to the fake (not counted by the proxy, no faults), for set-up
        and checks; send its requests with ``at(request, lab.api.url, lab.region)``."""
        assert self.vpc is not None, "AlibabaLab.start() first"
        return alibaba_client(self.api.url, self.vpc.credentials, self.region)

    def node(self, i: int) -> AlibabaNodeEndpoints:
        assert self.proxy is not None, "AlibabaLab.start() first"
        return AlibabaNodeEndpoints(self.proxy.url, self.metadata[i].url, self.region)

    def _forget(self) -> None:
        self.metadata.clear()
        self.proxy = None

"""One Alibaba Cloud VPC route table behind the route-table protocol.

Ownership follows the ledger rule (``cloudroutes.ledger``): an entry is ours only if it is a
Custom entry to an instance, lies inside the Network, and the ledger of this table records
its destination with that instance, or records it confirmed (the entry was made or adopted:
then one someone pointed at another instance by hand is still ours, and is repaired in
place). Entries we create also carry markers for people reading
the console: the name ``cloudroutes-<hash of the cluster name>`` and the description
``cloudroutes cluster=<hash> lease=<lease key>``. System entries are never listed (the list asks
for Custom entries only) and ``0.0.0.0/0`` lies inside no Network, so neither is ever touched.

Each ``observe()`` is one DescribeRouteEntryList walk of this table (every page, following
NextToken) and one etcd range read of its ledger. Writes are CreateRouteEntries and
DeleteRouteEntries of at most 50 entries each, one call at a time per VPC (Alibaba refuses
concurrent route changes in a VPC); a batch's per-entry failures are per-route outcomes.
A retarget is ModifyRouteEntry (one call per entry, rare): in place, never a moment without
the entry.

Alibaba applies route changes asynchronously: a new entry is ``Pending`` for a while, and
changes the API refuses meanwhile (IncorrectRouteEntryStatus, TaskConflict, OperationConflict)
are transient. A create is therefore reported pending, and the reconciler reads the table
again after the settle time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_network
from typing import Any, Unpack

from cloudroutes.election import Deposed, Fence
from cloudroutes.errors import (
    QuotaExceeded,
    Rejected,
    RouteConflict,
    RouteError,
    RouteNotFound,
    Throttled,
    Transient,
)
from cloudroutes.ledger import LedgerEntry, within
from cloudroutes.routes import (
    UNKNOWN,
    Action,
    Capacity,
    Change,
    Destination,
    EntryState,
    Foreign,
    Observation,
    Observed,
    Outcome,
    Plan,
    Route,
    TableLimits,
)
from providers.cloud import TableArgs
from providers.cloud_ledger import CloudTable

log = logging.getLogger(__name__)
# The SDK logs every error answer at ERROR, with the string it signed (which carries an STS
# SecurityToken) and at every retry: our own messages say what happened, once.
logging.getLogger("aliyunsdkcore").setLevel(logging.CRITICAL)

INSTANCE_ID = re.compile(r"i-[0-9a-z]{8,32}")
BATCH = 50  # entries per CreateRouteEntries / DeleteRouteEntries call (the API's limit)
PAGE = 100  # entries per DescribeRouteEntryList page
SETTLE = 5.0  # seconds: Alibaba makes a route change about every 5 s
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 4.0  # connect + read stay below the election's fence margin
# A ledger entry younger than this whose route is not in the table may be one whose create is
# under way; only older ones are forgotten, and only collecting tables report young routes.
LEDGER_GRACE = 60.0
MAX_MESSAGE = 200

THROTTLING = ("Throttling",)
QUOTA = ("QuotaExceeded",)
DENIED = ("Forbidden", "NoPermission")
CREDENTIALS = (
    "SignatureDoesNotMatch",
    "InvalidAccessKeySecret",
    "InvalidAccessKeyId",
    "InvalidSecurityToken",
    "MissingSecurityToken",
)
BUSY = frozenset(
    {
        "IncorrectRouteEntryStatus",
        "TaskConflict",
        "OperationConflict",
        "IncorrectStatus",
        "IncorrectVpcStatus",
        "SystemBusy",
        "ServiceUnavailable",
        "InternalError",
        "UnknownError",
        "LastTokenProcessing",
    }
)
DUPLICATE = frozenset({"InvalidCIDRBlock.Duplicate", "VPC_ROUTE_ENTRY_CIDR_BLOCK_DUPLICATE"})
NOT_FOUND = frozenset({"InvalidRouteEntry.NotFound", "VPC_ROUTER_ENTRY_NOT_EXIST"})


# --- the API ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """An AccessKey pair (with an STS token for a RAM role). ``source`` says where it came
    from, for messages; the secret and the token never appear in repr."""

    key_id: str
    secret: str = field(repr=False)
    token: str | None = field(default=None, repr=False)
    source: str = "Backend.AccessKeyID/AccessKeySecret"


class VpcClient:
    """The VPC API of one region at ``endpoint`` (``https://host[:port]``; ``http://`` only
    when configured so, for tests). ``credentials`` is asked before every call, so refreshed
    RAM-role credentials are used as soon as they exist. SDK retries are off: the reconciler
    owns retries and backoff."""

    def __init__(
        self,
        endpoint: str,
        region: str,
        credentials: Callable[[], Credentials],
        *,
        timeout: float = READ_TIMEOUT,
    ) -> None:
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"VPC endpoint {endpoint!r} is not an http(s)://host[:port] URL")
        self.endpoint = endpoint.rstrip("/")
        self.region = region
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._credentials = credentials
        self._timeout = timeout
        self._lock = threading.Lock()
        self._client: Any = None
        self._client_for: Credentials | None = None

    def __repr__(self) -> str:
        return f"VpcClient({self.endpoint!r}, {self.region!r})"

    @property
    def credential_source(self) -> str:
        with self._lock:
            current = self._client_for
        return current.source if current is not None else "the configured credentials"

    def call(self, request: Any) -> dict[str, Any]:
        """Send ``request`` (an aliyunsdkvpc request) and return its JSON answer; the SDK's
        exceptions pass through (``vpc_error`` classifies them)."""
        client = self._acs_client()
        request.set_endpoint(self._host)
        request.set_protocol_type(self._scheme)
        request.add_query_param("RegionId", self.region)
        body = client.do_action_with_exception(request)
        answer = json.loads(body)
        if not isinstance(answer, dict):
            raise ValueError("the answer is not a JSON object")
        return answer

    def _acs_client(self) -> Any:
        credentials = self._credentials()
        with self._lock:
            if self._client is None or self._client_for != credentials:
                from aliyunsdkcore.auth.credentials import (
                    AccessKeyCredential,
                    StsTokenCredential,
                )
                from aliyunsdkcore.client import AcsClient

                credential: object = (
                    StsTokenCredential(credentials.key_id, credentials.secret, credentials.token)
                    if credentials.token
                    else AccessKeyCredential(credentials.key_id, credentials.secret)
                )
                self._client = AcsClient(
                    region_id=self.region,
                    credential=credential,
                    port=self._port,
                    auto_retry=False,
                    timeout=self._timeout,
                    connect_timeout=CONNECT_TIMEOUT,
                )
                self._client_for = credentials
            return self._client


def vpc_error(
    exc: Exception, action: str, where: str, policy: str, credentials: str = ""
) -> RouteError:
    """The route error for a failed VPC call ``action`` (e.g. "CreateRouteEntries") on
    ``where``, by the error code (Alibaba answers a conflict with 400, as it does a bad
    parameter). ``policy`` names the RAM policy that grants the action; ``credentials`` where
    the AccessKey came from. An answer's message is repeated only for codes without meaning
    here, and never the string a signature covered."""
    from aliyunsdkcore.acs_exception.exceptions import ClientException, ServerException

    if isinstance(exc, RouteError):
        return exc
    if isinstance(exc, ServerException):
        code = str(exc.get_error_code() or "")
        status = exc.get_http_status()
        return code_error(
            code, _message(exc.get_error_msg()), status, action, where, policy, credentials
        )
    if isinstance(exc, ClientException):
        # No answer (timeout, refused connection): the call may or may not have been applied.
        return NoAnswer(f"vpc:{action} on {where} got no answer ({exc.get_error_code()}); retrying")
    return NoAnswer(f"vpc:{action} on {where} failed ({type(exc).__name__}); retrying")


def code_error(
    code: str,
    message: str,
    status: int | None,
    action: str,
    where: str,
    policy: str,
    credentials: str = "",
) -> RouteError:
    """The route error for an error code, from a whole call or one entry of a batch."""
    if code.startswith(THROTTLING):
        return Throttled(f"Alibaba Cloud throttled vpc:{action} on {where} ({code}); backing off")
    if code.startswith(QUOTA):
        return QuotaExceeded(
            f"route table {where} is full ({code}): free custom entries or raise the route "
            "entry quota in the Quota Center, then set Backend.RouteLimit to it"
        )
    if code.startswith(DENIED):
        return Rejected(
            f"not permitted to call vpc:{action} on {where} ({code}); grant it to this node's "
            f"RAM user or role with {policy}"
        )
    if code.startswith(CREDENTIALS):
        source = credentials or "the configured credentials"
        return Rejected(
            f"Alibaba Cloud refused the AccessKey from {source} for vpc:{action} ({code}); fix "
            "Backend.AccessKeyID/AccessKeySecret (or ACCESS_KEY_ID/ACCESS_KEY_SECRET), or give "
            "the instance a RAM role"
        )
    if code.startswith("InvalidTimeStamp"):
        return Rejected(
            f"Alibaba Cloud refused vpc:{action} ({code}): this node's clock is off; sync it"
        )
    if code in NOT_FOUND:
        return RouteNotFound(f"vpc:{action} on {where}: the entry is not there")
    if code == "InvalidRouteTableId.NotFound":
        return Rejected(
            f"route table {where} does not exist in this region ({code}); fix Backend.RouteTableIDs"
        )
    if code in BUSY or (status is not None and status >= 500):
        return Transient(f"vpc:{action} on {where}: {code or status}, the VPC is busy; retrying")
    return Rejected(f"Alibaba Cloud refused vpc:{action} on {where}: {code}: {message}")


def _message(text: Any) -> str:
    line = " ".join(str(text or "").split())
    line = line.split("server string to sign", 1)[0].strip()
    return line[:MAX_MESSAGE] or "no message"


# --- what the API lists ----------------------------------------------------------------------


@dataclass(frozen=True)
class AliEntry:
    """A custom entry as DescribeRouteEntryList shows it, reduced to what ownership needs."""

    entry_id: str
    destination: Destination
    hop_type: str  # "" when the entry has several next hops (ECMP): never ours
    hop_id: str
    status: str
    name: str
    description: str


def listed(answer: Mapping[str, Any], outer: str, inner: str) -> list[dict[str, Any]]:
    """The objects of a listing such as ``{"RouteEntrys": {"RouteEntry": [...]}}``; anything
    else in an answer is left out."""
    wrapper = answer.get(outer)
    items = wrapper.get(inner) if isinstance(wrapper, dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def parse_entries(listing: Iterable[Any]) -> list[AliEntry]:
    """The readable entries of a DescribeRouteEntryList page; anything else is left out."""
    entries = []
    for raw in listing:
        if not isinstance(raw, dict) or raw.get("Type", "Custom") != "Custom":
            continue
        try:
            destination = ip_network(str(raw.get("DestinationCidrBlock", "")))
        except ValueError:
            continue
        hops = (raw.get("NextHops") or {}).get("NextHop") or []
        hop: dict[str, Any] = hops[0] if len(hops) == 1 and isinstance(hops[0], dict) else {}
        hop_type = str(hop.get("NextHopType") or raw.get("NextHopType") or "")
        hop_id = str(hop.get("NextHopId") or raw.get("InstanceId") or "")
        if len(hops) > 1:
            hop_type, hop_id = "", "several next hops"
        entries.append(
            AliEntry(
                entry_id=str(raw.get("RouteEntryId", "")),
                destination=destination,
                hop_type=hop_type,
                hop_id=hop_id,
                status=str(raw.get("Status", "")),
                name=str(raw.get("RouteEntryName", "")),
                description=str(raw.get("Description", "")),
            )
        )
    return entries


def entry_state(status: str) -> EntryState | None:
    """How an entry's status counts: None for one being deleted (it is going)."""
    if status == "Available":
        return EntryState.ACTIVE
    if status == "Deleting":
        return None
    return EntryState.PENDING  # Pending, Creating, Modifying: accepted, not in effect yet


@dataclass(frozen=True)
class Markers:
    """The name and description of the entries a cluster creates."""

    cluster: str

    @property
    def tag(self) -> str:
        return hashlib.sha256(self.cluster.encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        return f"cloudroutes-{self.tag}"

    def description(self, lease_key: str) -> str:
        return f"cloudroutes cluster={self.tag} lease={lease_key}"[:256]


# --- the table -------------------------------------------------------------------------------


@dataclass
class _Create:
    change: Change
    route: Route
    before: LedgerEntry | None


class AliRouteTable(CloudTable):
    """One VPC route table, as one reconciler sees it.

    ``scope``: the destinations this table reports as owned (a node-mode agent: its own
    subnets); None: every owned route. ``collect``: this table deletes routes of leases that
    are gone, so it also forgets ledger entries left without an entry for LEDGER_GRACE.
    ``skip_young``: leave out entries recorded within LEDGER_GRACE (the node-mode collector).
    ``fence``: the election's fence, checked before every write. ``vpc_lock``: held around
    every write call; every table of the VPC in this process shares it.
    """

    def __init__(
        self,
        client: VpcClient,
        table_id: str,
        *,
        policy: str,
        vpc_lock: threading.Lock,
        markers: Markers,
        **args: Unpack[TableArgs],
    ) -> None:
        super().__init__(table_id, **args)
        self.limits = TableLimits(max_changes=BATCH, pass_deadline=30.0, settle=SETTLE)
        self._client = client
        self._policy = policy
        self._vpc_lock = vpc_lock
        self._markers = markers
        # The id of each owned entry as last listed: a retarget names the entry it saw.
        self._entry_ids: dict[Destination, str] = {}

    # --- reading ----------------------------------------------------------------------------

    def _call(self, action: str, request: Any, where: str | None = None) -> dict[str, Any]:
        try:
            return self._client.call(request)
        except Exception as exc:
            raise vpc_error(
                exc, action, where or self.table_id, self._policy, self._client.credential_source
            ) from None

    def list_entries(self) -> list[AliEntry]:
        """Every custom entry of the table, all pages."""
        from aliyunsdkvpc.request.v20160428.DescribeRouteEntryListRequest import (
            DescribeRouteEntryListRequest,
        )

        entries: list[AliEntry] = []
        token = ""
        for _ in range(10_000):  # an API that never ends its pages must not hang a pass
            request = DescribeRouteEntryListRequest()
            request.set_RouteTableId(self.table_id)
            request.set_RouteEntryType("Custom")
            request.set_MaxResult(PAGE)
            if token:
                request.set_NextToken(token)
            answer = self._call("DescribeRouteEntryList", request)
            entries.extend(parse_entries(listed(answer, "RouteEntrys", "RouteEntry")))
            token = str(answer.get("NextToken") or "")
            if not token:
                return entries
        raise Transient(f"the entry list of {self.table_id} did not end; reading again later")

    def observe(self) -> Observation:
        listed = self.list_entries()
        entries = self._book.read()
        now = time.time()
        owned: dict[Destination, Observed] = {}
        foreign: dict[Destination, Foreign] = {}
        present: set[Destination] = set()
        ids: dict[Destination, str] = {}
        for entry in listed:
            present.add(entry.destination)
            state = entry_state(entry.status)
            if state is None or entry.destination.prefixlen == 0:
                # Being deleted (neither ours to keep nor anyone's to conflict with), or a
                # default route (never a lease's, whatever the Network).
                continue
            record = entries.get(entry.destination)
            ours = entry.hop_type == "Instance" and self._book.owns(
                entry.destination, entry.hop_id, self._networks
            )
            if ours and record is not None:
                if self._book.hidden(entry.destination, record, now, LEDGER_GRACE):
                    continue
                owned[entry.destination] = Observed(Route(entry.destination, entry.hop_id), state)
                ids[entry.destination] = entry.entry_id
            elif within(entry.destination, self._networks):
                foreign[entry.destination] = self._foreign(entry, record)
        self._book.seen(entries)
        self._entry_ids = ids
        if self._collect:
            self._book.forget_stale(entries, present, now, LEDGER_GRACE)
        capacity = Capacity(self._route_limit, len(listed)) if self._route_limit else None
        return Observation(owned=owned, foreign=foreign, capacity=capacity)

    def _foreign(self, entry: AliEntry, record: LedgerEntry | None) -> Foreign:
        # flanneld's entries (no name) and our own whose ledger entry was lost are taken over
        # in place when they are exactly what a lease wants.
        adoptable = (
            entry.hop_type == "Instance"
            and entry.status == "Available"
            and entry.name in ("", self._markers.name)
        )
        if record is not None:
            holder = (
                f"an entry to {entry.hop_id}, but the ledger of this cluster records "
                f"{record.target}"
            )
        else:
            named = f" named {entry.name!r}" if entry.name else ""
            holder = (
                f"an entry to {entry.hop_type} {entry.hop_id}{named} not created by this cluster"
            )
        advice = (
            "cloudroutes never changes entries it did not create; delete it (aliyun vpc "
            f"DeleteRouteEntry --RegionId {self._client.region} --RouteEntryId "
            f"{entry.entry_id}) if nothing needs it"
        )
        return Foreign(
            Route(entry.destination, entry.hop_id),
            holder=holder,
            adoptable=adoptable,
            advice=advice,
        )

    # --- writing ----------------------------------------------------------------------------

    def apply(self, plan: Plan, deadline: float | None = None) -> Sequence[Outcome]:
        fence = self._book.fence()
        if self._book.not_leader(fence):
            return [
                Outcome(c, Transient("not the leader now; not writing"), present=c.current)
                for c in plan
            ]
        try:
            return self._apply(plan, fence, deadline)
        except Deposed as exc:
            return [Outcome(c, Transient(str(exc)), present=UNKNOWN) for c in plan]

    def _apply(self, plan: Plan, fence: Fence | None, deadline: float | None) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        adopts = plan.of(Action.ADOPT)
        if adopts:
            try:
                self._book.record([self._book.confirmed(_route(c.entry)) for c in adopts], fence)
                outcomes.update({id(c): Outcome(c) for c in adopts})
            except RouteError as exc:
                outcomes.update({id(c): Outcome(c, exc, present=c.current) for c in adopts})
        changes = [c for c in plan if c.action in (Action.DELETE, Action.REPLACE)]
        if changes:
            ours = self._still_ours(changes, outcomes)
            self._remove([c for c in ours if c.action is Action.DELETE], fence, deadline, outcomes)
            self._retarget(
                [c for c in ours if c.action is Action.REPLACE], fence, deadline, outcomes
            )
        if plan.of(Action.ADD):
            self._create(plan.of(Action.ADD), fence, deadline, outcomes)
        return [outcomes[id(c)] for c in plan if id(c) in outcomes]

    def _still_ours(self, changes: list[Change], outcomes: dict[int, Outcome]) -> list[Change]:
        """The deletes and replaces whose current entry the ledger (read again, once for the
        whole plan) still says is ours, unchanged since the table was read."""
        fresh = self._book.read()
        ours: list[Change] = []
        for change in changes:
            current = _route(change.current)
            refused = self._book.refused_delete(
                change, fresh, current.destination, current.next_hop
            )
            if refused is not None:
                outcomes[id(change)] = refused
            else:
                ours.append(change)
        return ours

    def _remove(
        self,
        changes: list[Change],
        fence: Fence | None,
        deadline: float | None,
        outcomes: dict[int, Outcome],
    ) -> None:
        """Delete entries in batches; a deleted (or already missing) one leaves the ledger."""
        for batch, failures in self._batches(changes, "DeleteRouteEntries", fence, deadline):
            gone: list[Destination] = []
            for change in batch:
                current = change.current
                assert isinstance(current, Route)
                error = failures.get(id(change))
                if error is None or isinstance(error, RouteNotFound):
                    gone.append(current.destination)
                    outcomes[id(change)] = Outcome(change, error, present=None)
                else:
                    present = UNKNOWN if _unknown(error) else current
                    outcomes[id(change)] = Outcome(change, error, present=present)
            if gone:
                self._book.forget(gone, fence)

    def _retarget(
        self,
        changes: list[Change],
        fence: Fence | None,
        deadline: float | None,
        outcomes: dict[int, Outcome],
    ) -> None:
        """Point entries at another instance in place (ModifyRouteEntry, one call each): the
        destination is never without its entry. Both targets stay ours while it is under way."""
        if not changes:
            return
        retargets = [self._book.entry(_route(c.entry), previous=_hop(c.current)) for c in changes]
        self._book.record(retargets, fence)
        done: list[LedgerEntry] = []
        stop: RouteError | None = None
        for change in changes:
            if stop is None and deadline is not None and time.monotonic() >= deadline:
                break  # not started: planned again
            current = change.current
            assert isinstance(current, Route)
            try:
                if stop is not None:
                    raise stop
                self._modify(change, fence)
            except RouteError as exc:
                if isinstance(exc, RouteNotFound):
                    present: Any = None  # gone meanwhile: it is created again
                else:
                    present = UNKNOWN if _unknown(exc) else current
                    stop = exc  # a refusal of the call: the next ones would get it too
                outcomes[id(change)] = Outcome(change, exc, present=present)
                continue
            outcomes[id(change)] = Outcome(change, pending=True)
            done.append(self._book.confirmed(_route(change.entry)))
        if done:
            self._settle_ledger(done, fence)

    def _modify(self, change: Change, fence: Fence | None) -> None:
        from aliyunsdkvpc.request.v20160428.ModifyRouteEntryRequest import (
            ModifyRouteEntryRequest,
        )

        route = change.entry
        assert isinstance(route, Route)
        request = ModifyRouteEntryRequest()
        entry_id = self._entry_ids.get(route.destination)
        if entry_id:
            request.set_RouteEntryId(entry_id)
        else:
            request.set_RouteTableId(self.table_id)
            request.set_DestinationCidrBlock(str(route.destination))
        request.set_NewNextHopType("Instance")
        request.set_NewNextHopId(route.next_hop)
        request.set_RouteEntryName(self._markers.name)
        request.set_Description(self._markers.description(route.lease_key))
        where = f"{self.table_id} ({route.destination})"
        with self._vpc_lock:
            if fence is not None:
                fence.check()
            self._call("ModifyRouteEntry", request, where)

    def _create(
        self,
        changes: list[Change],
        fence: Fence | None,
        deadline: float | None,
        outcomes: dict[int, Outcome],
    ) -> None:
        creates = []
        for change in changes:
            route = change.entry
            assert isinstance(route, Route)
            if not INSTANCE_ID.fullmatch(route.next_hop):
                why = Rejected(f"{route.next_hop!r} is not an ECS instance id (i-...)")
                outcomes[id(change)] = Outcome(change, why, present=None)
                continue
            creates.append(_Create(change, route, self._book.get(route.destination)))
        if not creates:
            return
        try:
            self._book.record([self._book.entry(c.route) for c in creates], fence)
        except RouteError as exc:
            for c in creates:
                outcomes[id(c.change)] = Outcome(c.change, exc, present=None)
            return
        duplicates: list[_Create] = []
        by_change = {id(c.change): c for c in creates}
        batches = self._batches([c.change for c in creates], "CreateRouteEntries", fence, deadline)
        for batch, failures in batches:
            undo: list[_Create] = []
            made: list[LedgerEntry] = []
            for change in batch:
                item = by_change[id(change)]
                error = failures.get(id(change))
                if isinstance(error, _Duplicate):
                    duplicates.append(item)
                elif error is None:
                    outcomes[id(change)] = Outcome(change, pending=True)
                    made.append(self._book.confirmed(item.route))
                elif _unknown(error):
                    outcomes[id(change)] = Outcome(change, error, present=UNKNOWN)
                else:
                    undo.append(item)
                    outcomes[id(change)] = Outcome(change, error, present=None)
            self._restore(undo, fence)
            if made:
                self._settle_ledger(made, fence)
        if duplicates:
            self._resolve_duplicates(duplicates, fence, outcomes)

    def _settle_ledger(self, done: list[LedgerEntry], fence: Fence | None) -> None:
        """Record routes made as confirmed; until then the entries stay as recorded before the
        write (both targets, or the one wanted, still ours) and are rewritten next time."""
        try:
            self._book.record(done, fence)
        except RouteError as exc:
            log.info("%s: ledger not settled yet: %s", self.name, exc)

    def _restore(self, items: list[_Create], fence: Fence | None) -> None:
        """Put the ledger back as it was for creates that surely did not happen."""
        if items:
            self._book.restore({c.route.destination: c.before for c in items}, fence)

    def _resolve_duplicates(
        self, items: list[_Create], fence: Fence | None, outcomes: dict[int, Outcome]
    ) -> None:
        """A create found an entry there: done if it is ours to the same instance; ours (per
        the ledger as it was) to another instance: retargeted next pass; anyone else's: a
        conflict, left alone."""
        try:
            existing = {e.destination: e for e in self.list_entries()}
        except RouteError as exc:
            for item in items:
                outcomes[id(item.change)] = Outcome(item.change, exc, present=UNKNOWN)
            return
        undo: list[_Create] = []
        found: list[LedgerEntry] = []
        for item in items:
            change, route = item.change, item.route
            entry = existing.get(route.destination)
            if entry is None or entry_state(entry.status) is None:
                why = Transient(f"{route.destination}: Alibaba said it exists but lists none")
                outcomes[id(change)] = Outcome(change, why, present=UNKNOWN)
            elif entry.hop_type == "Instance" and entry.hop_id == route.next_hop:
                pending = entry_state(entry.status) is EntryState.PENDING
                outcomes[id(change)] = Outcome(change, pending=pending)
                found.append(self._book.confirmed(route))
            elif (
                item.before is not None
                and entry.hop_type == "Instance"
                and item.before.owns(entry.hop_id)
            ):
                old = Route(route.destination, entry.hop_id, lease_key=route.lease_key)
                self._entry_ids[route.destination] = entry.entry_id
                self._book.record([self._book.entry(route, previous=entry.hop_id)], fence)
                why = Transient(f"{route.destination} still goes to {entry.hop_id}; replacing it")
                outcomes[id(change)] = Outcome(change, why, present=old)
            else:
                undo.append(item)
                why = RouteConflict(
                    f"{route.destination} in {self.table_id} already goes to {entry.hop_type} "
                    f"{entry.hop_id}, which this cluster did not create; it is left alone "
                    f"(delete entry {entry.entry_id} if nothing needs it)"
                )
                outcomes[id(change)] = Outcome(change, why, present=None)
        self._restore(undo, fence)
        if found:
            self._settle_ledger(found, fence)

    def _batches(
        self,
        changes: list[Change],
        action: str,
        fence: Fence | None,
        deadline: float | None,
    ) -> Iterable[tuple[list[Change], dict[int, RouteError]]]:
        """Send ``changes`` in calls of at most BATCH entries, one call at a time per VPC;
        yields each batch with its failed changes. A call that fails as a whole fails its
        batch and every later one (nothing more is sent)."""
        stop: RouteError | None = None
        for start in range(0, len(changes), BATCH):
            batch = changes[start : start + BATCH]
            if stop is None and deadline is not None and time.monotonic() >= deadline:
                return  # not started: the reconciler plans them again
            if stop is not None:
                yield batch, {id(c): stop for c in batch}
                continue
            try:
                failures = self._send(action, batch, fence)
            except RouteError as exc:
                stop = exc
                yield batch, {id(c): exc for c in batch}
                continue
            yield batch, failures

    def _send(self, action: str, batch: list[Change], fence: Fence | None) -> dict[int, RouteError]:
        from aliyunsdkvpc.request.v20160428.CreateRouteEntriesRequest import (
            CreateRouteEntriesRequest,
        )
        from aliyunsdkvpc.request.v20160428.DeleteRouteEntriesRequest import (
            DeleteRouteEntriesRequest,
        )

        create = action == "CreateRouteEntries"
        request = CreateRouteEntriesRequest() if create else DeleteRouteEntriesRequest()
        items = [self._create_item(c) if create else self._delete_item(c) for c in batch]
        request.set_RouteEntriess(items)
        with self._vpc_lock:
            if fence is not None:
                fence.check()
            answer = self._call(action, request)
        return self._failures(action, batch, answer)

    def _create_item(self, change: Change) -> dict[str, str]:
        route = change.entry
        assert isinstance(route, Route)
        return {
            "RouteTableId": self.table_id,
            "DstCidrBlock": str(route.destination),
            "NextHopType": "Instance",
            "NextHop": route.next_hop,
            "IpVersion": "IPv6" if route.destination.version == 6 else "IPv4",
            "Name": self._markers.name,
            "Description": self._markers.description(route.lease_key),
        }

    def _delete_item(self, change: Change) -> dict[str, str]:
        # By destination and next hop: Alibaba deletes it only while it still goes there.
        current = change.current
        assert isinstance(current, Route)
        return {
            "RouteTableId": self.table_id,
            "DstCidrBlock": str(current.destination),
            "NextHop": current.next_hop,
        }

    def _failures(
        self, action: str, batch: list[Change], answer: Mapping[str, Any]
    ) -> dict[int, RouteError]:
        failed = answer.get("FailedRouteEntries") or []
        if isinstance(failed, dict):  # some API versions wrap lists
            failed = next(iter(failed.values()), [])
        by_destination: dict[str, Change] = {}
        for change in batch:
            route = change.entry if action == "CreateRouteEntries" else change.current
            assert isinstance(route, Route)
            by_destination[str(route.destination)] = change
        out: dict[int, RouteError] = {}
        unread = 0  # failures the answer does not tie to one of our entries
        for item in failed if isinstance(failed, list) else []:
            change = self._failed_change(item, by_destination)
            if change is None:
                unread += 1
                continue
            key = str(ip_network(str(item.get("DstCidrBlock", "")).strip()))
            code = str(item.get("FailedCode", ""))
            where = f"{self.table_id} ({key})"
            if code in DUPLICATE:
                out[id(change)] = _Duplicate(f"{key} exists in {self.table_id}")
            else:
                message = _message(item.get("FailedMessage"))
                out[id(change)] = code_error(code, message, None, action, where, self._policy)
        if unread:
            # Which entries failed is not known: none of the others counts as done.
            unknown = NoAnswer(
                f"vpc:{action} on {self.table_id}: {unread} entries failed without saying "
                "which; reading the table again"
            )
            out.update({id(c): unknown for c in batch if id(c) not in out})
        return out

    @staticmethod
    def _failed_change(item: Any, by_destination: Mapping[str, Change]) -> Change | None:
        if not isinstance(item, dict):
            return None
        try:
            key = str(ip_network(str(item.get("DstCidrBlock", "")).strip()))
        except ValueError:
            return None
        return by_destination.get(key)


class NoAnswer(Transient):
    """A call that got no answer: it may or may not have been applied."""


class _Duplicate(Rejected):
    """A create found an entry at the destination (resolved by the create itself)."""


def _route(entry: Any) -> Route:
    assert isinstance(entry, Route)
    return entry


def _hop(route: Any) -> str | None:
    return route.next_hop if isinstance(route, Route) else None


def _unknown(error: RouteError) -> bool:
    """Whether a failed call may still have been applied (no answer came)."""
    return isinstance(error, NoAnswer)

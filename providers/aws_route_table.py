"""One EC2 route table behind the route-table protocol, with ownership from the ledger.

EC2 routes carry no name or tag, so what is ours comes from the cluster's ledger in etcd
(``cloudroutes.ledger``, whose docstring holds the rule this table follows): a route is ours
only if it was made by CreateRoute, lies inside the Network, and the ledger of this table
records its destination with that target. Everything else (the local route, gateways,
peering, another cluster's routes, an operator's route) is reported at most as foreign and is
never written.

Each ``observe()`` is one DescribeRouteTables of this table and one etcd range read of its
ledger. Each change is one EC2 write at most (an adoption is none): the ledger is written
before a create or retarget and forgotten after a delete, so a crash anywhere leaves nothing
that could later be mistaken for ours.

A route's entry is ``Route(destination, next_hop)``, where ``next_hop`` is the target ENI
(``eni-…``), or, for a lease of flanneld's old cloud backends that names only its node's
private IP, that IP: the table resolves it to the ENI holding it (one
DescribeNetworkInterfaces per address, cached) and reports such routes in the same form.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
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

# boto3 clients are built at run time; there is no static type to name without extra stubs.
EC2Client = Any

ENI_ID = re.compile(r"eni-[0-9a-f]{8,32}")
THROTTLING = frozenset(
    {"RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException"}
)
DENIED = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"})
CREDENTIALS = frozenset(
    {
        "AuthFailure",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "RequestExpired",
        "OptInRequired",
    }
)
SERVER_SIDE = frozenset(
    {"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable", "RequestTimeout"}
)
# A ledger entry younger than this whose route is not in the table may be one whose create is
# under way; only older ones are forgotten, and only collecting tables report young routes.
LEDGER_GRACE = 60.0
# EC2 reads may miss a write for a moment (eventual consistency): a change made this recently
# and not seen yet is taken as pending, never made twice.
READ_LAG = 5.0
MAX_MESSAGE = 300
FILTER_VALUES = 200  # values in one EC2 filter at most


def ec2_error(exc: Exception, action: str, where: str, policy: str) -> RouteError:
    """The route error for a failed EC2 call ``action`` (e.g. "CreateRoute") on ``where``.

    ``policy`` is the policy file that grants the action, named when access is denied. The
    encoded authorization message AWS attaches to a denial is never repeated.
    """
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in THROTTLING:
            return Throttled(
                f"EC2 throttled {action} on {where} ({code}); backing off",
                retry_after=_retry_after(exc.response),
            )
        if code in DENIED:
            return Rejected(
                f"not permitted to call ec2:{action} on {where} ({code}); grant it to this "
                f"node's role with {policy}"
            )
        if code == "RouteLimitExceeded":
            return QuotaExceeded(
                f"route table {where} is full (RouteLimitExceeded): free routes or raise the "
                "'Routes per route table' quota in Service Quotas"
            )
        if code in ("InvalidRoute.NotFound",):
            return RouteNotFound(f"{action} on {where}: the route is not there")
        if code in CREDENTIALS:
            return Rejected(
                f"EC2 refused the credentials for {action} on {where} ({code}); give the node "
                "an instance role (or fix the clock, for RequestExpired)"
            )
        if code == "InvalidRouteTableID.NotFound":
            return Rejected(
                f"route table {where} does not exist in this region ({code}); fix RouteTableID"
            )
        if code in SERVER_SIDE or (isinstance(status, int) and status >= 500):
            return Transient(f"EC2 failed {action} on {where} ({code or status}); retrying")
        return Rejected(f"EC2 refused {action} on {where}: {code}: {_one_line(error)}")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return Rejected(
            f"no AWS credentials for {action} on {where}: give the instance a role with {policy}"
        )
    if isinstance(exc, BotoCoreError):
        # Timeouts and dropped connections: the call may or may not have been applied; the next
        # read of the table decides.
        return Transient(f"{action} on {where} got no answer ({type(exc).__name__}); retrying")
    return Transient(f"{action} on {where} failed ({type(exc).__name__}); retrying")


def _retry_after(response: Mapping[str, Any]) -> float | None:
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}
    value = headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 < seconds <= 3600 else None


def _one_line(error: Mapping[str, Any]) -> str:
    text = " ".join(str(error.get("Message", "")).split())
    return text[:MAX_MESSAGE] or "no message"


@dataclass(frozen=True)
class AwsRoute:
    """A route as DescribeRouteTables lists it, reduced to what ownership needs."""

    destination: Destination
    target: str  # eni-…, i-…, igw-…, local, …
    origin: str
    blackhole: bool


def parse_routes(listing: Iterable[Mapping[str, Any]]) -> list[AwsRoute]:
    """The routes to a CIDR in a DescribeRouteTables answer; prefix-list routes and anything
    unreadable are left out (never ours, never touched)."""
    routes = []
    for raw in listing:
        cidr = raw.get("DestinationCidrBlock") or raw.get("DestinationIpv6CidrBlock")
        if not isinstance(cidr, str):
            continue
        try:
            destination = ip_network(cidr)
        except ValueError:
            continue
        target = next(
            (
                raw[name]
                for name in (
                    "NetworkInterfaceId",
                    "InstanceId",
                    "GatewayId",
                    "NatGatewayId",
                    "TransitGatewayId",
                    "VpcPeeringConnectionId",
                    "EgressOnlyInternetGatewayId",
                    "CarrierGatewayId",
                    "LocalGatewayId",
                    "CoreNetworkArn",
                )
                if isinstance(raw.get(name), str)
            ),
            "unknown",
        )
        routes.append(
            AwsRoute(
                destination,
                target,
                str(raw.get("Origin", "")),
                raw.get("State") == "blackhole",
            )
        )
    return routes


class EniResolver:
    """Private IP -> the ENI holding it, for leases of flanneld's old cloud backends, which
    name only their node's IP. Shared by the tables of one backend.

    The desired function only notes the addresses it wants (no I/O there); the next
    ``observe()`` resolves every new one in one DescribeNetworkInterfaces, and a create that
    comes first resolves its own. Each address is asked about once.
    """

    def __init__(self, ec2: EC2Client, policy: str) -> None:
        self._ec2 = ec2
        self._policy = policy
        self._lock = threading.Lock()
        self._by_ip: dict[str, str] = {}
        self._by_eni: dict[str, str] = {}
        self._wanted: set[str] = set()

    def want(self, address: str) -> None:
        with self._lock:
            if address not in self._by_ip:
                self._wanted.add(address)

    def address_of(self, eni: str) -> str | None:
        with self._lock:
            return self._by_eni.get(eni)

    def resolve_wanted(self) -> None:
        """Resolve the addresses noted since the last call (errors are left for later)."""
        with self._lock:
            wanted = sorted(self._wanted - self._by_ip.keys())
            self._wanted.clear()
        for start in range(0, len(wanted), FILTER_VALUES):
            chunk = wanted[start : start + FILTER_VALUES]
            try:
                self._lookup(chunk)
            except RouteError as exc:
                log.info("cannot resolve the ENIs of %d old-style leases yet: %s", len(chunk), exc)
                with self._lock:
                    self._wanted.update(chunk)
                return

    def resolve(self, address: str) -> str:
        """The ENI holding ``address``; a RouteError when EC2 cannot say."""
        with self._lock:
            known = self._by_ip.get(address)
        if known is None:
            known = self._lookup([address]).get(address)
        if known is None:
            raise Rejected(
                f"no network interface holds private IP {address} (a lease of an old flanneld "
                "naming only its PublicIP); check that node, or run cloudroutes on it"
            )
        return known

    def _lookup(self, addresses: list[str]) -> dict[str, str]:
        try:
            answer = self._ec2.describe_network_interfaces(
                Filters=[{"Name": "addresses.private-ip-address", "Values": addresses}]
            )
        except Exception as exc:
            where = f"address {addresses[0]}" + (" and more" if len(addresses) > 1 else "")
            raise ec2_error(exc, "DescribeNetworkInterfaces", where, self._policy) from None
        found: dict[str, str] = {}
        for eni in answer.get("NetworkInterfaces", []):
            eni_id = eni.get("NetworkInterfaceId")
            if not isinstance(eni_id, str):
                continue
            for item in eni.get("PrivateIpAddresses", []) or []:
                address = item.get("PrivateIpAddress")
                if address in addresses:
                    found[address] = eni_id
            if eni.get("PrivateIpAddress") in addresses:
                found[eni["PrivateIpAddress"]] = eni_id
        with self._lock:
            for address, eni_id in found.items():
                self._by_ip[address] = eni_id
                self._by_eni[eni_id] = address
        return found


class AwsRouteTable(CloudTable):
    """One EC2 route table, as one reconciler sees it (the grace of its ledger entries is
    LEDGER_GRACE). ``policy``: the policy file a denial names; ``resolver``: the ENIs of old
    flanneld leases' addresses; ``cluster``: the cluster's name, in messages."""

    def __init__(
        self,
        ec2: EC2Client,
        table_id: str,
        *,
        policy: str,
        resolver: EniResolver,
        cluster: str = "",
        **args: Unpack[TableArgs],
    ) -> None:
        super().__init__(table_id, **args)
        self.limits = TableLimits(pass_deadline=30.0, settle=2.0, read_lag=READ_LAG)
        self._ec2 = ec2
        self._policy = policy
        self._resolver = resolver
        self._cluster = cluster
        self._broken: set[Destination] = set()

    # --- observe ----------------------------------------------------------------------------

    def observe(self) -> Observation:
        self._resolver.resolve_wanted()
        routes = self._describe()
        entries = self._book.read()
        now = time.time()
        owned: dict[Destination, Observed] = {}
        foreign: dict[Destination, Foreign] = {}
        broken: set[Destination] = set()
        present: set[Destination] = set()
        for route in routes:
            present.add(route.destination)
            entry = entries.get(route.destination)
            ours = (
                route.origin == "CreateRoute"
                and entry is not None
                and self._book.owns(route.destination, route.target, self._networks)
            )
            if ours and entry is not None:
                if self._book.hidden(route.destination, entry, now, LEDGER_GRACE):
                    continue
                shown = Route(route.destination, self._shown_target(route.target))
                state = EntryState.BROKEN if route.blackhole else EntryState.ACTIVE
                if route.blackhole:
                    broken.add(route.destination)
                owned[route.destination] = Observed(shown, state)
            elif within(route.destination, self._networks):
                foreign[route.destination] = self._foreign(route, entry)
        self._book.seen(entries)
        self._broken = broken
        if self._collect:
            self._book.forget_stale(entries, present, now, LEDGER_GRACE)
        return Observation(owned=owned, foreign=foreign, capacity=self._capacity(routes))

    def _describe(self) -> list[AwsRoute]:
        try:
            answer = self._ec2.describe_route_tables(RouteTableIds=[self.table_id])
        except Exception as exc:
            raise ec2_error(exc, "DescribeRouteTables", self.table_id, self._policy) from None
        tables = [
            t for t in answer.get("RouteTables", []) if t.get("RouteTableId") == self.table_id
        ]
        if not tables:
            raise Rejected(f"route table {self.table_id} was not found; fix RouteTableID")
        return parse_routes(tables[0].get("Routes", []))

    def _shown_target(self, target: str) -> str:
        # A route made for an old flanneld lease is reported in the form that lease wants it.
        return self._resolver.address_of(target) or target

    def _foreign(self, route: AwsRoute, entry: LedgerEntry | None) -> Foreign:
        adoptable = (
            route.origin == "CreateRoute"
            and not route.blackhole
            and (route.target.startswith("eni-") or route.target.startswith("i-"))
        )
        if route.origin != "CreateRoute":
            holder = f"a route to {route.target} made by {route.origin or 'AWS'}"
        elif entry is not None:
            holder = (
                f"a route to {route.target}, but the ledger of cluster {self._cluster} records "
                f"{entry.target}"
            )
        else:
            holder = f"a route to {route.target} that cluster {self._cluster} did not create"
        family = (
            "--destination-ipv6-cidr-block"
            if route.destination.version == 6
            else ("--destination-cidr-block")
        )
        advice = (
            "cloudroutes never changes routes it did not create; delete it "
            f"(aws ec2 delete-route --route-table-id {self.table_id} {family} "
            f"{route.destination}) if nothing needs it"
        )
        shown = Route(route.destination, self._shown_target(route.target))
        return Foreign(shown, holder=holder, adoptable=adoptable, advice=advice)

    def _capacity(self, routes: list[AwsRoute]) -> Capacity | None:
        # AWS does not say the limit; it is known only when the operator sets RouteLimit.
        # IPv4 and IPv6 routes are limited separately; the fuller family is reported, so the
        # reconciler never plans a create that cannot fit.
        if self._route_limit is None:
            return None
        families = {network.version for network in self._networks} or {4}
        used = max(
            sum(1 for r in routes if r.destination.version == v and r.origin != "CreateRouteTable")
            for v in families
        )
        return Capacity(self._route_limit, used)

    # --- apply ------------------------------------------------------------------------------

    def apply(self, plan: Plan, deadline: float | None = None) -> Sequence[Outcome]:
        outcomes: list[Outcome] = []
        fresh: dict[Destination, LedgerEntry] | None = None
        for change in plan:
            if deadline is not None and time.monotonic() >= deadline:
                break
            fence = self._book.fence()
            if self._book.not_leader(fence):
                outcomes.append(Outcome(change, Transient("not the leader now; not writing")))
                break
            if change.action is Action.DELETE and fresh is None:
                try:
                    fresh = self._book.read()  # one read, for every delete of this plan
                except Transient as exc:
                    outcomes.append(Outcome(change, exc))
                    break
            try:
                outcomes.append(self._one(change, fence, fresh))
            except Deposed as exc:
                outcomes.append(Outcome(change, Transient(str(exc))))
                break
        return outcomes

    def _one(
        self,
        change: Change,
        fence: Fence | None,
        fresh: Mapping[Destination, LedgerEntry] | None,
    ) -> Outcome:
        route = change.entry
        assert isinstance(route, Route)
        try:
            if change.action is Action.ADD:
                return self._add(change, route, fence)
            if change.action is Action.REPLACE:
                return self._replace(change, route, fence)
            if change.action is Action.ADOPT:
                self._book.confirm(route, self._target(route), fence)
                return Outcome(change)
            return self._delete(change, route, fence, fresh or {})
        except RouteError as exc:
            return Outcome(change, exc)

    def _target(self, route: Route) -> str:
        if ENI_ID.fullmatch(route.next_hop):
            return route.next_hop
        try:
            ip_address(route.next_hop)
        except ValueError:
            raise Rejected(f"{route.next_hop!r} is neither an ENI id nor an address") from None
        return self._resolver.resolve(route.next_hop)

    def _current_target(self, route: Route) -> str:
        """The target of a route as observed (an address form stands for its cached ENI)."""
        try:
            ip_address(route.next_hop)
        except ValueError:
            return route.next_hop
        return self._resolver.resolve(route.next_hop)

    def _add(self, change: Change, route: Route, fence: Fence | None) -> Outcome:
        target = self._target(route)
        before = self._book.get(route.destination)
        self._book.record([self._book.entry(route, target)], fence)
        try:
            self._write("CreateRoute", route.destination, target, fence)
        except _AlreadyExists:
            return self._already_exists(change, route, target, before, fence)
        self._book.confirm(route, target, fence)
        return Outcome(change)

    def _already_exists(
        self,
        change: Change,
        route: Route,
        target: str,
        before: LedgerEntry | None,
        fence: Fence | None,
    ) -> Outcome:
        """CreateRoute found a route there: done only if it is the one we want; ours (per the
        ledger as it was) to another target: retargeted in place; anyone else's: a conflict."""
        existing = self._read_back(route.destination)
        if existing is None:
            raise Transient(f"{route.destination}: EC2 said it exists but it is not listed yet")
        if existing.target == target and not existing.blackhole:
            self._book.confirm(route, target, fence)
            return Outcome(change)
        ours = (
            existing.origin == "CreateRoute"
            and before is not None
            and before.owns(existing.target)
            and within(route.destination, self._networks)
        )
        if not ours:
            self._book.restore({route.destination: before}, fence)
            raise RouteConflict(
                f"{route.destination} in {self.table_id} already goes to {existing.target}, "
                "which cloudroutes did not create; it is left alone (delete it if nothing needs "
                "it)"
            )
        current = Route(route.destination, existing.target, lease_key=route.lease_key)
        return self._replace(Change(Action.REPLACE, route, current), route, fence, change)

    def _read_back(self, destination: Destination) -> AwsRoute | None:
        return next((r for r in self._describe() if r.destination == destination), None)

    def _replace(
        self, change: Change, route: Route, fence: Fence | None, original: Change | None = None
    ) -> Outcome:
        target = self._target(route)
        current = change.current
        old = self._current_target(current) if isinstance(current, Route) else None
        if old == target and route.destination not in self._broken:
            # The same ENI in another form (an old flanneld lease and its resolved ENI): only
            # the ledger learns the new form; the route is already right.
            self._book.confirm(route, target, fence)
            return Outcome(original or change)
        self._book.record([self._book.entry(route, target, previous=old)], fence)
        self._write("ReplaceRoute", route.destination, target, fence)
        self._broken.discard(route.destination)
        self._book.confirm(route, target, fence)
        return Outcome(original or change)

    def _delete(
        self,
        change: Change,
        route: Route,
        fence: Fence | None,
        fresh: Mapping[Destination, LedgerEntry],
    ) -> Outcome:
        destination = route.destination
        refused = self._book.refused_delete(change, fresh, destination, self._current_target(route))
        if refused is not None:
            return refused
        error: RouteError | None = None
        try:
            self._write("DeleteRoute", destination, None, fence)
        except RouteNotFound as exc:
            error = exc
        self._book.forget([destination], fence)
        self._broken.discard(destination)
        return Outcome(change, error, present=None)

    def _write(
        self, action: str, destination: Destination, target: str | None, fence: Fence | None
    ) -> None:
        """One EC2 write, after the fence says this process may still write."""
        if fence is not None:
            fence.check()
        family = "DestinationIpv6CidrBlock" if destination.version == 6 else "DestinationCidrBlock"
        args: dict[str, str] = {"RouteTableId": self.table_id, family: str(destination)}
        if target is not None:
            args["NetworkInterfaceId"] = target
        try:
            if action == "CreateRoute":
                self._ec2.create_route(**args)
            elif action == "ReplaceRoute":
                self._ec2.replace_route(**args)
            else:
                self._ec2.delete_route(**args)
        except Exception as exc:
            code, message = _code(exc)
            if code == "RouteAlreadyExists":
                raise _AlreadyExists(f"{destination} exists in {self.table_id}") from None
            if (
                action == "ReplaceRoute"
                and code == "InvalidParameterValue"
                and ("no route" in message.lower())
            ):
                # What EC2 answers a ReplaceRoute of a missing route.
                raise RouteNotFound(f"{destination} is not in {self.table_id}") from None
            raise ec2_error(exc, action, f"{self.table_id} ({destination})", self._policy) from None


class _AlreadyExists(Rejected):
    """CreateRoute found a route at the destination (handled by the create itself)."""


def _code(exc: Exception) -> tuple[str, str]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return str(error.get("Code", "")), str(error.get("Message", ""))
    return "", ""

"""A local GCE for the gce backend's tests, the demo and the benchmarks.

- ``FakeComputeApi``: the parts of the Compute Engine API v1 the backend uses (routes insert,
  list, get, delete; global operations get and wait; instances and networks get), on the real
  wire format, so the real google-cloud-compute client talks to it as to Google. It keeps
  what GCE enforces and a fake would easily skip: the name rule, one next hop, immutable
  routes (no update), 409 on a taken name, a routes quota per project, operations that run
  for a while before they are DONE (or DONE with an error), requestId replays, bearer
  tokens, the routes GCE makes for a network (subnet, internet) and the warnings it shows on
  a route whose next-hop VM is gone or cannot forward.
- ``FakeMetadataServer``: the GCE metadata server of one instance (who am I, which network,
  a service-account token the fake API accepts), behind the ``Metadata-Flavor`` check.
- ``make_gce_project``: builds the scenario every test needs (a project, a network, instances)
  and returns typed values, so tests do not parse API answers themselves.
- ``GceLab``: all of it for a cluster of agents, the API behind a counting fault proxy
  (cloudroutes.lab.fault_proxy, GCE dialect).

List filters: one expression ``FIELD OP VALUE`` or several, each in parentheses (all must
hold). ``eq``/``ne`` match VALUE as a regular expression against the whole field, as GCE does
(RE2 there, Python's ``re`` here; the simple forms agree); ``=``/``!=`` compare literally.
VALUE may be quoted ("..." or '...'). FIELD is a top-level route field (``name``,
``description``, ``network``, ``destRange``, ``priority``, ``nextHopInstance``,
``nextHopIp``, ``nextHopGateway``, ``nextHopNetwork``, ``routeType``, ``selfLink``, ``id``);
numbers compare as their decimal text.
Not modelled: orderBy (refused), subnetwork ranges that would collide with a destRange,
the text of GCE's error messages beyond their gist.

Everything listens on 127.0.0.1 unless told to listen inside a network namespace the caller
made. The Google clients are never imported here: importing cloudroutes.lab stays cheap.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cloudroutes.lab.fault_proxy import GCE, Call, FaultProxy, gce_action, gce_error
from cloudroutes.lab.http_service import LOOPBACK, HttpService, LabCloud, LabHandler

LINK_BASE = "https://www.googleapis.com/compute/v1"
API_PREFIX = "/compute/v1/projects/"
DEFAULT_PROJECT = "cloudroutes-lab"
DEFAULT_PROJECT_NUMBER = 271828182845
DEFAULT_ZONE = "us-central1-a"
DEFAULT_NETWORK = "cloudroutes-lab"
DEFAULT_ROUTE_QUOTA = 200
DEFAULT_PRIORITY = 1000
MAX_RESULTS = 500
KEPT_OPERATIONS = 10_000  # the newest operations kept for get and wait
# Part of 198.18.0.0/15, the benchmarking range (RFC 2544): never routed on the internet.
SUBNET_CIDR = "198.18.0.0/20"
TOKEN_LIFETIME = 3599  # seconds, what the real metadata server hands out
FLAVOR_HEADER = "Metadata-Flavor"

# GCE's rule for resource names (RFC 1035 label, lower case).
NAME_RULE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_NAME_RULE_TEXT = "(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)"
_NEXT_HOPS = ("nextHopInstance", "nextHopIp", "nextHopGateway", "nextHopVpnTunnel", "nextHopIlb")
_FILTER_FIELDS = frozenset(
    {
        "name",
        "description",
        "network",
        "destRange",
        "priority",
        "nextHopInstance",
        "nextHopIp",
        "nextHopGateway",
        "nextHopNetwork",
        "routeType",
        "selfLink",
        "id",
        "kind",
    }
)


class ApiError(Exception):
    """An error answer of the fake API: HTTP ``status`` and Compute's ``reason``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def _not_found(path: str) -> ApiError:
    return ApiError(404, "notFound", f"The resource '{path}' was not found")


def _invalid(field_name: str, value: object, why: str) -> ApiError:
    return ApiError(400, "invalid", f"Invalid value for field '{field_name}': '{value}'. {why}")


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# -- access tokens ----------------------------------------------------------------------------


class AccessTokens:
    """The service-account tokens the metadata servers hand out and the fake API accepts.

    The metadata servers share one current token, as the real one caches it, and hand out a
    new one when it nears its end; a token stays valid until its own expiry, as on GCE, so
    one node's renewal does not break another's calls. ``rotate()`` revokes every token
    issued so far (the API then answers 401 and clients fetch a new one). Tokens never
    appear in repr.
    """

    def __init__(self, lifetime: int = TOKEN_LIFETIME) -> None:
        if lifetime < 1:
            raise ValueError("AccessTokens: lifetime must be at least 1 second")
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._issued: dict[str, float] = {}  # token -> expiry (monotonic)
        self._current = ""

    def __repr__(self) -> str:
        return f"AccessTokens(lifetime={self.lifetime})"

    def issue(self) -> tuple[str, int]:
        """The current token and the whole seconds it has left."""
        with self._lock:
            now = time.monotonic()
            expiry = self._issued.get(self._current, 0.0)
            if expiry - now < min(60.0, self.lifetime / 4):
                self._issued = {t: e for t, e in self._issued.items() if e > now}
                self._current = "ya29.lab-" + secrets.token_urlsafe(32)
                expiry = self._issued[self._current] = now + self.lifetime
            return self._current, max(1, int(expiry - now))

    def valid(self, token: str | None) -> bool:
        with self._lock:
            return time.monotonic() < self._issued.get(token or "", 0.0)

    def rotate(self) -> None:
        with self._lock:
            self._issued.clear()
            self._current = ""


# -- the scenario's values --------------------------------------------------------------------


@dataclass(frozen=True)
class LabGceInstance:
    """A VM the fake API knows: what a route's next hop and the metadata server name."""

    name: str
    zone: str
    instance_id: str
    ip: str
    can_ip_forward: bool
    self_link: str

    @property
    def path(self) -> str:
        """``projects/ID/zones/Z/instances/NAME``: the link without the API's base."""
        return self.self_link.removeprefix(LINK_BASE + "/")


@dataclass(frozen=True)
class LabGceProject:
    """One test project, as ``make_gce_project`` built it."""

    project_id: str
    project_number: int
    zone: str
    network_name: str
    network_link: str  # https://www.googleapis.com/compute/v1/projects/ID/global/networks/NET
    instances: tuple[LabGceInstance, ...]

    @property
    def network_path(self) -> str:
        """``projects/ID/global/networks/NET``, what the API expects in a route."""
        return self.network_link.removeprefix(LINK_BASE + "/")

    @property
    def metadata_network(self) -> str:
        """``projects/NUM/networks/NET``, what the metadata server says."""
        return f"projects/{self.project_number}/networks/{self.network_name}"


# -- the fake API's state ---------------------------------------------------------------------


@dataclass
class _Instance:
    name: str
    zone: str
    instance_id: str
    network_link: str
    ip: str
    can_ip_forward: bool


@dataclass
class _Project:
    project_id: str
    number: int
    route_quota: int
    networks: dict[str, str] = field(default_factory=dict)  # name -> id
    instances: dict[tuple[str, str], _Instance] = field(default_factory=dict)  # (zone, name)
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> resource
    system_routes: set[str] = field(default_factory=set)  # made by GCE, not by a client
    # Names an unfinished insert holds, and routes an unfinished delete is removing.
    inserting: set[str] = field(default_factory=set)
    deleting: set[str] = field(default_factory=set)
    request_ids: dict[str, str] = field(default_factory=dict)  # requestId -> operation name


@dataclass
class _Operation:
    project: str
    name: str
    op_id: str
    op_type: str  # insert | delete
    target: str  # the route's name
    target_link: str
    target_id: str
    insert_time: str
    done_at: float
    apply: Callable[[], None]
    error: tuple[str, str, int] | None  # (code, message, HTTP status) it ends with
    done: bool = False
    end_time: str = ""
    shown: bool = False  # answered once: PENDING in the insert's or delete's own answer

    def document(self) -> dict[str, Any]:
        status = "DONE" if self.done else "RUNNING" if self.shown else "PENDING"
        self.shown = True
        doc: dict[str, Any] = {
            "kind": "compute#operation",
            "id": self.op_id,
            "name": self.name,
            "operationType": self.op_type,
            "targetLink": self.target_link,
            "targetId": self.target_id,
            "status": status,
            "user": "cloudroutes-lab@developer.gserviceaccount.com",
            "progress": 100 if self.done else 0,
            "insertTime": self.insert_time,
            "startTime": self.insert_time,
            "selfLink": f"{LINK_BASE}/projects/{self.project}/global/operations/{self.name}",
        }
        if self.done:
            doc["endTime"] = self.end_time
        if self.done and self.error is not None:
            code, message, status = self.error
            doc["error"] = {"errors": [{"code": code, "message": message}]}
            doc["httpErrorStatusCode"] = status
            doc["httpErrorMessage"] = _HTTP_PHRASES.get(status, "ERROR")
        return doc


_HTTP_PHRASES = {400: "BAD REQUEST", 403: "FORBIDDEN", 404: "NOT FOUND", 409: "CONFLICT"}


@dataclass
class _OperationFault:
    op_type: str | None
    code: str
    message: str
    status: int
    times: int


class FakeComputeApi(HttpService):
    """The Compute Engine API v1 for routes, in this process; point clients at ``url``.

    ``operation_seconds``: how long an insert or delete runs (0: DONE at the first look); its
    own answer says PENDING, later looks RUNNING, then DONE. The change shows in routes only
    once its operation is DONE, as on GCE.
    ``quota_in_operation``: whether an insert beyond a project's routes quota is refused at
    once (HTTP 403, QUOTA_EXCEEDED) or accepted and its operation ends DONE with error
    QUOTA_EXCEEDED (GCE answers both ways). ``require_token``: every call must carry the
    bearer token ``tokens`` issues (401 otherwise). ``calls`` counts the calls that reached
    the API, per method (``routes.insert``), as the fault proxy names them. ``wait_seconds``
    is how long ``operations.wait`` blocks at most (GCE: about 2 minutes).
    """

    def __init__(
        self,
        host: str = LOOPBACK,
        netns: str | None = None,
        *,
        operation_seconds: float = 0.0,
        quota_in_operation: bool = True,
        require_token: bool = False,
        tokens: AccessTokens | None = None,
        wait_seconds: float = 120.0,
    ) -> None:
        super().__init__(host, netns)
        self.operation_seconds = operation_seconds
        self.quota_in_operation = quota_in_operation
        self.require_token = require_token
        self.tokens = tokens or AccessTokens()
        self.wait_seconds = wait_seconds
        self.calls: Counter[str] = Counter()
        self._changed = threading.Condition()
        self._projects: dict[str, _Project] = {}
        self._operations: dict[str, _Operation] = {}
        # The operations not DONE yet, oldest first: what _settle looks at on every call.
        self._running: list[_Operation] = []
        self._operation_faults: list[_OperationFault] = []
        self._serial = 0

    # -- set-up and inspection (any thread) ------------------------------------------------

    def reset(self) -> None:
        """Forget everything: projects, networks, instances, routes, operations, counts,
        injected faults. Options (operation_seconds, quotas mode, tokens) stay."""
        with self._changed:
            self._projects.clear()
            self._operations.clear()
            self._running.clear()
            self._operation_faults.clear()
            self.calls.clear()
            self._changed.notify_all()

    def add_project(
        self, project_id: str, number: int, route_quota: int = DEFAULT_ROUTE_QUOTA
    ) -> None:
        with self._changed:
            if project_id in self._projects:
                raise ValueError(f"project {project_id} exists in the fake API")
            self._projects[project_id] = _Project(project_id, number, route_quota)

    def add_network(
        self,
        project_id: str,
        name: str,
        subnet_cidr: str | None = None,
        internet_route: bool = False,
    ) -> str:
        """Add a network; returns its selfLink.

        With ``subnet_cidr``, the network has a subnet of that range and, as on GCE, its
        subnet route (routeType SUBNET, next hop the network; it cannot be deleted); with
        ``internet_route``, GCE's default route to the internet gateway. Both are listed with
        the network's routes, named ``default-route-<hex>``, and do not count against the
        routes quota here: the lab counts only routes inserted through the API.
        """
        with self._changed:
            project = self._project(project_id)
            project.networks[name] = self._next_id()
            link = f"{LINK_BASE}/projects/{project_id}/global/networks/{name}"
            if subnet_cidr is not None:
                dest = str(ipaddress.ip_network(subnet_cidr, strict=True))
                self._system_route(project, link, dest, "nextHopNetwork", link)
            if internet_route:
                gateway = f"{LINK_BASE}/projects/{project_id}/global/gateways/"
                hop = gateway + "default-internet-gateway"
                self._system_route(project, link, "0.0.0.0/0", "nextHopGateway", hop)
            return link

    def _system_route(
        self, project: _Project, network: str, dest: str, hop_field: str, hop: str
    ) -> None:
        """A route GCE makes itself (called with the lock held): the subnet route when the
        next hop is the network, else the default route to the internet gateway."""
        name = f"default-route-{secrets.token_hex(8)}"
        subnet = hop_field == "nextHopNetwork"
        project.routes[name] = {
            "kind": "compute#route",
            "id": self._next_id(),
            "creationTimestamp": _now_text(),
            "name": name,
            "description": f"Default local route to the subnetwork {dest}."
            if subnet
            else "Default route to the Internet.",
            "network": network,
            "destRange": dest,
            "priority": 0 if subnet else DEFAULT_PRIORITY,
            hop_field: hop,
            "selfLink": f"{LINK_BASE}/projects/{project.project_id}/global/routes/{name}",
            "routeType": "SUBNET" if subnet else "STATIC",
        }
        project.system_routes.add(name)

    def add_instance(
        self,
        project_id: str,
        zone: str,
        name: str,
        network: str,
        ip: str,
        can_ip_forward: bool = True,
    ) -> LabGceInstance:
        with self._changed:
            project = self._project(project_id)
            if network not in project.networks:
                raise ValueError(f"network {network} is not in project {project_id}")
            network_link = f"{LINK_BASE}/projects/{project_id}/global/networks/{network}"
            instance = _Instance(name, zone, self._next_id(), network_link, ip, can_ip_forward)
            project.instances[(zone, name)] = instance
            return self._lab_instance(project_id, instance)

    def add_route(self, project_id: str, route: dict[str, Any]) -> dict[str, Any]:
        """Make a route at once, as someone else made it (flanneld, an operator): ``route`` is
        an insert's body (camelCase), held to the same rules (ApiError otherwise), with no
        operation and no call counted. Returns the route as the API shows it."""
        with self._changed:
            project = self._project(project_id)
            self._settle()
            resource = self._valid_route(project, route)
            name = resource["name"]
            if name in project.routes or name in project.inserting:
                raise ApiError(409, "alreadyExists", f"route {name} exists in {project_id}")
            project.routes[name] = resource
            return self._route_view(project, resource)

    def remove_instance(self, project_id: str, zone: str, name: str) -> None:
        """The VM is deleted: its routes stay, with GCE's NEXT_HOP_INSTANCE_NOT_FOUND."""
        with self._changed:
            self._project(project_id).instances.pop((zone, name), None)

    def set_can_ip_forward(self, project_id: str, zone: str, name: str, value: bool) -> None:
        with self._changed:
            self._project(project_id).instances[(zone, name)].can_ip_forward = value

    def set_route_quota(self, limit: int, project_id: str | None = None) -> None:
        """Change the routes quota of one project (None: of every project)."""
        with self._changed:
            for project in self._projects.values():
                if project_id in (None, project.project_id):
                    project.route_quota = limit

    def fail_operations(
        self,
        code: str = "INTERNAL_ERROR",
        message: str = "Internal error.",
        *,
        op_type: str | None = None,
        status: int = 500,
        times: int = 1,
    ) -> None:
        """The next ``times`` operations (of ``op_type``, insert or delete; None: any) are
        accepted, then end DONE with this error and change nothing."""
        if op_type not in (None, "insert", "delete") or times < 1:
            raise ValueError("fail_operations: op_type insert|delete|None, times >= 1")
        with self._changed:
            self._operation_faults.append(_OperationFault(op_type, code, message, status, times))

    def complete_operations(self) -> None:
        """Every RUNNING operation is DONE now (for tests with a long ``operation_seconds``)."""
        with self._changed:
            for op in self._running:
                op.done_at = 0.0
            self._settle()
            self._changed.notify_all()

    def routes(self, project_id: str) -> list[dict[str, Any]]:
        """Every route of the project as the API would show it, by name."""
        with self._changed:
            self._settle()
            project = self._project(project_id)
            return [self._route_view(project, r) for _, r in sorted(project.routes.items())]

    def counts(self) -> dict[str, int]:
        with self._changed:
            return dict(self.calls)

    # -- serving -----------------------------------------------------------------------------

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _api_handler(self)

    def answer(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """One call: (HTTP status, JSON document). Errors are Compute's error documents."""
        action = gce_action(Call(method, target, (), b""))
        with self._changed:
            self.calls[action] += 1
        try:
            if self.require_token and not self.tokens.valid(_bearer(headers)):
                raise ApiError(
                    401,
                    "authError",
                    "Request had invalid authentication credentials. Expected OAuth 2 access "
                    "token, login cookie or other valid authentication credential.",
                )
            return 200, self._dispatch(method, target, body)
        except ApiError as err:
            return err.status, json.loads(gce_error(err.reason, err.message, err.status).body)
        except Exception as exc:
            # A bug in the fake must show in the test as an error, not as a dropped connection.
            text = f"fake Compute API: {type(exc).__name__}: {exc}"
            return 500, json.loads(gce_error("internalError", text, 500).body)

    def _dispatch(self, method: str, target: str, body: bytes) -> dict[str, Any]:
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if not parts.path.startswith(API_PREFIX):
            raise _not_found(parts.path)
        segments = parts.path.removeprefix(API_PREFIX).split("/")
        project_id, rest = segments[0], segments[1:]
        match (method, rest):
            case ("POST", ["global", "routes"]):
                return self._insert(project_id, _json_body(body), query.get("requestId"))
            case ("GET", ["global", "routes"]):
                return self._list(project_id, query)
            case ("GET", ["global", "routes", name]):
                return self._get_route(project_id, name)
            case ("DELETE", ["global", "routes", name]):
                return self._delete(project_id, name, query.get("requestId"))
            case ("GET", ["global", "operations", name]):
                return self._get_operation(project_id, name)
            case ("POST", ["global", "operations", name, "wait"]):
                return self._wait(project_id, name)
            case ("GET", ["global", "networks", name]):
                return self._get_network(project_id, name)
            case ("GET", ["zones", zone, "instances", name]):
                return self._get_instance(project_id, zone, name)
            case (_, ["global", "routes", *_]):
                # Routes are immutable on GCE: no update, no patch.
                raise ApiError(405, "httpMethodNotAllowed", f"Method {method} is not allowed")
        raise _not_found(parts.path)

    # -- routes ------------------------------------------------------------------------------

    def _insert(
        self, project_id: str, route: dict[str, Any], request_id: str | None
    ) -> dict[str, Any]:
        with self._changed:
            project = self._project(project_id)
            self._settle()
            if request_id and request_id in project.request_ids:
                # A retried request with the same requestId gets the first one's operation.
                return self._operations[project.request_ids[request_id]].document()
            resource = self._valid_route(project, route)
            name = resource["name"]
            if name in project.routes or name in project.inserting:
                path = f"projects/{project_id}/global/routes/{name}"
                raise ApiError(409, "alreadyExists", f"The resource '{path}' already exists")
            in_use = len(project.routes) - len(project.system_routes) + len(project.inserting)
            quota_message = (
                f"Quota 'ROUTES' exceeded.  Limit: {float(project.route_quota)} globally."
            )
            over_quota = in_use >= project.route_quota
            if over_quota and not self.quota_in_operation:
                raise ApiError(403, "QUOTA_EXCEEDED", quota_message)
            error = ("QUOTA_EXCEEDED", quota_message, 403) if over_quota else None

            def apply() -> None:
                project.routes[name] = resource

            project.inserting.add(name)
            op = self._start(project, "insert", name, resource["id"], apply, error, request_id)
            return op.document()

    def _valid_route(self, project: _Project, route: dict[str, Any]) -> dict[str, Any]:
        """The stored resource for an insert's body, or the ApiError GCE would answer."""
        name = route.get("name")
        if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
            why = f"Must be a match of regex '{_NAME_RULE_TEXT}'"
            raise _invalid("resource.name", name or "", why)
        dest = route.get("destRange")
        try:
            dest_net = ipaddress.ip_network(str(dest), strict=True)
        except ValueError:
            raise _invalid("resource.destRange", dest or "", "Invalid IPv4 CIDR.") from None
        hops = [h for h in _NEXT_HOPS if route.get(h)]
        if len(hops) != 1:
            raise _invalid(
                "resource", name, f"Exactly one next hop must be specified, got {hops or 'none'}."
            )
        priority = route.get("priority", DEFAULT_PRIORITY)
        if not isinstance(priority, int) or not 0 <= priority <= 65535:
            raise _invalid("resource.priority", priority, "Must be within 0..65535.")
        description = route.get("description", "")
        if not isinstance(description, str) or len(description) > 2048:
            raise _invalid("resource.description", description, "Must be a string of <= 2048.")
        tags = route.get("tags", [])
        if not isinstance(tags, list) or not all(
            isinstance(t, str) and NAME_RULE.fullmatch(t) for t in tags
        ):
            raise _invalid("resource.tags", tags, "Each tag must be a valid name.")
        network = self._network_link(project, route.get("network"))
        resource: dict[str, Any] = {
            "kind": "compute#route",
            "id": self._next_id(),
            "creationTimestamp": _now_text(),
            "name": name,
            "network": network,
            "destRange": str(dest_net),
            "priority": priority,
            "selfLink": f"{LINK_BASE}/projects/{project.project_id}/global/routes/{name}",
            "routeType": "STATIC",
        }
        if description:
            resource["description"] = description
        if tags:
            resource["tags"] = tags
        hop = hops[0]
        if hop == "nextHopInstance":
            resource[hop] = self._instance_link(project, route[hop])
        elif hop == "nextHopIp":
            try:
                resource[hop] = str(ipaddress.ip_address(route[hop]))
            except ValueError:
                raise _invalid("resource.nextHopIp", route[hop], "Invalid IP address.") from None
        else:
            resource[hop] = route[hop]
        return resource

    def _network_link(self, project: _Project, network: object) -> str:
        match _resource_path(network):
            case ["projects", owner, "global", "networks", name] if owner == project.project_id:
                pass
            case ["global", "networks", name]:
                pass
            case _:
                raise _invalid("resource.network", network or "", "Must be a network link.")
        if name not in project.networks:
            raise _not_found(f"projects/{project.project_id}/global/networks/{name}")
        return f"{LINK_BASE}/projects/{project.project_id}/global/networks/{name}"

    def _instance_link(self, project: _Project, instance: object) -> str:
        match _resource_path(instance):
            case ["projects", owner, "zones", zone, "instances", name] if (
                owner == project.project_id
            ):
                pass
            case ["zones", zone, "instances", name]:
                pass
            case _:
                why = "Must be an instance link."
                raise _invalid("resource.nextHopInstance", instance or "", why)
        path = f"projects/{project.project_id}/zones/{zone}/instances/{name}"
        if (zone, name) not in project.instances:
            raise _not_found(path)
        return f"{LINK_BASE}/{path}"

    def _route_view(self, project: _Project, route: dict[str, Any]) -> dict[str, Any]:
        """The route with the warnings GCE shows about its next hop at the time of asking."""
        hop = route.get("nextHopInstance")
        if not hop:
            return dict(route)
        zone, name = hop.split("/")[-3], hop.split("/")[-1]
        instance = project.instances.get((zone, name))
        warnings = []
        if instance is None:
            code, text = "NEXT_HOP_INSTANCE_NOT_FOUND", f"Next hop instance '{hop}' does not exist."
            warnings.append({"code": code, "message": text})
        elif not instance.can_ip_forward:
            code, text = (
                "NEXT_HOP_CANNOT_IP_FORWARD",
                f"Next hop instance '{hop}' cannot ip forward.",
            )
            warnings.append({"code": code, "message": text})
        return {**route, "warnings": warnings} if warnings else dict(route)

    def _list(self, project_id: str, query: dict[str, str]) -> dict[str, Any]:
        if query.get("orderBy"):
            raise _invalid("orderBy", query["orderBy"], "Sorting is not supported by the lab.")
        try:
            max_results = int(query.get("maxResults") or MAX_RESULTS)
        except ValueError:
            raise _invalid("maxResults", query["maxResults"], "Must be a number.") from None
        if not 0 <= max_results <= MAX_RESULTS:
            why = f"Must be less than or equal to {MAX_RESULTS}"
            raise _invalid("maxResults", max_results, why)
        max_results = max_results or MAX_RESULTS
        matches = route_filter(query.get("filter", ""))
        after = _page_start(query.get("pageToken", ""))
        with self._changed:
            project = self._project(project_id)
            self._settle()
            chosen = [
                self._route_view(project, project.routes[name])
                for name in sorted(project.routes)
                if name > after and matches(project.routes[name])
            ]
        page = chosen[:max_results]
        doc: dict[str, Any] = {
            "kind": "compute#routeList",
            "id": f"projects/{project_id}/global/routes",
            "selfLink": f"{LINK_BASE}/projects/{project_id}/global/routes",
        }
        if page:
            doc["items"] = page
        if len(chosen) > max_results:
            token = base64.urlsafe_b64encode(f"after:{page[-1]['name']}".encode()).decode()
            doc["nextPageToken"] = token
        return doc

    def _get_route(self, project_id: str, name: str) -> dict[str, Any]:
        with self._changed:
            project = self._project(project_id)
            self._settle()
            if name not in project.routes:
                raise _not_found(f"projects/{project_id}/global/routes/{name}")
            return self._route_view(project, project.routes[name])

    def _delete(self, project_id: str, name: str, request_id: str | None) -> dict[str, Any]:
        with self._changed:
            project = self._project(project_id)
            self._settle()
            if request_id and request_id in project.request_ids:
                return self._operations[project.request_ids[request_id]].document()
            if name not in project.routes:
                raise _not_found(f"projects/{project_id}/global/routes/{name}")
            path = f"projects/{project_id}/global/routes/{name}"
            if name in project.deleting:
                raise ApiError(400, "resourceNotReady", f"The resource '{path}' is not ready")
            if project.routes[name].get("routeType") == "SUBNET":
                why = "is a subnetwork route; delete the subnetwork instead"
                raise ApiError(400, "invalid", f"The resource '{path}' {why}")
            route = project.routes[name]

            def apply() -> None:
                project.routes.pop(name, None)
                project.system_routes.discard(name)

            project.deleting.add(name)
            op = self._start(project, "delete", name, route["id"], apply, None, request_id)
            return op.document()

    # -- operations ----------------------------------------------------------------------------

    def _start(
        self,
        project: _Project,
        op_type: str,
        target: str,
        target_id: str,
        apply: Callable[[], None],
        error: tuple[str, str, int] | None,
        request_id: str | None,
    ) -> _Operation:
        # Called with the lock held.
        if error is None:
            for fault in self._operation_faults:
                if fault.times > 0 and fault.op_type in (None, op_type):
                    fault.times -= 1
                    error = (fault.code, fault.message, fault.status)
                    break
        stamp = int(time.time() * 1000)
        op = _Operation(
            project=project.project_id,
            name=f"operation-{stamp}-{secrets.token_hex(6)}-{secrets.token_hex(4)}",
            op_id=self._next_id(),
            op_type=op_type,
            target=target,
            target_link=f"{LINK_BASE}/projects/{project.project_id}/global/routes/{target}",
            target_id=target_id,
            insert_time=_now_text(),
            done_at=time.monotonic() + self.operation_seconds,
            apply=apply,
            error=error,
        )
        self._forget_old_operations()
        self._operations[op.name] = op
        self._running.append(op)
        if request_id:
            project.request_ids[request_id] = op.name
        # Not settled here: like GCE, the insert or delete answers PENDING; with no delay the
        # operation is DONE at the next look.
        return op

    def _forget_old_operations(self) -> None:
        """Drop the oldest DONE operations beyond KEPT_OPERATIONS, as GCE expires old ones,
        so a long benchmark does not grow without end. Called with the lock held; a tenth
        more are let in before the next sweep, so that inserts do not each pay for one."""
        excess = len(self._operations) - KEPT_OPERATIONS
        if excess <= KEPT_OPERATIONS // 10:
            return
        old = [name for name, op in self._operations.items() if op.done][:excess]
        for name in old:
            del self._operations[name]
        gone = set(old)
        for project in self._projects.values():
            project.request_ids = {
                r: name for r, name in project.request_ids.items() if name not in gone
            }

    def _settle(self) -> None:
        """Finish every operation whose time has come. Called with the lock held."""
        now = time.monotonic()
        due = [op for op in self._running if op.done_at <= now]
        if not due:
            return
        self._running = [op for op in self._running if op.done_at > now]
        for op in due:
            op.done = True
            op.end_time = _now_text()
            project = self._projects.get(op.project)
            if project is None:
                continue
            (project.inserting if op.op_type == "insert" else project.deleting).discard(op.target)
            if op.error is None:
                op.apply()

    def _operation(self, project_id: str, name: str) -> _Operation:
        self._project(project_id)
        op = self._operations.get(name)
        if op is None or op.project != project_id:
            raise _not_found(f"projects/{project_id}/global/operations/{name}")
        return op

    def _get_operation(self, project_id: str, name: str) -> dict[str, Any]:
        with self._changed:
            self._settle()
            return self._operation(project_id, name).document()

    def _wait(self, project_id: str, name: str) -> dict[str, Any]:
        """Block until the operation is DONE or ``wait_seconds`` pass, then answer it."""
        deadline = time.monotonic() + self.wait_seconds
        with self._changed:
            while True:
                self._settle()
                op = self._operation(project_id, name)
                now = time.monotonic()
                if op.done or now >= deadline:
                    return op.document()
                self._changed.wait(min(op.done_at, deadline) - now)

    # -- networks and instances --------------------------------------------------------------

    def _get_network(self, project_id: str, name: str) -> dict[str, Any]:
        with self._changed:
            project = self._project(project_id)
            if name not in project.networks:
                raise _not_found(f"projects/{project_id}/global/networks/{name}")
            return {
                "kind": "compute#network",
                "id": project.networks[name],
                "name": name,
                "autoCreateSubnetworks": False,
                "routingConfig": {"routingMode": "REGIONAL"},
                "selfLink": f"{LINK_BASE}/projects/{project_id}/global/networks/{name}",
            }

    def _get_instance(self, project_id: str, zone: str, name: str) -> dict[str, Any]:
        with self._changed:
            project = self._project(project_id)
            instance = project.instances.get((zone, name))
            if instance is None:
                raise _not_found(f"projects/{project_id}/zones/{zone}/instances/{name}")
            lab = self._lab_instance(project_id, instance)
            region = zone.rsplit("-", 1)[0]
            return {
                "kind": "compute#instance",
                "id": instance.instance_id,
                "name": name,
                "zone": f"{LINK_BASE}/projects/{project_id}/zones/{zone}",
                "status": "RUNNING",
                "machineType": f"{LINK_BASE}/projects/{project_id}/zones/{zone}/machineTypes/"
                "e2-small",
                "canIpForward": instance.can_ip_forward,
                "networkInterfaces": [
                    {
                        "kind": "compute#networkInterface",
                        "name": "nic0",
                        "network": instance.network_link,
                        "subnetwork": f"{LINK_BASE}/projects/{project_id}/regions/{region}/"
                        "subnetworks/" + instance.network_link.rsplit("/", 1)[-1],
                        "networkIP": instance.ip,
                        "stackType": "IPV4_ONLY",
                    }
                ],
                "selfLink": lab.self_link,
            }

    # -- helpers (lock held) -----------------------------------------------------------------

    def _project(self, project_id: str) -> _Project:
        project = self._projects.get(project_id)
        if project is None:
            raise _not_found(f"projects/{project_id}")
        return project

    def _next_id(self) -> str:
        # GCE ids are unsigned 64-bit numbers, sent as strings.
        self._serial += 1
        return str(8_000_000_000_000_000_000 + self._serial)

    @staticmethod
    def _lab_instance(project_id: str, instance: _Instance) -> LabGceInstance:
        link = f"{LINK_BASE}/projects/{project_id}/zones/{instance.zone}/instances/{instance.name}"
        return LabGceInstance(
            name=instance.name,
            zone=instance.zone,
            instance_id=instance.instance_id,
            ip=instance.ip,
            can_ip_forward=instance.can_ip_forward,
            self_link=link,
        )


def _bearer(headers: dict[str, str]) -> str | None:
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(400, "parseError", "Parse Error") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "parseError", "Parse Error")
    return doc


def _resource_path(value: object) -> list[str]:
    """A resource reference (full link or partial path) as path segments; [] if not one."""
    if not isinstance(value, str):
        return []
    text = value
    for prefix in (LINK_BASE + "/", "https://compute.googleapis.com/compute/v1/"):
        text = text.removeprefix(prefix)
    return [s for s in text.split("/") if s] if "//" not in text else []


def _page_start(token: str) -> str:
    """The route name a page token says to start after ('' for the first page)."""
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        text = ""
    if not text.startswith("after:"):
        raise _invalid("pageToken", token, "Invalid page token.")
    return text.removeprefix("after:")


# -- list filters -----------------------------------------------------------------------------

_CLAUSE = re.compile(
    r"""\s*(?P<open>\()?\s*
    (?P<field>[A-Za-z][A-Za-z0-9_]*)\s*
    (?P<op>\beq\b|\bne\b|!=|=)\s*
    (?P<value>"(?:[^"\\]|\\.)*"|'[^']*'|[^\s()]+)\s*
    (?P<close>\))?\s*""",
    re.VERBOSE,
)


def route_filter(expression: str) -> Callable[[dict[str, Any]], bool]:
    """A predicate for a routes.list ``filter`` (the forms in this module's docstring);
    ApiError 400 for anything else."""
    clauses: list[Callable[[dict[str, Any]], bool]] = []
    pos = 0
    text = expression.strip()
    while pos < len(text):
        found = _CLAUSE.match(text, pos)
        if found is None or bool(found["open"]) != bool(found["close"]):
            raise _invalid("filter", expression, "Invalid list filter expression.")
        if not found["open"] and (pos > 0 or found.end() < len(text)):
            # Several expressions must each be in parentheses, as GCE requires.
            raise _invalid("filter", expression, "Put each expression in parentheses.")
        clauses.append(_clause(expression, found["field"], found["op"], found["value"]))
        pos = found.end()
    return lambda route: all(clause(route) for clause in clauses)


def _clause(
    expression: str, field_name: str, op: str, raw: str
) -> Callable[[dict[str, Any]], bool]:
    if field_name not in _FILTER_FIELDS:
        raise _invalid("filter", expression, f"Invalid field name '{field_name}'.")
    value = raw
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        value = raw[1:-1]
        if raw[0] == '"':
            value = re.sub(r"\\(.)", r"\1", value)
    if op in ("eq", "ne"):
        try:
            pattern = re.compile(value)
        except re.error:
            raise _invalid("filter", expression, "Invalid regular expression.") from None

        def test(text: str) -> bool:
            return pattern.fullmatch(text) is not None
    else:

        def test(text: str) -> bool:
            return text == value

    negate = op in ("ne", "!=")

    def clause(route: dict[str, Any]) -> bool:
        present = field_name in route
        text = str(route.get(field_name, ""))
        if not present:
            return negate
        return test(text) != negate

    return clause


# -- the metadata server ------------------------------------------------------------------------


class FakeMetadataServer(HttpService):
    """The GCE metadata server of one instance, on its own port (one server per node).

    Every request must carry ``Metadata-Flavor: Google`` and no ``X-Forwarded-For`` (403
    otherwise), as on GCE. It serves who the instance is, its network
    (``projects/NUM/networks/NET``, as the real one), and the service account's token from
    ``tokens`` (give the fake API's, so the API accepts it). ``hits`` counts requests per
    path. Point google-auth at it with ``host_port`` (GCE_METADATA_HOST, GCE_METADATA_IP).
    """

    def __init__(
        self,
        project: LabGceProject,
        instance: LabGceInstance,
        tokens: AccessTokens,
        host: str = LOOPBACK,
        netns: str | None = None,
        service_account: str | None = None,
    ) -> None:
        super().__init__(host, netns)
        self.project = project
        self.instance = instance
        self.tokens = tokens
        self.service_account = (
            service_account or f"{project.project_number}-compute@developer.gserviceaccount.com"
        )
        # False: a VM created without a service account; its token paths are 404.
        self.has_service_account = True
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def host_port(self) -> str:
        """``127.0.0.1:PORT``: the value for GCE_METADATA_HOST and GCE_METADATA_IP."""
        return self.url.removeprefix("http://")

    def paths(self) -> dict[str, str]:
        """Every path under /computeMetadata/v1/ the server answers, and its text."""
        p, inst = self.project, self.instance
        subnet = ipaddress.ip_network(SUBNET_CIDR)
        account = "instance/service-accounts/default/"
        return {
            "project/project-id": p.project_id,
            "project/numeric-project-id": str(p.project_number),
            "instance/id": inst.instance_id,
            "instance/name": inst.name,
            "instance/hostname": f"{inst.name}.{inst.zone}.c.{p.project_id}.internal",
            "instance/zone": f"projects/{p.project_number}/zones/{inst.zone}",
            "instance/network-interfaces/": "0/\n",
            "instance/network-interfaces/0/ip": inst.ip,
            "instance/network-interfaces/0/mac": _mac(inst.ip),
            "instance/network-interfaces/0/gateway": str(subnet.network_address + 1),
            "instance/network-interfaces/0/subnetmask": str(subnet.netmask),
            "instance/network-interfaces/0/network": p.metadata_network,
            "instance/service-accounts/": f"default/\n{self.service_account}/\n"
            if self.has_service_account
            else "",
            f"{account}email": self.service_account,
            f"{account}scopes": "https://www.googleapis.com/auth/cloud-platform\n",
            "universe/universe-domain": "googleapis.com",
        }

    def answer(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, str, str]:
        """(status, content type, body) for one request."""
        parts = urlsplit(target)
        names = {k.lower(): v for k, v in headers.items()}
        if names.get("metadata-flavor") != "Google":
            return 403, "text/html", "Missing required header: Metadata-Flavor: Google\n"
        if "x-forwarded-for" in names:
            # GCE refuses proxied requests, so a proxy on the VM cannot leak its tokens.
            return 403, "text/html", "Request contains an X-Forwarded-For header\n"
        if parts.path == "/":
            return 200, "application/text", "computeMetadata/\n"
        path = parts.path.removeprefix("/computeMetadata/v1/")
        if path == parts.path:
            return 404, "text/html", "Not Found\n"
        # The account answers as "default" and by its email, as on GCE.
        path = path.replace(
            f"service-accounts/{self.service_account}/", "service-accounts/default/"
        )
        with self._lock:
            self.hits[path] += 1
        account = "instance/service-accounts/default/"
        if path.startswith(account) and not self.has_service_account:
            return 404, "text/html", "Not Found\n"
        recursive = parse_qs(parts.query).get("recursive") == ["true"]
        if path == f"{account}token" and method in ("GET", "POST"):
            token, expires_in = self.tokens.issue()
            doc = {"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}
            return 200, "application/json", json.dumps(doc)
        if method != "GET":
            return 405, "text/html", "Method Not Allowed\n"
        if path in (account, account.rstrip("/")) and recursive:
            doc = {
                "aliases": ["default"],
                "email": self.service_account,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
            }
            return 200, "application/json", json.dumps(doc)
        paths = self.paths()
        body = paths.get(path, paths.get(path.rstrip("/")))
        if body is None:
            return 404, "text/html", "Not Found\n"
        return 200, "application/text", body

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _metadata_handler(self)


def _mac(ip: str) -> str:
    """The MAC GCE gives an interface: 42:01 and then the four bytes of its address."""
    return ":".join(f"{b:02x}" for b in (0x42, 0x01, *ipaddress.ip_address(ip).packed))


# -- HTTP handlers ------------------------------------------------------------------------------


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    try:
        length = int(handler.headers.get("Content-Length") or 0)
    except ValueError:
        length = 0
    return handler.rfile.read(length) if length > 0 else b""


def _api_handler(api: FakeComputeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(LabHandler):
        def _serve(self) -> None:
            body = _read_body(self)
            status, doc = api.answer(self.command, self.path, dict(self.headers.items()), body)
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

    return Handler


def _metadata_handler(server: FakeMetadataServer) -> type[BaseHTTPRequestHandler]:
    class Handler(LabHandler):
        def _serve(self) -> None:
            _read_body(self)
            status, content_type, body = server.answer(
                self.command, self.path, dict(self.headers.items())
            )
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header(FLAVOR_HEADER, "Google")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    return Handler


# -- the scenario -------------------------------------------------------------------------------


def make_gce_project(
    api: FakeComputeApi,
    nodes: int = 3,
    can_ip_forward: bool | Sequence[bool] = True,
    *,
    project_id: str = DEFAULT_PROJECT,
    project_number: int = DEFAULT_PROJECT_NUMBER,
    zone: str = DEFAULT_ZONE,
    network: str = DEFAULT_NETWORK,
    private_ips: Sequence[str] | None = None,
    route_quota: int = DEFAULT_ROUTE_QUOTA,
    system_routes: bool = True,
) -> LabGceProject:
    """Build a project with one network and ``nodes`` instances ``{network}-node{i}``.

    The network has one subnet, SUBNET_CIDR, and (``system_routes``) the routes GCE makes
    for a network: the subnet route and the default route to the internet, which a backend
    must list without taking them for its own. Node i gets 198.18.0.(10 + i) unless
    ``private_ips`` says otherwise (the demo's underlay addresses, in SUBNET_CIDR).
    ``can_ip_forward`` is one value for all or one per node: GCE drops forwarded packets of
    a VM without it, so the backend must check it.
    """
    forward = [can_ip_forward] * nodes if isinstance(can_ip_forward, bool) else can_ip_forward
    if nodes < 0 or len(forward) != nodes:
        raise ValueError(f"make_gce_project: can_ip_forward must give {nodes} values")
    subnet = ipaddress.ip_network(SUBNET_CIDR)
    ips = (
        list(private_ips)
        if private_ips is not None
        else [str(subnet.network_address + 10 + i) for i in range(nodes)]
    )
    if len(set(ips)) != nodes or not all(ipaddress.ip_address(ip) in subnet for ip in ips):
        raise ValueError(f"make_gce_project: private_ips must be {nodes} distinct in {subnet}")
    api.add_project(project_id, project_number, route_quota)
    if system_routes:
        network_link = api.add_network(project_id, network, SUBNET_CIDR, internet_route=True)
    else:
        network_link = api.add_network(project_id, network)
    instances = tuple(
        api.add_instance(project_id, zone, f"{network}-node{i}", network, ips[i], forward[i])
        for i in range(nodes)
    )
    return LabGceProject(
        project_id=project_id,
        project_number=project_number,
        zone=zone,
        network_name=network,
        network_link=network_link,
        instances=instances,
    )


@contextmanager
def metadata_servers(
    project: LabGceProject, tokens: AccessTokens, host: str = LOOPBACK, netns: str | None = None
) -> Iterator[list[FakeMetadataServer]]:
    """One started metadata server per instance of ``project``, stopped on exit."""
    servers: list[FakeMetadataServer] = []
    try:
        for instance in project.instances:
            servers.append(FakeMetadataServer(project, instance, tokens, host, netns).start())
        yield servers
    finally:
        for server in servers:
            server.stop()


# -- a cluster's GCE -------------------------------------------------------------------------------

# What may carry a host's Google settings into an agent's SDK.
_HOST_GOOGLE_ENV = ("GCE_METADATA_", "GOOGLE_", "CLOUDSDK_")


class GceLab(LabCloud):
    """A whole fake GCE for a cluster of agents: what the demo and the benchmarks start.

    The fake API listens on loopback, for the lab's own set-up and checks (``api``). The
    agents reach it through a counting ``FaultProxy`` with the GCE dialect (``api_url``), and
    each has its own metadata server; those listen on ``host`` inside ``netns`` when given (a
    "cloud" namespace on the demo's switch), else on loopback. The API requires the token the
    metadata servers hand out, as GCE does (``require_token``).
    """

    def __init__(
        self,
        node_ips: Sequence[str],
        *,
        can_ip_forward: bool | Sequence[bool] = True,
        host: str = LOOPBACK,
        netns: str | None = None,
        seed: int = 0,
        require_token: bool = True,
        operation_seconds: float = 0.0,
    ) -> None:
        self.node_ips = list(node_ips)
        self.can_ip_forward = can_ip_forward
        self.host = host
        self.netns = netns
        self.seed = seed
        self.api = FakeComputeApi(require_token=require_token, operation_seconds=operation_seconds)
        self.proxy: FaultProxy | None = None
        self.metadata: list[FakeMetadataServer] = []
        self.project: LabGceProject | None = None

    def _start(self, started: ExitStack) -> None:
        started.enter_context(self.api)
        self.project = make_gce_project(
            self.api,
            nodes=len(self.node_ips),
            can_ip_forward=self.can_ip_forward,
            private_ips=self.node_ips,
        )
        proxy = FaultProxy(
            self.api.url, dialect=GCE, seed=self.seed, host=self.host, netns=self.netns
        )
        self.proxy = started.enter_context(proxy)
        for instance in self.project.instances:
            server = FakeMetadataServer(
                self.project, instance, self.api.tokens, self.host, self.netns
            )
            self.metadata.append(started.enter_context(server))

    @property
    def api_url(self) -> str:
        """The Compute endpoint the agents use (the proxy): their ``api_endpoint``."""
        assert self.proxy is not None, "GceLab.start() first"
        return self.proxy.url

    def node_env(self, i: int, base: dict[str, str]) -> dict[str, str]:
        """The environment for node i's agent: ``base`` without any Google setting of the host,
        plus its metadata server, from which google-auth then takes the project and the
        credentials, as on a VM."""
        env = {k: v for k, v in base.items() if not k.startswith(_HOST_GOOGLE_ENV)}
        host_port = self.metadata[i].host_port
        env["GCE_METADATA_HOST"] = env["GCE_METADATA_IP"] = host_port
        # Nor may the host's gcloud configuration (application default credentials).
        env["CLOUDSDK_CONFIG"] = os.devnull
        return env

    def _forget(self) -> None:
        self.metadata.clear()
        self.proxy = None

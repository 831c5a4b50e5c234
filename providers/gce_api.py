"""The Compute API as the gce backend uses it: its clients, the names and marks of
cloudroutes' routes, and what each failure means to the reconciler.

Every call goes through ``Compute.call``, which maps a failure to a RouteError in one line
(naming the permission and the role file when access is denied) and builds the clients again
after the API refused their credentials, so a node recovers by itself once its service
account is fixed.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cloudroutes.errors import (
    CloudroutesError,
    QuotaExceeded,
    Rejected,
    RouteError,
    RouteNotFound,
    Throttled,
    Transient,
)
from cloudroutes.routes import Destination

T = TypeVar("T")

ROUTE_PREFIX = "cloudroutes-"
NAME_HASH = 40  # hex digits: "cloudroutes-" + 40 = 52 characters, within GCE's 63
CLUSTER_HASH = 16
CALL_TIMEOUT = 5.0  # seconds per API call (waits excepted)
MAX_MESSAGE = 300
NAME_RULE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
# Compute method -> the IAM permissions it needs. An insert changes the network's routing
# (compute.networks.updatePolicy) and makes an instance a next hop (compute.instances.use).
PERMISSIONS: dict[str, tuple[str, ...]] = {
    "routes.list": ("compute.routes.list",),
    "routes.get": ("compute.routes.get",),
    "routes.insert": (
        "compute.routes.create",
        "compute.networks.updatePolicy",
        "compute.instances.use",
    ),
    "routes.delete": ("compute.routes.delete",),
    "globalOperations.get": ("compute.globalOperations.get",),
    "globalOperations.wait": ("compute.globalOperations.get",),
    "instances.get": ("compute.instances.get",),
}
THROTTLING = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED"})
QUOTA = frozenset({"quotaExceeded", "QUOTA_EXCEEDED"})
ALREADY_EXISTS = frozenset({"alreadyExists", "ALREADY_EXISTS", "RESOURCE_ALREADY_EXISTS"})
NOT_FOUND = frozenset({"notFound", "RESOURCE_NOT_FOUND", "NOT_FOUND"})
NOT_READY = frozenset({"resourceNotReady", "RESOURCE_NOT_READY"})
DONE = "DONE"

# google-cloud-compute clients are built at run time; importing their types here would load
# the SDK for every user of this module.
RoutesClient = Any
OperationsClient = Any
InstancesClient = Any


@dataclass(frozen=True)
class ComputeClients:
    """The Compute clients of one project and endpoint (operations on the same endpoint)."""

    project: str
    routes: RoutesClient
    operations: OperationsClient
    instances: InstancesClient


# --- names, marks and paths --------------------------------------------------------------


def cluster_mark(cluster: str) -> str:
    return hashlib.sha256(cluster.encode()).hexdigest()[:CLUSTER_HASH]


def route_name(cluster: str, destination: Destination) -> str:
    """The name of cluster's route to ``destination``: unique per cluster and CIDR."""
    digest = hashlib.sha256(f"{cluster}\0{destination}".encode()).hexdigest()
    return ROUTE_PREFIX + digest[:NAME_HASH]


def flannel_name(destination: Destination) -> str:
    """The name flanneld's gce backend gave the route to ``destination``."""
    return "flannel-" + str(destination).replace(".", "-").replace("/", "-").replace(":", "-")


def description(cluster: str, lease_key: str) -> str:
    return f"cloudroutes cluster={cluster_mark(cluster)} lease={lease_key}"


def resource_path(link: str) -> str:
    """A resource reference as its path from ``projects/``: API links are full https URLs,
    requests and metadata use partial paths; comparing paths compares the resources."""
    text = link.strip()
    index = text.find("projects/")
    return text[index:].rstrip("/") if index >= 0 else text.rstrip("/")


def instance_path(project: str, zone: str, instance: str) -> str:
    return f"projects/{project}/zones/{zone}/instances/{instance}"


def instance_parts(path: str) -> tuple[str, str, str] | None:
    """(project, zone, name) of ``projects/P/zones/Z/instances/N``, else None."""
    parts = resource_path(path).split("/")
    if len(parts) == 6 and (parts[0], parts[2], parts[4]) == ("projects", "zones", "instances"):
        return parts[1], parts[3], parts[5]
    return None


# --- errors ------------------------------------------------------------------------------


class AlreadyExists(Rejected):
    """An insert found a route of that name (the insert itself looks at it)."""


class BadCredentials(Rejected):
    """The API refused the credentials: the clients are built again for the next call."""


def _reasons(exc: Any) -> set[str]:
    found = {str(exc.reason)} if getattr(exc, "reason", None) else set()
    for item in getattr(exc, "errors", None) or ():
        if isinstance(item, Mapping) and item.get("reason"):
            found.add(str(item["reason"]))
    return found


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:MAX_MESSAGE] or "no message"


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        seconds = float(headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None
    return seconds if 0 < seconds <= 3600 else None


def gce_error(exc: BaseException, method: str, where: str, policy: str) -> RouteError:
    """The route error for a failed Compute call ``method`` (e.g. "routes.insert") on
    ``where``; ``policy`` is the permission file named when access is denied."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    if isinstance(exc, api.GoogleAPICallError):
        status = exc.code if isinstance(exc.code, int) else 0
        reasons = _reasons(exc)
        message = _one_line(getattr(exc, "message", exc))
        if reasons & THROTTLING or status == 429:
            why = " ".join([str(status), *sorted(reasons & THROTTLING)])
            return Throttled(
                f"GCE throttled {method} on {where} ({why}); backing off",
                retry_after=_retry_after(exc),
            )
        if reasons & QUOTA:
            return _quota(where)
        if reasons & ALREADY_EXISTS or status == 409:
            return AlreadyExists(f"{where} already exists")
        if status == 404 and method in ("routes.delete", "routes.get", "instances.get"):
            return RouteNotFound(f"{method} on {where}: the route is not there")
        if reasons & NOT_READY:
            return Transient(f"{method} on {where}: the resource is busy ({message}); retrying")
        if status == 401:
            return BadCredentials(
                f"GCE refused the credentials for {method} on {where}; give the instance a "
                "service account with the cloud-platform scope, or set "
                "GOOGLE_APPLICATION_CREDENTIALS"
            )
        if status == 403:
            needed = " and ".join(PERMISSIONS.get(method, (f"compute.{method}",)))
            return Rejected(
                f"not permitted to call {method} on {where} (needs {needed}); grant it to this "
                f"node's service account with the custom role in {policy}"
            )
        if status >= 500 or isinstance(exc, api.ServerError):
            return Transient(f"GCE failed {method} on {where} ({status}); retrying")
        return Rejected(f"GCE refused {method} on {where}: {status}: {message}")
    if isinstance(exc, auth.DefaultCredentialsError):
        return Rejected(
            f"no Google credentials for {method} on {where}: give the instance a service "
            f"account (custom role in {policy}) or set GOOGLE_APPLICATION_CREDENTIALS"
        )
    if isinstance(exc, auth.TransportError):
        return Transient(f"could not get a token for {method} on {where}; retrying")
    if isinstance(exc, auth.RefreshError):
        return Rejected(
            f"could not get an access token for {method} on {where} "
            f"({_one_line(exc)[:120]}); check the instance's service account and its scopes"
        )
    # Timeouts and dropped connections: the call may or may not have been applied; the next
    # read of the routes decides.
    return Transient(f"{method} on {where} got no answer ({type(exc).__name__}); retrying")


def operation_error(op: Any, method: str, where: str, policy: str) -> RouteError | None:
    """The route error an operation that ended with an error stands for (None: it did not)."""
    errors = list(getattr(getattr(op, "error", None), "errors", None) or ())
    if not errors:
        return None
    codes = {str(e.code) for e in errors}
    message = _one_line(errors[0].message)
    status = int(getattr(op, "http_error_status_code", 0) or 0)
    if codes & THROTTLING:
        return Throttled(f"GCE throttled the operation of {method} on {where}; backing off")
    if codes & QUOTA:
        return _quota(where)
    if codes & ALREADY_EXISTS:
        return AlreadyExists(f"{where} already exists")
    if codes & NOT_FOUND and method == "routes.delete":
        return RouteNotFound(f"{method} on {where}: the route is not there")
    if status == 403:
        needed = " and ".join(PERMISSIONS.get(method, ()))
        return Rejected(
            f"not permitted to call {method} on {where} (needs {needed}); grant it with the "
            f"custom role in {policy}"
        )
    if status >= 500 or "INTERNAL" in " ".join(codes):
        return Transient(f"the operation of {method} on {where} failed ({message}); retrying")
    return Rejected(f"GCE refused {method} on {where}: {sorted(codes)[0]}: {message}")


def _quota(where: str) -> QuotaExceeded:
    return QuotaExceeded(
        f"the project's routes quota is used up (QUOTA_EXCEEDED at {where}): free routes or "
        "raise the ROUTES quota (IAM & Admin > Quotas)"
    )


class Compute:
    """The Compute clients of one backend, built at first use (missing credentials are then a
    route error the reconciler reports and retries, not a failed start) and built again after
    the API refused their credentials."""

    def __init__(self, build: Callable[[], ComputeClients], policy: str) -> None:
        self._build = build
        self.policy = policy
        self._lock = threading.Lock()
        self._clients: ComputeClients | None = None

    def __repr__(self) -> str:
        return "Compute()"  # never the credentials

    def clients(self, method: str) -> ComputeClients:
        with self._lock:
            if self._clients is None:
                try:
                    self._clients = self._build()
                except RouteError:
                    raise
                except CloudroutesError as exc:  # the metadata server, say
                    raise Rejected(str(exc)) from None
                except Exception as exc:
                    raise gce_error(exc, method, "the Compute API", self.policy) from None
            return self._clients

    def forget(self) -> None:
        with self._lock:
            self._clients = None

    def call(self, method: str, where: str, call: Callable[[ComputeClients], T]) -> T:
        """``call(clients)``, Compute method ``method`` on ``where``; a RouteError if it
        fails."""
        clients = self.clients(method)
        try:
            return call(clients)
        except Exception as exc:
            error = gce_error(exc, method, where, self.policy)
        if isinstance(error, BadCredentials):
            self.forget()
        raise error


class ForwardingCheck:
    """Whether an instance may be a next hop: GCE drops the packets an instance forwards
    unless it was created with IP forwarding on (canIpForward, from instances.get).

    Shared by the tables of one backend. A "yes" is kept (it cannot change on a running
    instance); a "no" or a failure is asked again next time, which the reconciler's backoff
    paces, so an instance recreated with forwarding is routed without a restart.
    """

    def __init__(self, compute: Compute) -> None:
        self._compute = compute
        self._lock = threading.Lock()
        self._forwarding: set[str] = set()

    def __call__(self, instance: str) -> None:
        """Return if ``instance`` (a path) forwards; raise Rejected saying why not, or the
        RouteError of the failed call."""
        with self._lock:
            if instance in self._forwarding:
                return
        parts = instance_parts(instance)
        if parts is None:
            raise Rejected(f"{instance!r} is not an instance (projects/P/zones/Z/instances/N)")
        project, zone, name = parts
        try:
            found = self._compute.call(
                "instances.get",
                f"instance {name} in {zone}",
                lambda c: c.instances.get(
                    project=project, zone=zone, instance=name, retry=None, timeout=CALL_TIMEOUT
                ),
            )
        except RouteNotFound:
            raise Rejected(f"instance {name} in {zone} does not exist") from None
        if not found.can_ip_forward:
            raise Rejected(
                f"instance {name} in {zone} has IP forwarding off, so GCE would drop the "
                "packets routed to its pods; no route is made to it. IP forwarding is set when "
                "an instance is created: recreate it with `gcloud compute instances create "
                "--can-ip-forward` (or canIpForward: true in its template)"
            )
        with self._lock:
            self._forwarding.add(instance)

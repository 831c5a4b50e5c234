"""gce: every lease's subnet routed by a GCE static route to its node's instance.

Options (``Backend`` of the network config): the common ones of every cloud backend, ``Mode``
(``node``: each agent inserts its own route and one elected agent deletes the routes of
leases that are gone; ``cluster``: one elected process writes every route), ``ClusterName``
(whose routes these are: the route names and the ledger derive from it; default the etcd
prefix), ``ResyncPeriod`` (seconds between full reads, default 300) and ``RouteLimit`` (the
routes cloudroutes may hold in the network; GCE's quota is per project, and is otherwise
learnt from a QUOTA_EXCEEDED answer).

The node learns who it is from the metadata server (``Metadata-Flavor: Google``) at
``GCE_METADATA_HOST`` (default metadata.google.internal), falling back to ``GCE_METADATA_IP``
(default 169.254.169.254): project, zone, instance name, and the network of the interface
the agent uses. Credentials are google.auth.default()'s (the instance's service account,
or GOOGLE_APPLICATION_CREDENTIALS). ``CLOUDROUTES_GCE_API_ENDPOINT`` (e.g.
http://127.0.0.1:8080) replaces the Compute API's address for every call, operations included.

Routes go to instances (``nextHopInstance``), and only to instances created with IP
forwarding: GCE drops what an instance without it forwards. IPv4 only: IPv6 networks are
refused at start (GCE takes IPv6 static routes only for some next-hop types).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cloudroutes.backend import BackendContext, Coordination
from cloudroutes.config import NetworkConfig
from cloudroutes.errors import ConfigError, LeaseRefused
from cloudroutes.jsonfields import FoldedObject
from cloudroutes.lease import NO_IPV4, Lease, LeaseAttrs
from cloudroutes.routes import Route
from providers.cloud import (
    CloudBackend,
    CloudOptions,
    TableArgs,
    parse_cloud_options,
    routes_to,
    shown,
)
from providers.gce_api import NAME_RULE, Compute, ComputeClients, ForwardingCheck, instance_path
from providers.gce_route_table import GceRouteTable

log = logging.getLogger(__name__)

BACKEND_TYPE = "gce"
POLICY_FILES = {
    "node": "providers/policies/gce-node.json",
    "cluster": "providers/policies/gce-controller.json",
}
API_ENDPOINT_VARIABLE = "CLOUDROUTES_GCE_API_ENDPOINT"
METADATA_HOST = "metadata.google.internal"
METADATA_IP = "169.254.169.254"
METADATA_TIMEOUT = 2.0
SCOPES = ("https://www.googleapis.com/auth/compute",)
# Project ids: 6 to 30 lower-case letters, digits and hyphens (older ones may carry a domain).
_PROJECT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.:")


# --- options ---------------------------------------------------------------------------------


def parse_options(config: NetworkConfig, coordination: Coordination | None) -> CloudOptions:
    """The backend's options (the common ones), or one ConfigError naming the fix."""
    if config.enable_ipv6:
        raise ConfigError(
            "gce routes IPv4 subnets only (GCE takes IPv6 static routes for a few next-hop "
            "types, not for cloudroutes' instance routes); set EnableIPv6 to false, or use "
            "another backend for a dual-stack network"
        )
    return parse_cloud_options(
        config, coordination, limit_hint="the routes it may use of the project's ROUTES quota"
    )


# --- the metadata server -----------------------------------------------------------------------


@dataclass(frozen=True)
class NodeIdentity:
    """Who this instance is, from the metadata server."""

    project: str  # the project id
    zone: str
    instance: str
    network: str  # projects/ID/global/networks/NET

    @property
    def instance_path(self) -> str:
        return instance_path(self.project, self.zone, self.instance)


class Metadata:
    """The GCE metadata server: GETs with ``Metadata-Flavor: Google``, short timeouts, at
    google-auth's own addresses (GCE_METADATA_HOST, then GCE_METADATA_IP)."""

    def __init__(self, hosts: Sequence[str] | None = None, timeout: float = METADATA_TIMEOUT):
        if hosts is None:
            hosts = (
                os.environ.get("GCE_METADATA_HOST") or METADATA_HOST,
                os.environ.get("GCE_METADATA_IP") or METADATA_IP,
            )
        self.hosts = tuple(dict.fromkeys(h.strip().removeprefix("http://") for h in hosts if h))
        for host in self.hosts:
            if not host or "/" in host or any(c.isspace() for c in host):
                raise ConfigError(
                    f"GCE_METADATA_HOST/GCE_METADATA_IP {shown(host)} is not a host[:port]; "
                    f"unset it on GCE (the default is {METADATA_HOST})"
                )
        self._timeout = timeout
        self._host: str | None = None  # the first one that answered
        # Metadata is link-local: never through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"Metadata({self.hosts!r})"

    def get(self, path: str) -> str:
        hosts = (self._host,) if self._host else self.hosts
        reasons: list[str] = []
        for host in hosts:
            url = f"http://{host}/computeMetadata/v1/{path}"
            request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
            try:
                with self._opener.open(request, timeout=self._timeout) as answer:
                    text = answer.read(65536).decode("utf-8", "replace").strip()
            except urllib.error.HTTPError as exc:
                raise ConfigError(
                    f"the GCE metadata server at {host} answered {exc.code} to /{path}; is "
                    "this a GCE instance (or GCE_METADATA_HOST the right server)?"
                ) from None
            except (OSError, ValueError) as exc:
                reasons.append(f"{host}: {getattr(exc, 'reason', exc)}")
                continue
            self._host = host
            return text
        raise ConfigError(
            f"cannot reach the GCE metadata server ({'; '.join(reasons)}); on GCE check the "
            "instance's network; elsewhere set GCE_METADATA_HOST"
        )


def _checked(value: str, what: str, where: str) -> str:
    if not NAME_RULE.fullmatch(value):
        raise ConfigError(
            f"the GCE metadata server at {where} gave {what} {shown(value)}, which is not a "
            "GCE name; is this a GCE instance?"
        )
    return value


def discover(metadata: Metadata, address: str | None) -> NodeIdentity:
    """This instance, and the network of the interface holding ``address`` (the agent's
    interface IP; the first interface when None or not found): its route lives there."""
    where = metadata.hosts[0]
    project = metadata.get("project/project-id")
    if not project or not set(project) <= _PROJECT_CHARS or len(project) > 100:
        raise ConfigError(
            f"the GCE metadata server at {where} gave project id {shown(project)}; is this "
            "a GCE instance?"
        )
    zone = _checked(metadata.get("instance/zone").rsplit("/", 1)[-1], "zone", where)
    instance = _checked(metadata.get("instance/name"), "instance name", where)
    nic = "0"
    if address is not None:
        for line in metadata.get("instance/network-interfaces/").split():
            candidate = line.strip("/")
            if candidate.isdigit() and (
                metadata.get(f"instance/network-interfaces/{candidate}/ip") == address
            ):
                nic = candidate
                break
    # projects/NUM/networks/NET: a numeric project and no "global/"; the API wants the id.
    parts = metadata.get(f"instance/network-interfaces/{nic}/network").split("/")
    network = _checked(parts[-1], "network", where)
    owner = parts[1] if len(parts) == 4 and parts[0] == "projects" else ""
    if owner != metadata.get("project/numeric-project-id"):
        raise ConfigError(
            f"the network {network} of this instance's interface {nic} belongs to project "
            f"{shown(owner)}, not to the instance's own ({project}): a Shared VPC, whose routes "
            "live in the host project; gce routes networks of the instance's own project only"
        )
    return NodeIdentity(project, zone, instance, f"projects/{project}/global/networks/{network}")


# --- the Compute API ---------------------------------------------------------------------------


def compute_clients(project: str) -> ComputeClients:
    """Compute clients with google.auth.default()'s credentials, at CLOUDROUTES_GCE_API_ENDPOINT
    when set (the operations client too, so no call ever goes to the default address)."""
    import google.auth
    from google.api_core.client_options import ClientOptions
    from google.cloud import compute_v1

    credentials, _ = google.auth.default(scopes=SCOPES)
    endpoint = os.environ.get(API_ENDPOINT_VARIABLE, "").strip()
    options = ClientOptions(api_endpoint=endpoint) if endpoint else None
    kwargs: dict[str, Any] = {"credentials": credentials, "client_options": options}
    return ComputeClients(
        project=project,
        routes=compute_v1.RoutesClient(**kwargs),
        operations=compute_v1.GlobalOperationsClient(**kwargs),
        instances=compute_v1.InstancesClient(**kwargs),
    )


def _endpoint_checked() -> None:
    endpoint = os.environ.get(API_ENDPOINT_VARIABLE, "").strip()
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(
            f"{API_ENDPOINT_VARIABLE} {shown(endpoint)} is not an http:// or https:// URL; "
            "e.g. http://127.0.0.1:8080, or unset it to use Google's"
        )


def _sdk_checked() -> None:
    try:
        found = importlib.util.find_spec("google.cloud.compute_v1") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError(
            "gce needs google-cloud-compute, which is not installed: pip install 'cloudroutes[gce]'"
        )


# --- what each lease wants -------------------------------------------------------------------


def lease_target(lease: Lease) -> str:
    """The instance a lease's routes go to, from its BackendData {Project, Zone, Instance}."""
    data = lease.attrs.backend_data
    if lease.backend_type == BACKEND_TYPE and isinstance(data, dict) and data:
        fields = FoldedObject(data)
        values = [fields.get(k) for k in ("Project", "Zone", "Instance")]
        project, zone, instance = values
        if (
            all(isinstance(v, str) for v in values)
            and set(str(project)) <= _PROJECT_CHARS
            and NAME_RULE.fullmatch(str(zone))
            and NAME_RULE.fullmatch(str(instance))
        ):
            return instance_path(str(project), str(zone), str(instance))
        raise LeaseRefused(
            f"its BackendData {shown(data)} does not name an instance "
            '({"Project", "Zone", "Instance"} of GCE names)'
        )
    if lease.public_ip != NO_IPV4:
        # flanneld's gce backend published no instance; finding one by address would take a
        # project-wide instances.aggregatedList (and compute.instances.list) per lease.
        raise LeaseRefused(
            f"it is a lease of flanneld's gce backend, naming only its PublicIP "
            f"{lease.public_ip}, not its instance; run cloudroutes on that node (flanneld "
            "keeps its own route meanwhile)"
        )
    raise LeaseRefused("it names no instance to route to")


def lease_routes(lease: Lease, config: NetworkConfig) -> list[Route]:
    """The routes a lease wants: one per subnet, to its instance."""
    return routes_to(lease, config, lease_target)


# --- the backend -----------------------------------------------------------------------------


class GceBackend(CloudBackend):
    backend_type = BACKEND_TYPE
    default_mtu = 1460  # GCE's

    def __init__(self, ctx: BackendContext) -> None:
        self.options = parse_options(ctx.config, ctx.coordination)
        super().__init__(ctx, self.options)
        _endpoint_checked()
        _sdk_checked()
        self._policy = POLICY_FILES[self.options.mode]
        self._identity: NodeIdentity | None = None
        self._compute = Compute(lambda: compute_clients(self.identity().project), self._policy)
        self._check = ForwardingCheck(self._compute)

    # --- the node ---------------------------------------------------------------------------

    def identity(self) -> NodeIdentity:
        """This instance as the metadata server describes it (asked once)."""
        with self._lock:
            if self._identity is None:
                self._identity = discover(Metadata(), self.address())
            return self._identity

    def prepare(self) -> LeaseAttrs:
        identity = self.identity()
        return self.lease_attrs(
            {"Project": identity.project, "Zone": identity.zone, "Instance": identity.instance}
        )

    # --- the Compute API ----------------------------------------------------------------------

    @property
    def compute(self) -> Compute:
        """The Compute clients, built at first use: missing credentials are then a route
        error the reconciler reports and retries, not a failed start."""
        return self._compute

    # --- modes ------------------------------------------------------------------------------

    def route_table_ids(self) -> tuple[str, ...]:
        """The network of this node's interface: GCE routes belong to a network."""
        return (self.identity().network,)

    def lease_routes(self) -> Callable[[Lease], list[Route]]:
        config = self._config
        return lambda lease: lease_routes(lease, config)

    def cloud_table(self, table_id: str, args: TableArgs) -> GceRouteTable:
        return GceRouteTable(
            self._compute,
            table_id,
            cluster=self.options.cluster_name,
            can_forward=self._check,
            **args,
        )

"""ali-vpc: every lease's subnet routed by the Alibaba Cloud VPC route table to its instance.

Options (``Backend`` of the network config, keys matched without regard to case):

- ``AccessKeyID`` / ``AccessKeySecret`` (flannel's): a RAM user's AccessKey pair. Without
  them, the environment's ``ACCESS_KEY_ID`` / ``ACCESS_KEY_SECRET`` (flannel's), else the
  instance's RAM role, whose STS credentials come from the metadata server and are renewed
  before they expire.
- ``RouteTableIDs``: a route table id or a list of them; each is kept in sync. Default: the
  route table of the VPC's vRouter (DescribeVpcs, then DescribeVRouters), when it has one.
- ``Mode``, ``ClusterName``, ``ResyncPeriod``, ``RouteLimit``: as for every cloud backend
  (providers/cloud.py). Without ``RouteLimit`` the table's room is not known beforehand; a
  full table answers QuotaExceeded and creates stop until room appears.

The node learns who it is from the ECS metadata server at
``CLOUDROUTES_ALIYUN_METADATA_ENDPOINT`` (default http://100.100.100.200). The VPC API is
``https://vpc.<region>.aliyuncs.com``, or ``CLOUDROUTES_ALIYUN_VPC_ENDPOINT`` (scheme
included; plain http only when set there, and said in the log).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cloudroutes.backend import BackendContext, Coordination
from cloudroutes.config import NetworkConfig
from cloudroutes.errors import ConfigError, LeaseRefused, Rejected, RouteError, Transient
from cloudroutes.jsonfields import FoldedObject
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.routes import Route
from providers.ali_route_table import (
    INSTANCE_ID,
    AliRouteTable,
    Credentials,
    Markers,
    VpcClient,
    listed,
    vpc_error,
)
from providers.cloud import (
    CloudBackend,
    CloudOptions,
    TableArgs,
    parse_cloud_options,
    route_table_ids,
    routes_to,
    shown,
)

log = logging.getLogger(__name__)

BACKEND_TYPE = "ali-vpc"
POLICY_FILES = {
    "node": "providers/policies/ali-vpc-node.json",
    "cluster": "providers/policies/ali-vpc-controller.json",
}
ROUTE_TABLE_ID = re.compile(r"vtb-[0-9a-z]{8,32}")
METADATA_ENV = "CLOUDROUTES_ALIYUN_METADATA_ENDPOINT"
ENDPOINT_ENV = "CLOUDROUTES_ALIYUN_VPC_ENDPOINT"
METADATA_DEFAULT = "http://100.100.100.200"
METADATA_TIMEOUT = 2.0
METADATA_TOKEN_TTL = 21600
# STS credentials are renewed this long before they expire (or at half their life, if less).
RENEW_MARGIN = timedelta(minutes=15)
_REGION = re.compile(r"[a-z]{2,}(-[a-z0-9]+)+")


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AliVpcOptions:
    route_table_ids: tuple[str, ...]  # empty: discover
    common: CloudOptions
    access_key_id: str | None = None
    access_key_secret: str | None = field(default=None, repr=False)

    @property
    def mode(self) -> str:
        return self.common.mode

    @property
    def policy(self) -> str:
        return POLICY_FILES[self.mode]


def parse_options(config: NetworkConfig, coordination: Coordination | None) -> AliVpcOptions:
    """The backend's options, or one ConfigError naming the option and the fix (never a
    secret's value)."""
    backend = config.backend
    tables = route_table_ids(
        backend.get("RouteTableIDs", backend.get("RouteTableID")),
        "RouteTableIDs",
        ROUTE_TABLE_ID,
        "vtb-bp1a2b3c4d5e6f7g8h9i0",
    )
    key_id = backend.get("AccessKeyID")
    secret = backend.get("AccessKeySecret")
    for name, value in (("AccessKeyID", key_id), ("AccessKeySecret", secret)):
        if value is not None and (not isinstance(value, str) or not value.isprintable()):
            raise ConfigError(f"Backend.{name} must be a string; set it or leave it out")
    if bool(key_id) != bool(secret):
        raise ConfigError(
            "Backend.AccessKeyID and Backend.AccessKeySecret go together; set both, or neither "
            "(then ACCESS_KEY_ID/ACCESS_KEY_SECRET or the instance's RAM role are used)"
        )
    common = parse_cloud_options(
        config, coordination, limit_hint="Alibaba's custom entries per table quota, e.g. 200"
    )
    return AliVpcOptions(tables, common, key_id or None, secret or None)


def vpc_endpoint(region: str) -> str:
    """The VPC API's URL: the region's https endpoint, or the configured one."""
    configured = os.environ.get(ENDPOINT_ENV, "").strip()
    if not configured:
        return f"https://vpc.{region}.aliyuncs.com"
    parts = urllib.parse.urlsplit(configured)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{ENDPOINT_ENV} {shown(configured)} is not an https://host[:port] URL; unset it "
            f"to use https://vpc.{region}.aliyuncs.com"
        )
    if parts.scheme == "http":
        log.warning(
            "ali-vpc: the VPC API at %s is plain http, as %s says (for tests only; unset it in "
            "production)",
            configured,
            ENDPOINT_ENV,
        )
    return configured


# --- the metadata server ---------------------------------------------------------------------


@dataclass(frozen=True)
class NodeIdentity:
    """Who this instance is, from the metadata server."""

    instance_id: str
    region: str
    vpc_id: str
    vswitch_id: str
    private_ip: str


class Metadata:
    """The ECS metadata server. It asks for a token (the hardened mode) and sends it; a server
    that gives none is asked without."""

    def __init__(self, base: str | None = None, timeout: float = METADATA_TIMEOUT) -> None:
        self.base = (base or os.environ.get(METADATA_ENV) or METADATA_DEFAULT).rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise ConfigError(
                f"{METADATA_ENV} {shown(self.base)} is not an http:// URL; unset it on ECS "
                f"(the default is {METADATA_DEFAULT})"
            )
        self._timeout = timeout
        self._token: str | None = None
        self._lock = threading.Lock()
        # Metadata is link-local: never through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"Metadata({self.base!r})"  # never the token

    def get(self, path: str) -> str:
        for fresh in (False, True):  # a refusal may be an expired token: one new one, once
            with self._lock:
                if self._token is None or fresh:
                    self._token = self._new_token()
                token = self._token
            headers = {"X-aliyun-ecs-metadata-token": token} if token else {}
            try:
                return self._request("GET", path, headers)
            except _Refused:
                continue
        raise ConfigError(
            f"the ECS metadata server at {self.base} refused /{path}; check the instance's "
            "metadata access mode"
        )

    def _new_token(self) -> str:
        ttl = {"X-aliyun-ecs-metadata-token-ttl-seconds": str(METADATA_TOKEN_TTL)}
        try:
            return self._request("PUT", "latest/api/token", ttl)
        except (_Refused, ConfigError):
            return ""  # a server without tokens: plain GETs

    def _request(self, method: str, path: str, headers: dict[str, str]) -> str:
        url = f"{self.base}/{path}"
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self._timeout) as answer:
                return str(answer.read(65536).decode("utf-8", "replace").strip())
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403) and method == "GET":
                raise _Refused from None
            raise ConfigError(
                f"the ECS metadata server at {self.base} answered {exc.code} to {method} "
                f"/{path}; is this an ECS instance in a VPC?"
            ) from None
        except (OSError, ValueError) as exc:
            why = getattr(exc, "reason", exc)
            raise ConfigError(
                f"cannot reach the ECS metadata server at {self.base} ({why}); on ECS allow "
                f"access to it; elsewhere set {METADATA_ENV}"
            ) from None


class _Refused(Exception):
    pass


def discover(metadata: Metadata) -> NodeIdentity:
    md = "latest/meta-data/"
    identity = NodeIdentity(
        instance_id=metadata.get(f"{md}instance-id"),
        region=metadata.get(f"{md}region-id"),
        vpc_id=metadata.get(f"{md}vpc-id"),
        vswitch_id=metadata.get(f"{md}vswitch-id"),
        private_ip=metadata.get(f"{md}private-ipv4"),
    )
    if not INSTANCE_ID.fullmatch(identity.instance_id) or not _REGION.fullmatch(identity.region):
        raise ConfigError(
            f"the ECS metadata server at {metadata.base} gave no usable instance id or region; "
            "is this an ECS instance?"
        )
    return identity


# --- credentials -----------------------------------------------------------------------------


class RamRoleCredentials:
    """The instance's RAM role's STS credentials from the metadata server, renewed before they
    expire. Failures are route errors: the node stays up and its tables retry."""

    def __init__(self, metadata: Metadata, clock: Callable[[], datetime] | None = None) -> None:
        self._metadata = metadata
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._current: _StsCredentials | None = None
        self.role: str | None = None

    def __repr__(self) -> str:
        return f"RamRoleCredentials({self._metadata.base!r}, role={self.role!r})"

    def __call__(self) -> Credentials:
        with self._lock:
            now = self._clock()
            current = self._current
            if current is None or now >= current.renew_at:
                try:
                    current = self._current = self._fetch(now)
                except RouteError:
                    if current is None or now >= current.expires:
                        raise
                    # Still valid for a while: renewal is tried again at the next call.
                    log.info("ali-vpc: RAM role credentials not renewed yet; using the old ones")
            return current.credentials

    def _fetch(self, now: datetime) -> _StsCredentials:
        base = "latest/meta-data/ram/security-credentials/"
        try:
            role = self.role or self._metadata.get(base).split()[0]
            document = json.loads(self._metadata.get(base + role))
        except (ConfigError, IndexError, ValueError) as exc:
            raise Rejected(
                "no AccessKey: Backend.AccessKeyID/AccessKeySecret and "
                "ACCESS_KEY_ID/ACCESS_KEY_SECRET are unset, and the instance's RAM role gave no "
                f"credentials ({_first_line(exc)}); attach a RAM role to the instance or set an "
                "AccessKey"
            ) from None
        self.role = role
        fields = document if isinstance(document, dict) else {}
        key_id, secret, token = (
            fields.get(k) for k in ("AccessKeyId", "AccessKeySecret", "SecurityToken")
        )
        if not (
            isinstance(key_id, str)
            and isinstance(secret, str)
            and isinstance(token, str)
            and key_id
            and secret
            and token
        ):
            raise Transient(f"the RAM role {role} gave incomplete credentials; asking again")
        try:
            stamp = datetime.strptime(str(fields.get("Expiration")), "%Y-%m-%dT%H:%M:%SZ")
            expires = stamp.replace(tzinfo=UTC)
        except ValueError:
            expires = now + 2 * RENEW_MARGIN  # no expiry given: ask again now and then
        renew_at = expires - min(RENEW_MARGIN, max(expires - now, timedelta()) / 2)
        credentials = Credentials(key_id, secret, token, source=f"the RAM role {role}")
        return _StsCredentials(credentials, renew_at, expires)


@dataclass(frozen=True)
class _StsCredentials:
    """STS credentials, when to renew them, and when they stop working."""

    credentials: Credentials
    renew_at: datetime
    expires: datetime


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def credentials_source(
    options: AliVpcOptions, metadata: Callable[[], Metadata]
) -> Callable[[], Credentials]:
    """The config's AccessKey, else the environment's (flannel's names), else the RAM role."""
    if options.access_key_id and options.access_key_secret:
        static = Credentials(options.access_key_id, options.access_key_secret)
        return lambda: static
    key_id = os.environ.get("ACCESS_KEY_ID", "")
    secret = os.environ.get("ACCESS_KEY_SECRET", "")
    if key_id and secret:
        from_env = Credentials(key_id, secret, source="ACCESS_KEY_ID/ACCESS_KEY_SECRET")
        return lambda: from_env
    return RamRoleCredentials(metadata())


# --- what each lease wants -------------------------------------------------------------------


def lease_target(lease: Lease) -> str:
    """The instance a lease's routes go to, from its BackendData (an ali-vpc lease)."""
    data = lease.attrs.backend_data
    if lease.backend_type == BACKEND_TYPE and isinstance(data, dict):
        instance = FoldedObject(data).get("InstanceID")
        if isinstance(instance, str) and INSTANCE_ID.fullmatch(instance):
            return instance
        raise LeaseRefused(
            f"its BackendData.InstanceID {shown(instance)} is not an ECS instance id (i-...)"
        )
    raise LeaseRefused(
        "it names no ECS instance (a lease of flanneld's ali-vpc names only its PublicIP, and "
        "finding the instance would need the ECS API, which cloudroutes does not call); run "
        "cloudroutes on that node"
    )


def lease_routes(lease: Lease, config: NetworkConfig) -> list[Route]:
    return routes_to(lease, config, lease_target)


# --- the backend -----------------------------------------------------------------------------


class AliVpcBackend(CloudBackend):
    backend_type = BACKEND_TYPE

    def __init__(self, ctx: BackendContext) -> None:
        self.options = parse_options(ctx.config, ctx.coordination)
        super().__init__(ctx, self.options.common)
        self._metadata: Metadata | None = None
        self._identity: NodeIdentity | None = None
        self._client: VpcClient | None = None
        # Alibaba refuses concurrent route changes in a VPC: every table of this process (all
        # in this node's VPC) writes under this lock.
        self._vpc_lock = threading.Lock()
        self._markers = Markers(self.options.common.cluster_name)

    # --- the node ---------------------------------------------------------------------------

    def metadata(self) -> Metadata:
        with self._lock:
            if self._metadata is None:
                self._metadata = Metadata()
            return self._metadata

    def identity(self) -> NodeIdentity:
        """This instance as the metadata server describes it (asked once)."""
        metadata = self.metadata()
        with self._lock:
            if self._identity is None:
                self._identity = discover(metadata)
            return self._identity

    def prepare(self) -> LeaseAttrs:
        identity = self.identity()
        return self.lease_attrs({"InstanceID": identity.instance_id, "Region": identity.region})

    # --- the VPC API ------------------------------------------------------------------------

    def client(self) -> VpcClient:
        with self._lock:
            client = self._client
        if client is None:
            region = self.identity().region
            client = VpcClient(
                vpc_endpoint(region), region, credentials_source(self.options, self.metadata)
            )
            with self._lock:
                self._client = self._client or client
                client = self._client
        return client

    def route_table_ids(self) -> tuple[str, ...]:
        """The configured tables, else the one table of this VPC's vRouter."""
        if self.options.route_table_ids:
            return self.options.route_table_ids
        from aliyunsdkvpc.request.v20160428.DescribeVpcsRequest import DescribeVpcsRequest
        from aliyunsdkvpc.request.v20160428.DescribeVRoutersRequest import (
            DescribeVRoutersRequest,
        )

        vpc_id = self.identity().vpc_id
        client = self.client()
        vpcs = DescribeVpcsRequest()
        vpcs.set_VpcId(vpc_id)
        found = listed(self._ask(client, "DescribeVpcs", vpcs, vpc_id), "Vpcs", "Vpc")
        router = next((v.get("VRouterId") for v in found if v.get("VpcId") == vpc_id), None)
        if not isinstance(router, str) or not router:
            raise ConfigError(f"VPC {vpc_id} was not found; set Backend.RouteTableIDs")
        routers = DescribeVRoutersRequest()
        routers.set_VRouterId(router)
        answer = self._ask(client, "DescribeVRouters", routers, router)
        tables: list[str] = []
        for found_router in listed(answer, "VRouters", "VRouter"):
            ids = found_router.get("RouteTableIds")
            ids = ids.get("RouteTableId") if isinstance(ids, dict) else None
            if found_router.get("VRouterId") == router and isinstance(ids, list):
                tables += [t for t in ids if isinstance(t, str) and ROUTE_TABLE_ID.fullmatch(t)]
        if len(tables) != 1:
            found_ids = ", ".join(tables) or "none"
            raise ConfigError(
                f"vRouter {router} of {vpc_id} has {len(tables)} route tables ({found_ids}); "
                "list the ones to keep in sync in Backend.RouteTableIDs"
            )
        log.info("ali-vpc: using route table %s (vRouter %s of %s)", tables[0], router, vpc_id)
        return (tables[0],)

    def _ask(self, client: VpcClient, action: str, request: Any, where: str) -> dict[str, Any]:
        try:
            return client.call(request)
        except Exception as exc:
            error = vpc_error(exc, action, where, self.options.policy, client.credential_source)
            raise ConfigError(f"cannot find the route table: {error}") from None

    # --- modes ------------------------------------------------------------------------------

    def lease_routes(self) -> Callable[[Lease], list[Route]]:
        config = self._config
        return lambda lease: lease_routes(lease, config)

    def cloud_table(self, table_id: str, args: TableArgs) -> AliRouteTable:
        return AliRouteTable(
            self.client(),
            table_id,
            policy=self.options.policy,
            vpc_lock=self._vpc_lock,
            markers=self._markers,
            **args,
        )

"""aws-vpc: every lease's subnet routed by the VPC's route tables to its node's network interface.

Options (``Backend`` of the network config, keys matched without regard to case):

- ``RouteTableID``: a route table id or a list of them (flannel's option); each is kept in
  sync. Default: the table associated with this node's subnet, else the VPC's main table.
- ``Mode``: ``node`` (default; each agent writes its own route, one elected agent deletes the
  routes of leases that are gone) or ``cluster`` (one elected process writes every route).
- ``ClusterName``: whose routes these are, for tables shared by clusters (default: the etcd
  prefix).
- ``ResyncPeriod``: seconds between full reads of each table (default 300).
- ``RouteLimit``: the routes-per-table quota, when known (AWS does not say it).

The node learns who it is from the instance metadata service (IMDSv2 only), at
``AWS_EC2_METADATA_SERVICE_ENDPOINT`` when set; EC2 is reached at ``AWS_ENDPOINT_URL_EC2``
when set (boto3 reads it itself), with the SDK's default credential chain (an instance role).
SDK retries are off: the reconciler owns retries and backoff, and throttling reaches it.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from cloudroutes.backend import BackendContext, Coordination
from cloudroutes.config import NetworkConfig
from cloudroutes.errors import ConfigError, LeaseRefused, RouteError
from cloudroutes.jsonfields import FoldedObject
from cloudroutes.lease import NO_IPV4, Lease, LeaseAttrs
from cloudroutes.routes import Route
from providers.aws_route_table import (
    ENI_ID,
    AwsRouteTable,
    EC2Client,
    EniResolver,
    ec2_error,
)
from providers.cloud import (
    CloudBackend,
    CloudOptions,
    TableArgs,
    kept_routes,
    parse_cloud_options,
    route_table_ids,
    routes_to,
    shown,
)

log = logging.getLogger(__name__)

BACKEND_TYPE = "aws-vpc"
POLICY_FILES = {
    "node": "providers/policies/aws-vpc-node.json",
    "cluster": "providers/policies/aws-vpc-controller.json",
}
ROUTE_TABLE_ID = re.compile(r"rtb-[0-9a-f]{8,32}")
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 4.0  # connect + read stay below ELECTION_TTL * (1 - FENCE_FRACTION)
IMDS_DEFAULT = "http://169.254.169.254"
IMDS_TIMEOUT = 2.0
IMDS_TOKEN_TTL = 21600


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwsVpcOptions:
    route_table_ids: tuple[str, ...]  # empty: auto-detect
    common: CloudOptions

    @property
    def mode(self) -> str:
        return self.common.mode

    @property
    def cluster_name(self) -> str:
        return self.common.cluster_name

    @property
    def resync_period(self) -> float:
        return self.common.resync_period

    @property
    def route_limit(self) -> int | None:
        return self.common.route_limit

    @property
    def policy(self) -> str:
        return POLICY_FILES[self.mode]


def parse_options(config: NetworkConfig, coordination: Coordination | None) -> AwsVpcOptions:
    """The backend's options, or one ConfigError naming the option and the fix."""
    tables = route_table_ids(
        config.backend.get("RouteTableID"), "RouteTableID", ROUTE_TABLE_ID, "rtb-0a1b2c3d4e5f60708"
    )
    common = parse_cloud_options(
        config, coordination, limit_hint="the 'Routes per route table' quota, e.g. 50"
    )
    return AwsVpcOptions(tables, common)


# --- instance metadata -----------------------------------------------------------------------


@dataclass(frozen=True)
class NodeIdentity:
    """Who this instance is, from IMDS."""

    instance_id: str
    region: str
    mac: str
    eni_id: str
    subnet_id: str
    vpc_id: str


class Imds:
    """IMDSv2: a token from ``PUT /latest/api/token``, then GETs that carry it."""

    def __init__(self, base: str | None = None, timeout: float = IMDS_TIMEOUT) -> None:
        self.base = base or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS_DEFAULT
        self.base = self.base.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise ConfigError(
                f"AWS_EC2_METADATA_SERVICE_ENDPOINT {shown(self.base)} is not an http:// URL; "
                f"unset it on EC2 (the default is {IMDS_DEFAULT})"
            )
        self._timeout = timeout
        self._token: str | None = None
        # Metadata is link-local: never through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"Imds({self.base!r})"  # never the token

    def get(self, path: str) -> str:
        if self._token is None:
            self._token = self._new_token()
        try:
            return self._request("GET", path, {"X-aws-ec2-metadata-token": self._token})
        except _Unauthorized:
            pass
        # The token expired: one new token, one more try.
        self._token = self._new_token()
        try:
            return self._request("GET", path, {"X-aws-ec2-metadata-token": self._token})
        except _Unauthorized:
            raise ConfigError(
                f"the EC2 instance metadata service at {self.base} refused a fresh IMDSv2 "
                f"token for /{path}; check the instance's metadata options"
            ) from None

    def _new_token(self) -> str:
        ttl = {"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL)}
        return self._request("PUT", "latest/api/token", ttl)

    def _request(self, method: str, path: str, headers: dict[str, str]) -> str:
        url = f"{self.base}/{path}"
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self._timeout) as answer:
                return answer.read(65536).decode("utf-8", "replace").strip()
        except urllib.error.HTTPError as exc:
            if exc.code == 401 and method == "GET":
                raise _Unauthorized from None
            raise ConfigError(
                f"the EC2 instance metadata service at {self.base} answered {exc.code} to "
                f"{method} /{path}; on EC2 enable IMDSv2 (HttpTokens optional or required) "
                "and a hop limit of 2 for containers"
            ) from None
        except (OSError, ValueError) as exc:
            why = getattr(exc, "reason", exc)
            raise ConfigError(
                f"cannot reach the EC2 instance metadata service at {self.base} ({why}); "
                "on EC2 enable IMDSv2 and a hop limit of 2 for containers; elsewhere set "
                "AWS_EC2_METADATA_SERVICE_ENDPOINT"
            ) from None


class _Unauthorized(Exception):
    pass


def discover(imds: Imds, address: str | None) -> NodeIdentity:
    """This instance, and the interface that holds ``address`` (the agent's interface IP;
    the primary interface when None or not found): routes target that ENI."""
    instance_id = imds.get("latest/meta-data/instance-id")
    region = imds.get("latest/meta-data/placement/region")
    mac = imds.get("latest/meta-data/mac")
    macs_path = "latest/meta-data/network/interfaces/macs/"
    if address is not None:
        for line in imds.get(macs_path).split():
            candidate = line.strip("/")
            ips = imds.get(f"{macs_path}{candidate}/local-ipv4s").split()
            if address in ips:
                mac = candidate
                break
    base = f"{macs_path}{mac}/"
    identity = NodeIdentity(
        instance_id=instance_id,
        region=region,
        mac=mac,
        eni_id=imds.get(f"{base}interface-id"),
        subnet_id=imds.get(f"{base}subnet-id"),
        vpc_id=imds.get(f"{base}vpc-id"),
    )
    if not ENI_ID.fullmatch(identity.eni_id) or not identity.region:
        raise ConfigError(
            f"the instance metadata service at {imds.base} gave no usable interface id or "
            "region; is this an EC2 instance in a VPC?"
        )
    return identity


def ec2_client(region: str) -> EC2Client:
    """An EC2 client with SDK retries off and short timeouts; endpoint and credentials as
    the AWS SDKs find them (AWS_ENDPOINT_URL_EC2, the default chain)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        user_agent_extra="cloudroutes",
    )
    return boto3.session.Session(region_name=region).client("ec2", config=config)


# --- what each lease wants -------------------------------------------------------------------


def lease_target(lease: Lease) -> str:
    """Where a lease's routes go: the ENI its BackendData names (an aws-vpc lease), else its
    PublicIP, which the table resolves to the ENI holding it (flanneld's old cloud backends)."""
    data = lease.attrs.backend_data
    if lease.backend_type == BACKEND_TYPE and isinstance(data, dict):
        eni = FoldedObject(data).get("NetworkInterfaceID")
        if isinstance(eni, str) and ENI_ID.fullmatch(eni):
            return eni
        if eni is not None:
            raise LeaseRefused(
                f"its BackendData.NetworkInterfaceID {shown(eni)} is not an ENI id (eni-...)"
            )
    if lease.public_ip != NO_IPV4:
        return str(lease.public_ip)
    raise LeaseRefused("it names neither its network interface nor a PublicIP to route to")


def lease_routes(
    lease: Lease, config: NetworkConfig, note: Callable[[str], None] | None = None
) -> list[Route]:
    """The routes a lease wants in every table. ``note`` hears the addresses to resolve."""

    def target(one: Lease) -> str:
        hop = lease_target(one)
        if note is not None and not hop.startswith("eni-"):
            note(hop)
        return hop

    return routes_to(lease, config, target)


def live_routes(lease: Lease, config: NetworkConfig) -> list[Route]:
    """What the garbage collector keeps for a live lease."""
    return kept_routes(lease, config, lambda one: lease_routes(one, config))


# --- the backend -----------------------------------------------------------------------------


class AwsVpcBackend(CloudBackend):
    backend_type = BACKEND_TYPE

    def __init__(self, ctx: BackendContext) -> None:
        self.options = parse_options(ctx.config, ctx.coordination)
        super().__init__(ctx, self.options.common)
        self._identity: NodeIdentity | None = None
        self._ec2: EC2Client | None = None
        self._resolver: EniResolver | None = None

    # --- the node ---------------------------------------------------------------------------

    def identity(self) -> NodeIdentity:
        """This instance as IMDS describes it (asked once)."""
        with self._lock:
            if self._identity is None:
                self._identity = discover(Imds(), self.address())
            return self._identity

    def prepare(self) -> LeaseAttrs:
        identity = self.identity()
        self._disable_source_dest_check(identity)
        return self.lease_attrs(
            {
                "InstanceID": identity.instance_id,
                "NetworkInterfaceID": identity.eni_id,
                "Region": identity.region,
            }
        )

    def _disable_source_dest_check(self, identity: NodeIdentity) -> None:
        """A node forwards packets for its pods' addresses, which EC2 drops unless the ENI's
        source/destination check is off. Done once per ENI: a restart finds it off and writes
        nothing. A failure only warns."""
        if not self._source_dest_check_on(identity.eni_id):
            return
        try:
            self.ec2().modify_network_interface_attribute(
                NetworkInterfaceId=identity.eni_id, SourceDestCheck={"Value": False}
            )
        except Exception as exc:
            # Only the agent's own role needs this, in either mode: the node policy has it.
            error = ec2_error(
                exc, "ModifyNetworkInterfaceAttribute", identity.eni_id, POLICY_FILES["node"]
            )
            log.warning(
                "could not turn off the source/destination check of %s (%s); pod traffic to "
                "this node is dropped until it is off: grant "
                "ec2:ModifyNetworkInterfaceAttribute or set source_dest_check=false",
                identity.eni_id,
                error,
            )

    def _source_dest_check_on(self, eni: str) -> bool:
        """Whether the check is on (also when it cannot be read: then the write says why)."""
        try:
            answer = self.ec2().describe_network_interfaces(NetworkInterfaceIds=[eni])
            return any(i.get("SourceDestCheck") is not False for i in answer["NetworkInterfaces"])
        except Exception:
            return True

    # --- EC2 ---------------------------------------------------------------------------------

    def region(self) -> str:
        if self._ctx.controller:
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                return region
        return self.identity().region

    def ec2(self) -> EC2Client:
        with self._lock:
            ec2 = self._ec2
        if ec2 is None:
            ec2 = ec2_client(self.region())
            with self._lock:
                self._ec2 = self._ec2 or ec2
                ec2 = self._ec2
        return ec2

    def resolver(self) -> EniResolver:
        ec2 = self.ec2()
        with self._lock:
            if self._resolver is None:
                self._resolver = EniResolver(ec2, self.options.policy)
            return self._resolver

    def route_table_ids(self) -> tuple[str, ...]:
        """The configured tables, else the one of this node's subnet, else the VPC's main."""
        if self.options.route_table_ids:
            return self.options.route_table_ids
        identity = self.identity()
        ec2 = self.ec2()
        for what, filters in (
            (
                f"associated with subnet {identity.subnet_id}",
                [{"Name": "association.subnet-id", "Values": [identity.subnet_id]}],
            ),
            (
                f"main table of {identity.vpc_id}",
                [
                    {"Name": "vpc-id", "Values": [identity.vpc_id]},
                    {"Name": "association.main", "Values": ["true"]},
                ],
            ),
        ):
            try:
                found = ec2.describe_route_tables(Filters=filters).get("RouteTables", [])
            except Exception as exc:
                raise _as_config_error(
                    ec2_error(exc, "DescribeRouteTables", what, self.options.policy)
                ) from None
            ids = [t["RouteTableId"] for t in found if isinstance(t.get("RouteTableId"), str)]
            if ids:
                log.info("aws-vpc: using route table %s (%s)", ids[0], what)
                return (ids[0],)
        raise ConfigError(
            f"main route table not found for {identity.vpc_id}; set Backend.RouteTableID"
        )

    # --- modes ------------------------------------------------------------------------------

    def lease_routes(self) -> Callable[[Lease], list[Route]]:
        resolver = self.resolver()
        config = self._config
        return lambda lease: lease_routes(lease, config, resolver.want)

    def cloud_table(self, table_id: str, args: TableArgs) -> AwsRouteTable:
        return AwsRouteTable(
            self.ec2(),
            table_id,
            policy=self.options.policy,
            resolver=self.resolver(),
            cluster=self.options.cluster_name,
            **args,
        )


def _as_config_error(error: RouteError) -> ConfigError:
    return ConfigError(str(error))

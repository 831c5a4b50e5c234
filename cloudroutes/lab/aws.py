"""A local AWS for the aws-vpc provider's tests, the demo and the benchmarks.

- ``MotoServer``: moto's EC2 in server mode on a free port. The provider talks to it over
  real HTTP with a real boto3 client, exactly as it talks to AWS.
- ``make_vpc``: builds the scenario every test needs (a VPC in 198.18.0.0/16, subnets, the main
  route table and extra ones, instances with ENIs) and returns typed ids, so tests do not
  parse EC2 answers themselves.
- ``ImdsStub``: an IMDSv2-only instance metadata service for one instance. moto's own IMDS is
  static, so an agent that learns "who am I" (instance, ENI, subnet, VPC, region, role
  credentials) from IMDS needs this to see the instance moto created.
- ``AwsLab``: all of it for a cluster of agents, EC2 behind a counting fault proxy
  (cloudroutes.lab.fault_proxy).

Everything listens on 127.0.0.1 unless told to listen inside a network namespace the caller
made, so nothing leaves the machine. moto and boto3 are imported inside the functions that
need them: importing cloudroutes.lab must stay cheap for the host-gw demo and the tests that
never touch AWS.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import socketserver
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cloudroutes.lab.fault_proxy import FaultProxy
from cloudroutes.lab.http_service import LOOPBACK, HttpService, LabCloud, TokenMetadataService

# boto3 clients are built at run time; there is no static type to name without extra stubs.
EC2Client = Any

# Any keys do for moto; real-looking ones would invite copying into a real config.
DUMMY_KEY = "testing"
DEFAULT_REGION = "us-east-1"
# Part of 198.18.0.0/15, the benchmarking range (RFC 2544): never routed on the internet.
VPC_CIDR = "198.18.0.0/16"
# An Amazon Linux AMI from moto's built-in catalogue, known in every region. RunInstances needs
# a known AMI, and looking one up (DescribeImages) costs moto seconds per call.
LAB_AMI = "ami-760aaa0f"


def ec2_client(
    endpoint_url: str,
    region: str = DEFAULT_REGION,
    max_attempts: int | None = None,
    read_timeout: float | None = None,
) -> EC2Client:
    """A boto3 EC2 client for ``endpoint_url`` (moto, or a fault proxy in front of it).

    Keys are dummies passed explicitly, so nothing from the host's environment or ~/.aws is
    used. ``max_attempts=1`` turns botocore's retries off, which tests of a single fault need
    to see the raw error; ``read_timeout`` (seconds) makes a slow answer a timeout.
    """
    import boto3
    from botocore.config import Config

    config = Config()
    if max_attempts:
        config = config.merge(Config(retries={"total_max_attempts": max_attempts}))
    if read_timeout:
        config = config.merge(Config(read_timeout=read_timeout))
    return boto3.client(
        "ec2",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=DUMMY_KEY,
        aws_secret_access_key=DUMMY_KEY,
        config=config,
    )


class MotoServer(HttpService):
    """moto's server in this process, on a free port of ``host`` (in ``netns`` if given).

    All MotoServers in one process share moto's state (it is module-global), so ``reset()``
    clears every one of them; tests start one per module and reset between tests.
    """

    def make_server(self, sock: socket.socket) -> socketserver.BaseServer:
        import logging

        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        # werkzeug logs every request to stderr; a benchmark makes thousands.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        # What moto's ThreadedMotoServer does, but on our socket: it can then be in another
        # namespace, and a bind error is an exception (werkzeug would end the thread instead).
        try:
            app = DomainDispatcherApplication(create_backend_app)
            return make_server(
                self.host,
                0,
                app,
                threaded=True,
                request_handler=MotoRequestHandler,
                fd=sock.fileno(),
            )
        finally:
            sock.close()  # werkzeug holds its own duplicate

    def reset(self) -> None:
        """Forget every resource (VPCs, instances, routes) in every region."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()

    def client(self, region: str = DEFAULT_REGION, max_attempts: int | None = None) -> EC2Client:
        return ec2_client(self.url, region, max_attempts)


@dataclass(frozen=True)
class LabEni:
    """One network interface of an instance: what a route's ENI target and IMDS name."""

    eni_id: str
    mac: str
    private_ip: str
    subnet_id: str
    device_index: int


@dataclass(frozen=True)
class LabInstance:
    """An instance moto runs; ``enis[0]`` is its primary interface."""

    instance_id: str
    name: str
    region: str
    availability_zone: str
    vpc_id: str
    enis: tuple[LabEni, ...]

    @property
    def eni_id(self) -> str:
        return self.enis[0].eni_id

    @property
    def mac(self) -> str:
        return self.enis[0].mac

    @property
    def private_ip(self) -> str:
        return self.enis[0].private_ip

    @property
    def subnet_id(self) -> str:
        return self.enis[0].subnet_id


@dataclass(frozen=True)
class LabVpc:
    """The ids of one test VPC, as ``make_vpc`` built it."""

    vpc_id: str
    cidr: str
    region: str
    subnet_ids: tuple[str, ...]
    main_route_table_id: str
    extra_route_table_ids: tuple[str, ...]
    instances: tuple[LabInstance, ...]

    @property
    def subnet_id(self) -> str:
        return self.subnet_ids[0]

    @property
    def route_table_ids(self) -> tuple[str, ...]:
        return (self.main_route_table_id, *self.extra_route_table_ids)


def make_vpc(
    ec2: EC2Client,
    nodes: int = 3,
    tables: int = 2,
    subnets: int = 1,
    enis_per_node: int = 1,
    name: str = "cloudroutes-lab",
    table_tags: dict[str, str] | None = None,
    private_ips: Sequence[str] | None = None,
) -> LabVpc:
    """Build a VPC with ``subnets`` /20 subnets, ``tables`` route tables and ``nodes`` instances.

    The first table is the VPC's main one (moto creates it with the VPC); the others are new.
    ``table_tags`` go on every table, so a provider that finds its tables by tag finds them.
    Node i runs in subnet i % subnets with a predictable primary address (subnet base + 10 + i),
    so a test can tell nodes apart by IP; ``private_ips`` sets them instead (node i gets the
    i-th, in the subnet that holds it), so the demo's instances have its nodes' underlay
    addresses. ``enis_per_node`` > 1 attaches extra ENIs, which is
    the case where AWS refuses an InstanceId route target and an ENI target is needed.
    Source/dest check is left on, as AWS leaves it: turning it off is the provider's job.
    """
    if nodes < 0 or tables < 1 or not 1 <= subnets <= 16 or not 1 <= enis_per_node <= 4:
        raise ValueError("make_vpc: nodes >= 0, tables >= 1, subnets 1..16, enis_per_node 1..4")
    if 10 + nodes + 1024 * (enis_per_node - 1) >= 4095:
        raise ValueError(f"make_vpc: {nodes} nodes with {enis_per_node} ENIs do not fit a /20")
    subnet_nets = list(ipaddress.ip_network(VPC_CIDR).subnets(new_prefix=20))[:subnets]
    primaries = _primary_ips(subnet_nets, nodes, enis_per_node, private_ips)
    region = ec2.meta.region_name
    zone = f"{region}a"
    vpc_id = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
    ec2.create_tags(Resources=[vpc_id], Tags=[{"Key": "Name", "Value": name}])
    subnet_ids = tuple(
        ec2.create_subnet(VpcId=vpc_id, CidrBlock=str(net), AvailabilityZone=zone)["Subnet"][
            "SubnetId"
        ]
        for net in subnet_nets
    )
    main = ec2.describe_route_tables(
        Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "association.main", "Values": ["true"]},
        ]
    )["RouteTables"][0]["RouteTableId"]
    extra = tuple(
        ec2.create_route_table(VpcId=vpc_id)["RouteTable"]["RouteTableId"]
        for _ in range(tables - 1)
    )
    tags = [{"Key": "Name", "Value": name}]
    tags += [{"Key": k, "Value": v} for k, v in (table_tags or {}).items()]
    ec2.create_tags(Resources=[main, *extra], Tags=tags)

    instances = []
    for i, primary_ip in enumerate(primaries):
        k = next(k for k, net in enumerate(subnet_nets) if primary_ip in net)
        # Extra ENIs: the primary address + 1024 per device, still in the /20.
        ips = [str(primary_ip + 1024 * d) for d in range(enis_per_node)]
        node_name = f"{name}-node{i}"
        run = ec2.run_instances(
            ImageId=LAB_AMI,
            MinCount=1,
            MaxCount=1,
            InstanceType="t3.micro",
            SubnetId=subnet_ids[k],
            PrivateIpAddress=ips[0],
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": node_name}]}
            ],
        )["Instances"][0]
        primary = run["NetworkInterfaces"][0]
        enis = [
            LabEni(
                eni_id=primary["NetworkInterfaceId"],
                mac=primary["MacAddress"],
                private_ip=primary["PrivateIpAddress"],
                subnet_id=subnet_ids[k],
                device_index=0,
            )
        ]
        for d in range(1, enis_per_node):
            eni = ec2.create_network_interface(SubnetId=subnet_ids[k], PrivateIpAddress=ips[d])
            eni_id = eni["NetworkInterface"]["NetworkInterfaceId"]
            ec2.attach_network_interface(
                NetworkInterfaceId=eni_id, InstanceId=run["InstanceId"], DeviceIndex=d
            )
            enis.append(
                LabEni(eni_id, eni["NetworkInterface"]["MacAddress"], ips[d], subnet_ids[k], d)
            )
        instances.append(
            LabInstance(
                instance_id=run["InstanceId"],
                name=node_name,
                region=region,
                availability_zone=zone,
                vpc_id=vpc_id,
                enis=tuple(enis),
            )
        )
    return LabVpc(
        vpc_id=vpc_id,
        cidr=VPC_CIDR,
        region=region,
        subnet_ids=subnet_ids,
        main_route_table_id=main,
        extra_route_table_ids=extra,
        instances=tuple(instances),
    )


def _primary_ips(
    subnets: list[ipaddress.IPv4Network], nodes: int, enis: int, wanted: Sequence[str] | None
) -> list[ipaddress.IPv4Address]:
    if wanted is None:
        return [subnets[i % len(subnets)].network_address + 10 + i for i in range(nodes)]
    ips = [ipaddress.IPv4Address(ip) for ip in wanted]
    if len(ips) != nodes or len(set(ips)) != nodes:
        raise ValueError(f"make_vpc: private_ips must be {nodes} distinct addresses")
    for ip in ips:
        if not any(ip in net and ip + 1024 * (enis - 1) in net for net in subnets):
            where = ", ".join(map(str, subnets))
            raise ValueError(f"make_vpc: {ip} and its {enis - 1} extra ENIs do not fit {where}")
    return ips


@dataclass(frozen=True)
class RoleCredentials:
    """Temporary credentials of the instance's IAM role. The secrets stay out of repr."""

    role: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    token: str = field(repr=False)
    expiration: datetime

    @classmethod
    def fresh(cls, role: str, lifetime: timedelta = timedelta(hours=6)) -> RoleCredentials:
        return cls(
            role=role,
            access_key_id="ASIA" + secrets.token_hex(8).upper(),
            secret_access_key=secrets.token_urlsafe(30),
            token=secrets.token_urlsafe(60),
            expiration=(datetime.now(UTC) + lifetime).replace(microsecond=0),
        )

    def document(self) -> dict[str, str]:
        """The JSON IMDS serves at iam/security-credentials/<role>."""
        stamp = "%Y-%m-%dT%H:%M:%SZ"
        return {
            "Code": "Success",
            "LastUpdated": datetime.now(UTC).strftime(stamp),
            "Type": "AWS-HMAC",
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.token,
            "Expiration": self.expiration.strftime(stamp),
        }


TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TOKEN_TTL = 21600


class ImdsStub(TokenMetadataService):
    """IMDSv2 for one instance, on its own port (one stub per node).

    Only IMDSv2: a GET must carry a token from ``PUT /latest/api/token``, or it gets 401, as
    on an instance with ``HttpTokens=required``. ``hits`` counts token PUTs and GETs per path,
    so a test can assert how often an agent asks; ``expire_tokens()`` makes every token issued
    so far invalid, as a token past its TTL is. The role's credentials expire after
    ``credential_lifetime``; ``rotate_credentials()`` issues new ones, as IMDS does before the
    old ones expire.
    """

    token_header = TOKEN_HEADER
    ttl_header = TTL_HEADER
    max_token_ttl = MAX_TOKEN_TTL

    def __init__(
        self,
        instance: LabInstance,
        role: str = "cloudroutes-node",
        account_id: str = "123456789012",
        host: str = LOOPBACK,
        netns: str | None = None,
        credential_lifetime: timedelta = timedelta(hours=6),
    ) -> None:
        super().__init__(host, netns)
        self.instance = instance
        self.credential_lifetime = credential_lifetime
        self.credentials = RoleCredentials.fresh(role, credential_lifetime)
        self.account_id = account_id

    # -- what the stub serves -------------------------------------------------------------

    def paths(self) -> dict[str, str]:
        """Every path IMDS answers for this instance, and its body."""
        inst = self.instance
        md = "latest/meta-data/"
        macs = f"{md}network/interfaces/macs/"
        out = {
            f"{md}instance-id": inst.instance_id,
            f"{md}mac": inst.mac,
            f"{md}local-ipv4": inst.private_ip,
            f"{md}placement/region": inst.region,
            f"{md}placement/availability-zone": inst.availability_zone,
            macs: "\n".join(f"{e.mac}/" for e in inst.enis),
            f"{md}iam/security-credentials/": self.credentials.role,
            f"{md}iam/security-credentials/{self.credentials.role}": json.dumps(
                self.credentials.document(), indent=2
            ),
            "latest/dynamic/instance-identity/document": json.dumps(
                {
                    "accountId": self.account_id,
                    "architecture": "x86_64",
                    "availabilityZone": inst.availability_zone,
                    "imageId": "ami-00000000",
                    "instanceId": inst.instance_id,
                    "instanceType": "t3.micro",
                    "privateIp": inst.private_ip,
                    "region": inst.region,
                    "version": "2017-09-30",
                },
                indent=2,
            ),
        }
        for eni in inst.enis:
            base = f"{macs}{eni.mac}/"
            out[f"{base}interface-id"] = eni.eni_id
            out[f"{base}subnet-id"] = eni.subnet_id
            out[f"{base}vpc-id"] = inst.vpc_id
            out[f"{base}local-ipv4s"] = eni.private_ip
            out[f"{base}device-number"] = str(eni.device_index)
            out[f"{base}mac"] = eni.mac
        return out

    def rotate_credentials(self) -> RoleCredentials:
        self.credentials = RoleCredentials.fresh(self.credentials.role, self.credential_lifetime)
        return self.credentials


class AwsLab(LabCloud):
    """A whole fake AWS for a cluster of agents: what the demo and the benchmarks start.

    moto listens on loopback, for the lab's own set-up calls (``admin``). The agents reach
    EC2 through a counting ``FaultProxy`` and each has its own ``ImdsStub``; those listen on
    ``host`` inside ``netns`` when given (the demo's "cloud" namespace on its switch), else on
    loopback. The proxy forwards to the loopback moto from this process, so nodes never reach
    moto except through it, and every call they make is counted.
    """

    def __init__(
        self,
        node_ips: Sequence[str],
        *,
        region: str = DEFAULT_REGION,
        tables: int = 2,
        host: str = LOOPBACK,
        netns: str | None = None,
        seed: int = 0,
    ) -> None:
        self.node_ips = list(node_ips)
        self.region = region
        self.tables = tables
        self.host = host
        self.netns = netns
        self.seed = seed
        self.moto = MotoServer()
        self.proxy: FaultProxy | None = None
        self.stubs: list[ImdsStub] = []
        self.vpc: LabVpc | None = None

    def _start(self, started: ExitStack) -> None:
        started.enter_context(self.moto)
        self.vpc = make_vpc(
            self.admin(), nodes=len(self.node_ips), tables=self.tables, private_ips=self.node_ips
        )
        proxy = FaultProxy(self.moto.url, seed=self.seed, host=self.host, netns=self.netns)
        self.proxy = started.enter_context(proxy)
        for instance in self.vpc.instances:
            stub = ImdsStub(instance, host=self.host, netns=self.netns)
            self.stubs.append(started.enter_context(stub))

    def admin(self) -> EC2Client:
        """A client straight to moto (not counted, no faults): for set-up and for checks."""
        return self.moto.client(self.region)

    def node_env(self, i: int, base: dict[str, str]) -> dict[str, str]:
        """The environment for node i's agent: ``base`` without any AWS_* variable (nothing
        from the host may reach the SDK), plus the IMDS and EC2 endpoints of this lab.
        Credentials and region then come from IMDS, as on an instance."""
        assert self.proxy is not None, "AwsLab.start() first"
        env = {k: v for k, v in base.items() if not k.startswith("AWS_")}
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = self.stubs[i].url
        env["AWS_ENDPOINT_URL_EC2"] = self.proxy.url
        # Nor may the host's ~/.aws files.
        env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        return env

    def _forget(self) -> None:
        self.stubs.clear()
        self.proxy = None

"""The local AWS lab: moto over HTTP, the scenario builder, and the IMDSv2 stub.

The aws-vpc provider's tests trust this lab, so it is checked with the real clients: boto3
against moto, and botocore's own IMDS code against the stub.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from cloudroutes.lab.aws import (
    TOKEN_HEADER,
    TTL_HEADER,
    AwsLab,
    EC2Client,
    ImdsStub,
    LabVpc,
    MotoServer,
    make_vpc,
)
from tests.cloud_harness import CLOUD_HOST, NODE_IP, CloudNetwork
from tests.conftest import needs_root


@pytest.fixture
def ec2(moto: MotoServer) -> EC2Client:
    moto.reset()
    return moto.client(region="eu-west-1")


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={TOKEN_HEADER: token} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        err.close()
        return err.code, ""


def _token(stub: ImdsStub, ttl: str = "60") -> str:
    request = urllib.request.Request(
        f"{stub.url}/latest/api/token", method="PUT", headers={TTL_HEADER: ttl}
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        return answer.read().decode()


# -- moto and make_vpc -------------------------------------------------------------------


def test_make_vpc_builds_what_it_returns(ec2) -> None:
    lab = make_vpc(ec2, nodes=3, tables=2, table_tags={"cloudroutes.io/cluster": "c1"})

    assert ec2.describe_vpcs(VpcIds=[lab.vpc_id])["Vpcs"][0]["CidrBlock"] == "198.18.0.0/16"
    subnet = ec2.describe_subnets(SubnetIds=[lab.subnet_id])["Subnets"][0]
    assert subnet["VpcId"] == lab.vpc_id

    tables = {
        t["RouteTableId"]: t
        for t in ec2.describe_route_tables(
            Filters=[{"Name": "tag:cloudroutes.io/cluster", "Values": ["c1"]}]
        )["RouteTables"]
    }
    assert set(tables) == set(lab.route_table_ids) and len(tables) == 2
    assert any(a.get("Main") for a in tables[lab.main_route_table_id]["Associations"])
    assert not any(a.get("Main") for a in tables[lab.extra_route_table_ids[0]]["Associations"])

    reservations = ec2.describe_instances(InstanceIds=[i.instance_id for i in lab.instances])[
        "Reservations"
    ]
    by_id = {i["InstanceId"]: i for r in reservations for i in r["Instances"]}
    ips = []
    for node in lab.instances:
        seen = by_id[node.instance_id]
        eni = seen["NetworkInterfaces"][0]
        assert (eni["NetworkInterfaceId"], eni["MacAddress"], eni["PrivateIpAddress"]) == (
            node.eni_id,
            node.mac,
            node.private_ip,
        )
        assert seen["SubnetId"] == node.subnet_id == lab.subnet_id
        assert node.region == "eu-west-1" and node.vpc_id == lab.vpc_id
        ips.append(ipaddress.ip_address(node.private_ip))
    assert all(ip in ipaddress.ip_network("198.18.0.0/15") for ip in ips)
    assert len(set(ips)) == 3


def test_routes_can_target_the_built_instances_and_enis(ec2) -> None:
    lab = make_vpc(ec2, nodes=2, tables=2)
    a, b = lab.instances
    table = lab.extra_route_table_ids[0]
    ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.5.1.0/24", InstanceId=a.instance_id
    )
    ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.5.2.0/24", NetworkInterfaceId=b.eni_id
    )

    routes = ec2.describe_route_tables(RouteTableIds=[table])["RouteTables"][0]["Routes"]
    targets = {
        r["DestinationCidrBlock"]: r.get("InstanceId") or r.get("NetworkInterfaceId")
        for r in routes
    }
    assert targets["10.5.1.0/24"] == a.instance_id
    assert targets["10.5.2.0/24"] == b.eni_id


def test_extra_enis_and_subnets(ec2) -> None:
    lab = make_vpc(ec2, nodes=2, tables=1, subnets=2, enis_per_node=2)
    assert lab.extra_route_table_ids == ()
    assert len(set(lab.subnet_ids)) == 2
    assert [n.subnet_id for n in lab.instances] == list(lab.subnet_ids)
    for node in lab.instances:
        enis = ec2.describe_network_interfaces(
            Filters=[{"Name": "attachment.instance-id", "Values": [node.instance_id]}]
        )["NetworkInterfaces"]
        assert {e["NetworkInterfaceId"] for e in enis} == {e.eni_id for e in node.enis}
        assert len({e.private_ip for e in node.enis}) == 2


def test_reset_forgets_everything(moto: MotoServer, ec2) -> None:
    lab = make_vpc(ec2, nodes=1, tables=1)
    moto.reset()
    vpc_ids = {v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"]}
    assert lab.vpc_id not in vpc_ids


def test_make_vpc_refuses_what_does_not_fit(ec2) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        make_vpc(ec2, nodes=3100, enis_per_node=2)
    with pytest.raises(ValueError, match="do not fit"):
        make_vpc(ec2, nodes=1, private_ips=["10.0.0.1"])
    with pytest.raises(ValueError, match="2 distinct"):
        make_vpc(ec2, nodes=2, private_ips=["198.18.0.1", "198.18.0.1"])


def test_make_vpc_gives_nodes_the_addresses_asked_for(ec2) -> None:
    lab = make_vpc(
        ec2, nodes=2, subnets=2, enis_per_node=2, private_ips=["198.18.0.1", "198.18.16.7"]
    )
    assert [n.private_ip for n in lab.instances] == ["198.18.0.1", "198.18.16.7"]
    assert [n.subnet_id for n in lab.instances] == list(lab.subnet_ids)
    assert lab.instances[1].enis[1].private_ip == "198.18.20.7"


# -- the IMDSv2 stub ---------------------------------------------------------------------


@pytest.fixture
def lab(ec2) -> LabVpc:
    return make_vpc(ec2, nodes=2, tables=2)


@pytest.fixture
def stub(lab: LabVpc) -> Iterator[ImdsStub]:
    with ImdsStub(lab.instances[1]) as server:
        yield server


def test_stub_serves_the_instance_moto_created(lab: LabVpc, stub: ImdsStub) -> None:
    node = lab.instances[1]
    token = _token(stub)
    md = f"{stub.url}/latest/meta-data"
    macs = f"{md}/network/interfaces/macs"
    expected = {
        f"{md}/instance-id": node.instance_id,
        f"{md}/mac": node.mac,
        f"{md}/local-ipv4": node.private_ip,
        f"{md}/placement/region": "eu-west-1",
        f"{md}/placement/availability-zone": "eu-west-1a",
        f"{macs}/": f"{node.mac}/",
        f"{macs}/{node.mac}/interface-id": node.eni_id,
        f"{macs}/{node.mac}/subnet-id": lab.subnet_id,
        f"{macs}/{node.mac}/vpc-id": lab.vpc_id,
        f"{macs}/{node.mac}/local-ipv4s": node.private_ip,
        f"{md}/iam/security-credentials/": "cloudroutes-node",
    }
    for url, body in expected.items():
        assert _get(url, token) == (200, body), url

    status, doc = _get(f"{stub.url}/latest/dynamic/instance-identity/document", token)
    assert status == 200
    assert json.loads(doc)["instanceId"] == node.instance_id
    assert json.loads(doc)["region"] == "eu-west-1"

    status, creds = _get(f"{md}/iam/security-credentials/cloudroutes-node", token)
    assert json.loads(creds)["Code"] == "Success"
    assert json.loads(creds)["AccessKeyId"] == stub.credentials.access_key_id


def test_stub_is_imdsv2_only(stub: ImdsStub) -> None:
    url = f"{stub.url}/latest/meta-data/instance-id"
    assert _get(url)[0] == 401  # IMDSv1: no token
    assert _get(url, "not-a-token")[0] == 401
    token = _token(stub)
    assert _get(url, token)[0] == 200
    stub.expire_tokens()
    assert _get(url, token)[0] == 401
    assert _get(f"{stub.url}/latest/meta-data/no-such-thing", _token(stub))[0] == 404

    for bad_ttl in ("", "0", "21601", "soon"):
        with pytest.raises(urllib.error.HTTPError) as err:
            _token(stub, bad_ttl)
        err.value.close()
        assert err.value.code == 400


def test_rotated_credentials_reach_botocore(clean_aws_env: None, lab: LabVpc) -> None:
    from botocore.utils import InstanceMetadataFetcher

    with ImdsStub(lab.instances[0], credential_lifetime=timedelta(minutes=30)) as stub:
        fetcher = InstanceMetadataFetcher(
            timeout=2, num_attempts=1, config={"ec2_metadata_service_endpoint": stub.url}
        )
        first = fetcher.retrieve_iam_role_credentials()
        expiry = datetime.strptime(first["expiry_time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert timedelta(minutes=29) < expiry - datetime.now(UTC) <= timedelta(minutes=30)

        new = stub.rotate_credentials()
        second = fetcher.retrieve_iam_role_credentials()
        assert (second["access_key"], second["token"]) == (new.access_key_id, new.token)
        assert second["access_key"] != first["access_key"]
        assert stub.hits["latest/api/token"] == 2


def test_credentials_stay_out_of_repr(stub: ImdsStub) -> None:
    text = repr(stub.credentials)
    assert stub.credentials.secret_access_key not in text
    assert stub.credentials.token not in text


def test_botocore_imds_client_reads_role_credentials(clean_aws_env: None, stub: ImdsStub) -> None:
    from botocore.utils import InstanceMetadataFetcher

    fetcher = InstanceMetadataFetcher(
        timeout=2, num_attempts=1, config={"ec2_metadata_service_endpoint": stub.url}
    )
    creds = fetcher.retrieve_iam_role_credentials()
    assert creds["role_name"] == "cloudroutes-node"
    assert creds["access_key"] == stub.credentials.access_key_id
    assert creds["secret_key"] == stub.credentials.secret_access_key
    assert creds["token"] == stub.credentials.token


def test_boto3_with_no_keys_gets_role_credentials_from_imds_and_calls_moto(
    clean_aws_env: None,
    monkeypatch: pytest.MonkeyPatch,
    moto: MotoServer,
    lab: LabVpc,
    stub: ImdsStub,
) -> None:
    import boto3

    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", stub.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto.url)
    session = boto3.Session(region_name="eu-west-1")
    ec2 = session.client("ec2")

    reservations = ec2.describe_instances(InstanceIds=[stub.instance.instance_id])["Reservations"]
    assert reservations[0]["Instances"][0]["PrivateIpAddress"] == stub.instance.private_ip
    creds = session.get_credentials()
    assert creds.method == "iam-role"
    assert creds.access_key == stub.credentials.access_key_id
    assert stub.hits["latest/meta-data/iam/security-credentials/cloudroutes-node"] >= 1


# What a node's agent does: boto3 with no keys, the region from IMDS, endpoints from the
# environment.
_NODE_CLIENT = """
import json, os, sys, boto3
from botocore.utils import InstanceMetadataRegionFetcher
imds = {"ec2_metadata_service_endpoint": os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"]}
session = boto3.Session(region_name=InstanceMetadataRegionFetcher(config=imds).retrieve_region())
ec2 = session.client("ec2")
found = ec2.describe_instances(Filters=[{"Name": "private-ip-address", "Values": [sys.argv[1]]}])
instance = found["Reservations"][0]["Instances"][0]
print(json.dumps({"id": instance["InstanceId"], "creds": session.get_credentials().method,
                  "region": session.region_name}))
"""


def _node_sees(run: Callable[..., subprocess.CompletedProcess[str]], ip: str) -> dict[str, str]:
    result = run(sys.executable, "-c", _NODE_CLIENT, ip)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_aws_lab_gives_each_node_its_identity_and_counts_its_calls() -> None:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAFROMTHEHOST", "AWS_REGION": "us-west-2"}
    with AwsLab(["198.18.0.1", "198.18.0.2"], region="eu-west-1") as lab:
        assert lab.vpc is not None and lab.proxy is not None

        def run(*cmd: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(cmd, env=lab.node_env(1, env), capture_output=True, text=True)

        seen = _node_sees(run, "198.18.0.2")
        assert seen == {
            "id": lab.vpc.instances[1].instance_id,
            "creds": "iam-role",
            "region": "eu-west-1",
        }
        assert lab.proxy.counts().by_action == {"DescribeInstances": 1}
        assert lab.stubs[1].hits["latest/meta-data/iam/security-credentials/cloudroutes-node"] >= 1
        assert not lab.stubs[0].hits


@needs_root
@pytest.mark.root
def test_a_node_namespace_reaches_the_aws_lab_in_a_cloud_namespace(
    cloud_network: CloudNetwork,
) -> None:
    node = cloud_network.node
    with AwsLab([NODE_IP], host=CLOUD_HOST, netns=cloud_network.cloud.name) as lab:
        assert lab.vpc is not None and lab.proxy is not None
        assert lab.proxy.url.startswith(f"http://{CLOUD_HOST}:")

        def run(*cmd: str) -> subprocess.CompletedProcess[str]:
            env = lab.node_env(0, dict(os.environ))
            return subprocess.run(
                ["ip", "netns", "exec", node.name, *cmd], env=env, capture_output=True, text=True
            )

        seen = _node_sees(run, NODE_IP)
        assert seen["id"] == lab.vpc.instances[0].instance_id
        assert seen["creds"] == "iam-role"
        assert lab.proxy.counts()["DescribeInstances"] == 1


def test_importing_the_lab_does_not_load_the_aws_sdks() -> None:
    """The host-gw demo imports the lab too; it must not pay for (or need) moto and boto3."""
    script = (
        "import sys, cloudroutes.lab.aws, cloudroutes.lab.fault_proxy; "
        "print(sorted({'moto', 'boto3', 'botocore', 'werkzeug'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr


@pytest.mark.filterwarnings("ignore:A test tried to use socket:UserWarning")
def test_off_loopback_connections_are_blocked() -> None:
    """The guard the whole suite relies on: an unconfigured SDK cannot reach real AWS IMDS."""
    from pytest_socket import SocketConnectBlockedError

    with pytest.raises(SocketConnectBlockedError):
        socket.create_connection(("169.254.169.254", 80), timeout=1)

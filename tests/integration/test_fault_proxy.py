"""The fault proxy, driven by real boto3 against moto: each fault surfaces in botocore exactly
as the same failure from AWS would, and the call counts are exact."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

from cloudroutes.lab.aws import EC2Client, ImdsStub, LabVpc, MotoServer, ec2_client, make_vpc
from cloudroutes.lab.fault_proxy import (
    HTTP,
    Blackhole,
    Call,
    CannedError,
    Delay,
    DropAfterForward,
    Fault,
    FaultProxy,
    Proceed,
    Reply,
    RouteLimit,
    ServerError,
    Throttle,
    TokenBucket,
)
from tests.wait import wait_for


@pytest.fixture
def direct(moto: MotoServer) -> EC2Client:
    """A client straight to moto: what is really there, past the proxy's lies."""
    moto.reset()
    return moto.client()


@pytest.fixture
def lab(direct: EC2Client) -> LabVpc:
    return make_vpc(direct, nodes=2, tables=2)


@pytest.fixture
def proxy(moto: MotoServer, direct: EC2Client) -> Iterator[FaultProxy]:
    with FaultProxy(moto.url) as server:
        yield server


@pytest.fixture
def ec2(proxy: FaultProxy) -> EC2Client:
    """Through the proxy, retries off: each call is one request, each fault one error."""
    return ec2_client(proxy.url, max_attempts=1)


def _code(err: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    response = err.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def _destinations(client, table: str) -> dict[str, dict]:
    routes = client.describe_route_tables(RouteTableIds=[table])["RouteTables"][0]["Routes"]
    return {r["DestinationCidrBlock"]: r for r in routes}


def test_calls_pass_through_and_are_counted_per_action(proxy: FaultProxy, ec2, direct) -> None:
    vpc_id = ec2.create_vpc(CidrBlock="198.19.0.0/16")["Vpc"]["VpcId"]
    ec2.describe_vpcs()
    ec2.describe_vpcs(VpcIds=[vpc_id])

    assert vpc_id in {v["VpcId"] for v in direct.describe_vpcs()["Vpcs"]}
    counts = proxy.counts()
    assert dict(counts.by_action) == {"CreateVpc": 1, "DescribeVpcs": 2}
    assert (counts.reads, counts.writes, counts.total) == (2, 1, 3)
    assert counts["CreateRoute"] == 0
    assert proxy.history() == ["CreateVpc", "DescribeVpcs", "DescribeVpcs"]

    proxy.reset_counts()
    assert proxy.counts().total == 0
    assert proxy.history() == []


def test_counts_are_exact_under_concurrent_clients(proxy: FaultProxy) -> None:
    def describe(_: int) -> None:
        client = ec2_client(proxy.url, max_attempts=1)
        for _ in range(10):
            client.describe_vpcs()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(describe, range(8)))
    assert proxy.counts()["DescribeVpcs"] == 80


def test_throttle_is_ec2s_request_limit_exceeded_on_the_chosen_action(
    proxy: FaultProxy, ec2, direct, lab: LabVpc
) -> None:
    table, node = lab.extra_route_table_ids[0], lab.instances[0]
    throttle = proxy.add(Throttle(actions={"CreateRoute"}, times=1))

    ec2.describe_route_tables(RouteTableIds=[table])  # another action: untouched
    with pytest.raises(ClientError) as err:
        ec2.create_route(
            RouteTableId=table, DestinationCidrBlock="10.5.1.0/24", InstanceId=node.instance_id
        )
    assert _code(err) == ("RequestLimitExceeded", 503)
    assert "10.5.1.0/24" not in _destinations(direct, table)

    ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.5.1.0/24", InstanceId=node.instance_id
    )
    assert "10.5.1.0/24" in _destinations(direct, table)
    assert throttle.fired == 1
    assert proxy.counts()["CreateRoute"] == 2


def test_botocore_retries_through_throttling_and_every_attempt_counts(
    proxy: FaultProxy, direct, lab: LabVpc
) -> None:
    table, node = lab.extra_route_table_ids[0], lab.instances[0]
    proxy.add(Throttle(actions={"CreateRoute"}, times=2))
    retrying = ec2_client(proxy.url, max_attempts=3)

    retrying.create_route(
        RouteTableId=table, DestinationCidrBlock="10.5.1.0/24", InstanceId=node.instance_id
    )
    assert "10.5.1.0/24" in _destinations(direct, table)
    assert proxy.counts()["CreateRoute"] == 3


def test_token_bucket_throttles_reads_once_empty_and_refills(proxy: FaultProxy, ec2) -> None:
    reads = proxy.add(TokenBucket(kind="read", capacity=3, rate=0))
    outcomes = []
    for _ in range(5):
        try:
            ec2.describe_vpcs()
            outcomes.append("ok")
        except ClientError as err:
            outcomes.append(err.response["Error"]["Code"])
    assert outcomes == ["ok", "ok", "ok", "RequestLimitExceeded", "RequestLimitExceeded"]
    ec2.create_vpc(CidrBlock="198.19.0.0/16")  # writes have their own bucket
    assert reads.fired == 2

    reads.rate = 20.0  # refilled at 20 a second, a call soon gets through again

    def answered() -> bool:
        try:
            ec2.describe_vpcs()
            return True
        except ClientError:
            return False

    wait_for(answered, timeout=5, what="a token to come back")


def test_route_limit_refuses_creates_into_a_full_table_until_raised(
    proxy: FaultProxy, ec2, direct, lab: LabVpc
) -> None:
    table, other = lab.extra_route_table_ids[0], lab.main_route_table_id
    node = lab.instances[0]
    limit = proxy.add(RouteLimit(limit=2))
    for i in (1, 2):
        ec2.create_route(
            RouteTableId=table, DestinationCidrBlock=f"10.5.{i}.0/24", InstanceId=node.instance_id
        )

    with pytest.raises(ClientError) as err:
        ec2.create_route(
            RouteTableId=table, DestinationCidrBlock="10.5.3.0/24", InstanceId=node.instance_id
        )
    assert _code(err) == ("RouteLimitExceeded", 400)
    assert set(_destinations(direct, table)) == {lab.cidr, "10.5.1.0/24", "10.5.2.0/24"}

    # A duplicate into a full table is AWS's RouteAlreadyExists, not the quota.
    with pytest.raises(ClientError) as err:
        ec2.create_route(
            RouteTableId=table, DestinationCidrBlock="10.5.1.0/24", InstanceId=node.instance_id
        )
    assert _code(err)[0] == "RouteAlreadyExists"

    # Each table has its own quota.
    ec2.create_route(
        RouteTableId=other, DestinationCidrBlock="10.5.3.0/24", InstanceId=node.instance_id
    )

    # A delete frees room; so does a raised quota.
    ec2.delete_route(RouteTableId=table, DestinationCidrBlock="10.5.2.0/24")
    ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.5.3.0/24", InstanceId=node.instance_id
    )
    limit.limit = 3
    ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.5.4.0/24", InstanceId=node.instance_id
    )
    assert limit.fired == 1
    # The proxy's own look-ups are not client calls.
    assert proxy.counts()["DescribeRouteTables"] == 0


def test_route_limit_counts_ipv4_and_ipv6_routes_separately(
    proxy: FaultProxy, ec2, direct, lab: LabVpc
) -> None:
    table, node = lab.extra_route_table_ids[0], lab.instances[0]
    limit = proxy.add(RouteLimit(limit=1))
    ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.5.1.0/24", InstanceId=node.instance_id
    )
    ec2.create_route(
        RouteTableId=table, DestinationIpv6CidrBlock="fc00:0:0:1::/64", InstanceId=node.instance_id
    )

    with pytest.raises(ClientError) as err:
        ec2.create_route(
            RouteTableId=table,
            DestinationIpv6CidrBlock="fc00:0:0:2::/64",
            InstanceId=node.instance_id,
        )
    assert _code(err) == ("RouteLimitExceeded", 400)
    with pytest.raises(ClientError) as err:
        ec2.create_route(
            RouteTableId=table, DestinationCidrBlock="10.5.2.0/24", InstanceId=node.instance_id
        )
    assert _code(err) == ("RouteLimitExceeded", 400)
    assert limit.fired == 2


def test_route_limit_holds_under_concurrent_creates(proxy: FaultProxy, direct, lab: LabVpc) -> None:
    table, node = lab.extra_route_table_ids[0], lab.instances[0]
    proxy.add(RouteLimit(limit=3))

    def create(i: int) -> str:
        client = ec2_client(proxy.url, max_attempts=1)
        try:
            client.create_route(
                RouteTableId=table,
                DestinationCidrBlock=f"10.6.{i}.0/24",
                InstanceId=node.instance_id,
            )
            return "created"
        except ClientError as err:
            return err.response["Error"]["Code"]

    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(create, range(8)))
    assert outcomes == ["RouteLimitExceeded"] * 5 + ["created"] * 3
    assert len(_destinations(direct, table)) == 1 + 3


@pytest.mark.parametrize(("status", "code"), [(500, "InternalError"), (503, "Unavailable")])
def test_server_errors_are_5xx_in_ec2s_format(
    proxy: FaultProxy, ec2, status: int, code: str
) -> None:
    proxy.add(ServerError(status=status, times=1))
    with pytest.raises(ClientError) as err:
        ec2.describe_vpcs()
    assert _code(err) == (code, status)
    ec2.describe_vpcs()


def test_canned_error_on_one_action(proxy: FaultProxy, ec2, direct, lab: LabVpc) -> None:
    table, node = lab.extra_route_table_ids[0], lab.instances[0]
    proxy.add(
        CannedError(
            actions={"CreateRoute"},
            code="UnauthorizedOperation",
            message="You are not authorized to perform this operation.",
            status=403,
        )
    )
    with pytest.raises(ClientError) as err:
        ec2.create_route(
            RouteTableId=table, DestinationCidrBlock="10.5.1.0/24", InstanceId=node.instance_id
        )
    assert _code(err) == ("UnauthorizedOperation", 403)
    assert "not authorized" in str(err.value)
    assert set(_destinations(ec2, table)) == {lab.cidr}


def test_delay_makes_answers_slow_enough_to_time_out(moto: MotoServer, proxy: FaultProxy) -> None:
    proxy.add(Delay(seconds=0.3, times=1))
    ec2 = ec2_client(proxy.url, max_attempts=1)
    started = time.monotonic()
    ec2.describe_vpcs()
    assert time.monotonic() - started >= 0.3

    proxy.add(Delay(seconds=1.0, times=1))
    impatient = ec2_client(proxy.url, max_attempts=1, read_timeout=0.2)
    with pytest.raises(ReadTimeoutError):
        impatient.describe_vpcs()


def test_drop_after_forward_applies_the_write_but_resets_the_client(
    proxy: FaultProxy, ec2, direct, lab: LabVpc
) -> None:
    table, node = lab.extra_route_table_ids[0], lab.instances[0]
    proxy.add(DropAfterForward(actions={"CreateRoute"}, times=1))
    with pytest.raises(ConnectionClosedError):
        ec2.create_route(
            RouteTableId=table, DestinationCidrBlock="10.5.1.0/24", InstanceId=node.instance_id
        )
    assert "10.5.1.0/24" in _destinations(direct, table)

    # With retries, the SDK's second attempt meets the route its first attempt made.
    proxy.add(DropAfterForward(actions={"CreateRoute"}, times=1))
    retrying = ec2_client(proxy.url, max_attempts=2)
    with pytest.raises(ClientError) as err:
        retrying.create_route(
            RouteTableId=table, DestinationCidrBlock="10.5.2.0/24", InstanceId=node.instance_id
        )
    assert _code(err)[0] == "RouteAlreadyExists"
    assert proxy.counts()["CreateRoute"] == 3


def test_blackhole_shows_routes_to_a_lost_target_as_blackhole(
    proxy: FaultProxy, ec2, direct, lab: LabVpc
) -> None:
    table = lab.extra_route_table_ids[0]
    a, b = lab.instances
    direct.create_route(
        RouteTableId=table, DestinationCidrBlock="10.5.1.0/24", InstanceId=a.instance_id
    )
    direct.create_route(
        RouteTableId=table, DestinationCidrBlock="10.5.2.0/24", NetworkInterfaceId=b.eni_id
    )
    direct.create_route(
        RouteTableId=table, DestinationCidrBlock="10.5.3.0/24", InstanceId=b.instance_id
    )

    hole = proxy.add(Blackhole(targets={a.instance_id, b.eni_id}))
    seen = _destinations(ec2, table)
    assert seen["10.5.1.0/24"]["State"] == "blackhole"
    assert seen["10.5.2.0/24"]["State"] == "blackhole"
    assert seen["10.5.3.0/24"]["State"] == "active"
    assert seen["10.5.1.0/24"]["InstanceId"] == a.instance_id
    assert _destinations(direct, table)["10.5.1.0/24"]["State"] == "active"

    proxy.remove(hole)
    assert _destinations(ec2, table)["10.5.1.0/24"]["State"] == "active"


def test_chancy_faults_replay_with_the_same_seed(moto: MotoServer, direct) -> None:
    def run(seed: int) -> list[bool]:
        with FaultProxy(moto.url, seed=seed) as proxy:
            throttle = proxy.add(Throttle(probability=0.5))
            client = ec2_client(proxy.url, max_attempts=1)
            outcomes = []
            for _ in range(16):
                try:
                    client.describe_vpcs()
                    outcomes.append(True)
                except ClientError:
                    outcomes.append(False)
            assert throttle.fired == outcomes.count(False)
            return outcomes

    first = run(7)
    assert first == run(7)
    assert True in first and False in first


def test_cleared_faults_stop_firing(proxy: FaultProxy, ec2) -> None:
    proxy.add(Throttle())
    proxy.add(ServerError())
    with pytest.raises(ClientError):
        ec2.describe_vpcs()
    proxy.clear()
    ec2.describe_vpcs()


def test_a_broken_fault_is_an_error_the_client_sees(proxy: FaultProxy, ec2) -> None:
    @dataclass(eq=False, kw_only=True)
    class Broken(Fault):
        def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
            raise KeyError("oops")

    proxy.add(Broken(actions={"DescribeVpcs"}))
    with pytest.raises(ClientError) as err:
        ec2.describe_vpcs()
    assert _code(err) == ("FaultProxyError", 500)
    assert "KeyError" in str(err.value)


def test_unreachable_upstream_is_a_502(moto: MotoServer) -> None:
    from cloudroutes.lab.etcd import free_port

    with FaultProxy(f"http://127.0.0.1:{free_port()}") as proxy, pytest.raises(ClientError) as err:
        ec2_client(proxy.url, max_attempts=1).describe_vpcs()
    assert _code(err) == ("BadGateway", 502)


def test_plain_http_dialect_in_front_of_imds(lab: LabVpc) -> None:
    """Any HTTP service can sit behind the proxy: here IMDS, failing once, as seen by
    botocore's own IMDS client (which retries)."""
    from botocore.utils import InstanceMetadataFetcher

    creds_path = "/latest/meta-data/iam/security-credentials/cloudroutes-node"
    with ImdsStub(lab.instances[0]) as imds, FaultProxy(imds.url, HTTP) as proxy:
        proxy.add(ServerError(actions={f"GET {creds_path}"}, times=1))
        fetcher = InstanceMetadataFetcher(
            timeout=2, num_attempts=2, config={"ec2_metadata_service_endpoint": proxy.url}
        )
        creds = fetcher.retrieve_iam_role_credentials()

        assert creds["access_key"] == imds.credentials.access_key_id
        counts = proxy.counts()
    assert dict(counts.by_action) == {
        "PUT /latest/api/token": 1,
        "GET /latest/meta-data/iam/security-credentials/": 1,
        f"GET {creds_path}": 2,
    }
    assert (counts.reads, counts.writes) == (3, 1)

"""The EC2 route table against moto over HTTP, through the fault proxy, with its ledger in a
real etcd: what it reports as ours, what it writes, and how every EC2 failure comes back.

The fixtures here (a moto server, a fault proxy, an AWS environment with nothing from the host)
are also used by the backend's tests in test_aws_vpc.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network, ip_network

import pytest

from cloudroutes.errors import QuotaExceeded, Rejected, RouteConflict, Throttled, Transient
from cloudroutes.lab.aws import EC2Client, LabVpc, MotoServer, ec2_client, make_vpc
from cloudroutes.lab.fault_proxy import (
    Blackhole,
    CannedError,
    DropAfterForward,
    FaultProxy,
    RouteLimit,
    Throttle,
)
from cloudroutes.ledger import Ledger, LedgerEntry
from cloudroutes.reconciler import Gate
from cloudroutes.routes import Action, Change, EntryState, Plan, Route
from cloudroutes.subnet.etcd_client import EtcdClient
from providers.aws_route_table import AwsRouteTable, EniResolver

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CLUSTER = "prod"
NETWORK = IPv4Network("10.5.0.0/16")
NETWORK6 = IPv6Network("fc00::/48")
POLICY = "providers/policies/aws-vpc-node.json"
REGION = "eu-west-1"


# -- fixtures shared with test_aws_vpc.py ---------------------------------------------------


def upstream(moto: MotoServer) -> str:
    """The EC2 API under test: LocalStack when LOCALSTACK_ENDPOINT names one, else moto."""
    localstack = os.environ.get("LOCALSTACK_ENDPOINT")
    if localstack:
        return localstack
    moto.reset()
    return moto.url


@pytest.fixture
def proxy(moto: MotoServer, clean_aws_env: None) -> Iterator[FaultProxy]:
    with FaultProxy(upstream(moto)) as server:
        yield server


@pytest.fixture
def admin(proxy: FaultProxy) -> EC2Client:
    """The test's own EC2 client, straight to the API (not counted, no faults)."""
    return ec2_client(proxy.upstream_url, REGION, max_attempts=1)


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def lab(admin: EC2Client) -> LabVpc:
    return make_vpc(admin, nodes=3, tables=2)


@pytest.fixture
def ec2(proxy: FaultProxy) -> EC2Client:
    """The provider's client: through the proxy, one attempt, as the backend builds it."""
    return ec2_client(proxy.url, REGION, max_attempts=1)


def make_table(
    ec2: EC2Client, etcd_client: EtcdClient, table_id: str, **kw: object
) -> AwsRouteTable:
    return AwsRouteTable(
        ec2,
        table_id,
        ledger=Ledger(etcd_client, PREFIX, CLUSTER, table_id),
        networks=(NETWORK, NETWORK6),
        member="node-0",
        policy=POLICY,
        resolver=EniResolver(ec2, POLICY),
        gate=Gate(),
        cluster=CLUSTER,
        **kw,  # type: ignore[arg-type]
    )


def net(i: int) -> IPv4Network:
    return IPv4Network(f"10.5.{i}.0/24")


def routes_in(admin: EC2Client, table_id: str) -> dict[str, str]:
    """The table as EC2 lists it: destination -> target (or 'blackhole:…')."""
    listing = admin.describe_route_tables(RouteTableIds=[table_id])["RouteTables"][0]["Routes"]
    out = {}
    for r in listing:
        dest = r.get("DestinationCidrBlock") or r.get("DestinationIpv6CidrBlock")
        out[dest] = r.get("NetworkInterfaceId") or r.get("InstanceId") or r.get("GatewayId")
    return out


def add(route: Route) -> Plan:
    return Plan((Change(Action.ADD, route),))


def already_exists_once(proxy: FaultProxy) -> None:
    """AWS's answer to a create over an existing route (moto overwrites an ENI route)."""
    proxy.add(
        CannedError(actions={"CreateRoute"}, code="RouteAlreadyExists", message="exists", times=1)
    )


def writes(proxy: FaultProxy) -> int:
    return proxy.counts().writes


# -- tests ----------------------------------------------------------------------------------


def test_create_observe_delete(
    lab: LabVpc, ec2: EC2Client, admin: EC2Client, proxy: FaultProxy, etcd_client: EtcdClient
) -> None:
    table_id = lab.extra_route_table_ids[0]
    table = make_table(ec2, etcd_client, table_id)
    eni = lab.instances[0].eni_id
    route = Route(net(1), eni, lease_key="10.5.1.0-24")

    [outcome] = table.apply(add(route))
    assert outcome.ok
    assert routes_in(admin, table_id)["10.5.1.0/24"] == eni
    assert proxy.counts()["CreateRoute"] == 1 and writes(proxy) == 1
    ledger = Ledger(etcd_client, PREFIX, CLUSTER, table_id).entries()
    assert ledger[net(1)].target == eni and ledger[net(1)].lease == "10.5.1.0-24"

    proxy.reset_counts()
    seen = table.observe()
    assert seen.owned[net(1)].entry == Route(net(1), eni)
    assert seen.owned[net(1)].state is EntryState.ACTIVE
    assert seen.capacity is None  # AWS does not say its limit; RouteLimit is not set
    assert proxy.counts().by_action == {"DescribeRouteTables": 1}

    [outcome] = table.apply(Plan((Change(Action.DELETE, route, current=route),)))
    assert outcome.ok
    assert "10.5.1.0/24" not in routes_in(admin, table_id)
    assert Ledger(etcd_client, PREFIX, CLUSTER, table_id).entries() == {}
    # Deleting again: EC2 says NotFound, which counts as done (the reconciler's rule).
    [again] = table.apply(Plan((Change(Action.DELETE, route, current=route),)))
    assert type(again.error).__name__ == "RouteNotFound"


def test_only_ledger_routes_inside_the_network_are_ours(
    lab: LabVpc, ec2: EC2Client, admin: EC2Client, proxy: FaultProxy, etcd_client: EtcdClient
) -> None:
    table_id = lab.extra_route_table_ids[0]
    a, b, c = lab.instances
    # An operator's route inside Network, another cluster's route (in its own ledger), a
    # route outside Network, and the local route.
    admin.create_route(
        RouteTableId=table_id, DestinationCidrBlock="10.5.7.0/24", InstanceId=b.instance_id
    )
    admin.create_route(
        RouteTableId=table_id, DestinationCidrBlock="10.5.8.0/24", NetworkInterfaceId=c.eni_id
    )
    Ledger(etcd_client, PREFIX, "other-cluster", table_id).record([LedgerEntry(net(8), c.eni_id)])
    admin.create_route(
        RouteTableId=table_id, DestinationCidrBlock="192.0.2.0/24", NetworkInterfaceId=c.eni_id
    )
    # A ledger entry of ours whose route points elsewhere: not ours (rule 3).
    admin.create_route(
        RouteTableId=table_id, DestinationCidrBlock="10.5.9.0/24", NetworkInterfaceId=b.eni_id
    )
    Ledger(etcd_client, PREFIX, CLUSTER, table_id).record([LedgerEntry(net(9), a.eni_id)])
    before = routes_in(admin, table_id)

    table = make_table(ec2, etcd_client, table_id)
    seen = table.observe()
    assert seen.owned == {}
    assert set(seen.foreign) == {net(7), net(8), net(9)}
    assert seen.foreign[net(9)].entry == Route(net(9), b.eni_id)
    assert f"records {a.eni_id}" in seen.foreign[net(9)].holder
    assert "did not create" in seen.foreign[net(8)].holder
    assert "aws ec2 delete-route" in seen.foreign[net(7)].advice

    # The reconciler never plans a change for them; a delete planned anyway (a stale picture)
    # is answered from the ledger without calling EC2.
    proxy.reset_counts()
    for route in (Route(net(8), c.eni_id), Route(net(9), b.eni_id), Route(net(7), b.instance_id)):
        [outcome] = table.apply(Plan((Change(Action.DELETE, route, current=route),)))
        assert type(outcome.error).__name__ == "RouteNotFound"
    assert proxy.counts()["DeleteRoute"] == 0
    assert routes_in(admin, table_id) == before


def test_identical_unowned_route_is_adopted_without_an_ec2_write(
    lab: LabVpc, ec2: EC2Client, admin: EC2Client, proxy: FaultProxy, etcd_client: EtcdClient
) -> None:
    table_id = lab.extra_route_table_ids[0]
    eni = lab.instances[0].eni_id
    admin.create_route(
        RouteTableId=table_id, DestinationCidrBlock="10.5.1.0/24", NetworkInterfaceId=eni
    )
    table = make_table(ec2, etcd_client, table_id)
    seen = table.observe()
    foreign = seen.foreign[net(1)]
    assert foreign.adoptable and foreign.entry == Route(net(1), eni)

    proxy.reset_counts()
    want = Route(net(1), eni, lease_key="10.5.1.0-24")
    [outcome] = table.apply(Plan((Change(Action.ADOPT, want, current=foreign.entry),)))
    assert outcome.ok
    assert writes(proxy) == 0
    assert Ledger(etcd_client, PREFIX, CLUSTER, table_id).entries()[net(1)].target == eni
    assert table.observe().owned[net(1)].entry == Route(net(1), eni)


def test_route_already_exists_is_checked_against_its_target(
    lab: LabVpc, ec2: EC2Client, admin: EC2Client, proxy: FaultProxy, etcd_client: EtcdClient
) -> None:
    table_id = lab.extra_route_table_ids[0]
    a, b, _ = lab.instances
    table = make_table(ec2, etcd_client, table_id)
    table.observe()
    # Someone else's route appears between the read and the create; AWS refuses the create
    # (moto would overwrite an ENI route, so the proxy says what AWS says).
    admin.create_route(
        RouteTableId=table_id, DestinationCidrBlock="10.5.1.0/24", NetworkInterfaceId=b.eni_id
    )
    already_exists_once(proxy)
    [outcome] = table.apply(add(Route(net(1), a.eni_id, lease_key="10.5.1.0-24")))
    assert isinstance(outcome.error, RouteConflict)
    assert b.eni_id in str(outcome.error)
    assert routes_in(admin, table_id)["10.5.1.0/24"] == b.eni_id
    assert net(1) not in Ledger(etcd_client, PREFIX, CLUSTER, table_id).entries()

    # Ours per the ledger but pointing at the old target: retargeted in place (ReplaceRoute).
    admin.create_route(
        RouteTableId=table_id, DestinationCidrBlock="10.5.2.0/24", NetworkInterfaceId=b.eni_id
    )
    Ledger(etcd_client, PREFIX, CLUSTER, table_id).record([LedgerEntry(net(2), b.eni_id)])
    table.observe()
    already_exists_once(proxy)
    proxy.reset_counts()
    [outcome] = table.apply(add(Route(net(2), a.eni_id, lease_key="10.5.2.0-24")))
    assert outcome.ok
    assert routes_in(admin, table_id)["10.5.2.0/24"] == a.eni_id
    assert proxy.counts()["ReplaceRoute"] == 1 and proxy.counts()["DeleteRoute"] == 0

    # Already there with the right target (a lost answer): done, nothing more written.
    already_exists_once(proxy)
    proxy.reset_counts()
    [outcome] = table.apply(add(Route(net(2), a.eni_id, lease_key="10.5.2.0-24")))
    assert outcome.ok and proxy.counts()["ReplaceRoute"] == 0


def test_blackhole_route_of_ours_is_broken_and_replaced(
    lab: LabVpc, ec2: EC2Client, admin: EC2Client, proxy: FaultProxy, etcd_client: EtcdClient
) -> None:
    table_id = lab.extra_route_table_ids[0]
    a, b, _ = lab.instances
    table = make_table(ec2, etcd_client, table_id)
    table.apply(add(Route(net(1), a.eni_id)))
    hole = proxy.add(Blackhole(targets={a.eni_id}))
    seen = table.observe()
    assert seen.owned[net(1)].state is EntryState.BROKEN

    # The node came back on another interface: the broken route is retargeted in place.
    proxy.remove(hole)
    proxy.reset_counts()
    current = seen.owned[net(1)].entry
    [outcome] = table.apply(
        Plan((Change(Action.REPLACE, Route(net(1), b.eni_id), current=current),))
    )
    assert outcome.ok
    assert proxy.counts()["ReplaceRoute"] == 1 and writes(proxy) == 1
    assert routes_in(admin, table_id)["10.5.1.0/24"] == b.eni_id
    assert Ledger(etcd_client, PREFIX, CLUSTER, table_id).entries()[net(1)].previous_target is None


def test_blackhole_with_the_same_target_is_rewritten(
    lab: LabVpc, ec2: EC2Client, proxy: FaultProxy, etcd_client: EtcdClient
) -> None:
    table_id = lab.extra_route_table_ids[0]
    eni = lab.instances[0].eni_id
    table = make_table(ec2, etcd_client, table_id)
    table.apply(add(Route(net(1), eni)))
    proxy.add(Blackhole(targets={eni}, times=1))
    seen = table.observe()
    assert seen.owned[net(1)].state is EntryState.BROKEN
    proxy.reset_counts()
    route = Route(net(1), eni)
    [outcome] = table.apply(Plan((Change(Action.REPLACE, route, current=route),)))
    assert outcome.ok and proxy.counts()["ReplaceRoute"] == 1


def test_ec2_errors_map_to_route_errors(
    lab: LabVpc, ec2: EC2Client, admin: EC2Client, proxy: FaultProxy, etcd_client: EtcdClient
) -> None:
    table_id = lab.extra_route_table_ids[0]
    eni = lab.instances[0].eni_id
    table = make_table(ec2, etcd_client, table_id)

    proxy.add(Throttle(actions={"CreateRoute"}, times=1))
    [outcome] = table.apply(add(Route(net(1), eni)))
    assert isinstance(outcome.error, Throttled)

    proxy.add(Throttle(actions={"DescribeRouteTables"}, times=1))
    with pytest.raises(Throttled):
        table.observe()

    proxy.add(
        CannedError(
            actions={"CreateRoute"},
            code="UnauthorizedOperation",
            message="You are not authorized. Encoded authorization failure message: SECRETBLOB",
            status=403,
            times=1,
        )
    )
    [outcome] = table.apply(add(Route(net(2), eni)))
    assert isinstance(outcome.error, Rejected)
    text = str(outcome.error)
    assert "ec2:CreateRoute" in text and "providers/policies/aws-vpc-node.json" in text
    assert "SECRETBLOB" not in text and "\n" not in text

    proxy.add(
        CannedError(
            actions={"CreateRoute"}, code="InvalidParameterValue", message="bad\nthing", times=1
        )
    )
    [outcome] = table.apply(add(Route(net(3), eni)))
    assert isinstance(outcome.error, Rejected) and "bad thing" in str(outcome.error)

    proxy.add(DropAfterForward(actions={"CreateRoute"}, times=1))
    proxy.reset_counts()
    [outcome] = table.apply(add(Route(net(4), eni)))
    assert isinstance(outcome.error, Transient)
    # The write was applied: the next read shows it as ours, so nothing is made twice.
    seen = table.observe()
    assert seen.owned[net(4)].entry == Route(net(4), eni)
    assert proxy.counts()["CreateRoute"] == 1
    assert list(routes_in(admin, table_id)).count("10.5.4.0/24") == 1


def test_route_limit_refuses_creates_as_quota_exceeded(
    lab: LabVpc, ec2: EC2Client, admin: EC2Client, proxy: FaultProxy, etcd_client: EtcdClient
) -> None:
    table_id = lab.extra_route_table_ids[0]
    eni = lab.instances[0].eni_id
    for i in range(50):
        admin.create_route(
            RouteTableId=table_id, DestinationCidrBlock=f"192.0.{i}.0/24", NetworkInterfaceId=eni
        )
    limit = proxy.add(RouteLimit(limit=50))
    table = make_table(ec2, etcd_client, table_id, route_limit=50)
    seen = table.observe()
    assert seen.capacity is not None and (seen.capacity.limit, seen.capacity.used) == (50, 50)
    [outcome] = table.apply(add(Route(net(1), eni)))
    assert isinstance(outcome.error, QuotaExceeded)
    assert "RouteLimitExceeded" in str(outcome.error)
    limit.limit = 60  # the quota was raised
    [outcome] = table.apply(add(Route(net(1), eni)))
    assert outcome.ok


def test_ipv6_routes(
    lab: LabVpc, ec2: EC2Client, admin: EC2Client, proxy: FaultProxy, etcd_client: EtcdClient
) -> None:
    table_id = lab.extra_route_table_ids[0]
    eni = lab.instances[0].eni_id
    table = make_table(ec2, etcd_client, table_id)
    six = ip_network("fc00:0:0:1::/64")
    [o4, o6] = table.apply(
        Plan((Change(Action.ADD, Route(net(1), eni)), Change(Action.ADD, Route(six, eni))))
    )
    assert o4.ok and o6.ok
    assert routes_in(admin, table_id)["fc00:0:0:1::/64"] == eni
    seen = table.observe()
    assert seen.owned[six].entry == Route(six, eni)
    route = Route(six, eni)
    [gone] = table.apply(Plan((Change(Action.DELETE, route, current=route),)))
    assert gone.ok and "fc00:0:0:1::/64" not in routes_in(admin, table_id)


def test_node_scope_reports_only_its_own_subnets(
    lab: LabVpc, ec2: EC2Client, proxy: FaultProxy, etcd_client: EtcdClient
) -> None:
    table_id = lab.extra_route_table_ids[0]
    a, b, _ = lab.instances
    writer = make_table(ec2, etcd_client, table_id)
    writer.apply(
        Plan(
            (
                Change(Action.ADD, Route(net(1), a.eni_id)),
                Change(Action.ADD, Route(net(2), b.eni_id)),
            )
        )
    )
    mine = make_table(ec2, etcd_client, table_id, scope=frozenset({net(1)}))
    seen = mine.observe()
    assert set(seen.owned) == {net(1)}
    assert net(2) not in seen.foreign  # another node's route: neither ours nor a conflict


def test_old_flanneld_lease_resolves_its_address_once(
    lab: LabVpc, ec2: EC2Client, admin: EC2Client, proxy: FaultProxy, etcd_client: EtcdClient
) -> None:
    table_id = lab.extra_route_table_ids[0]
    node = lab.instances[1]
    table = make_table(ec2, etcd_client, table_id)
    route = Route(net(2), node.private_ip, lease_key="10.5.2.0-24")
    [outcome] = table.apply(add(route))
    assert outcome.ok
    assert routes_in(admin, table_id)["10.5.2.0/24"] == node.eni_id
    # Reported in the form the lease wants it, so the next pass plans nothing.
    assert table.observe().owned[net(2)].entry == Route(net(2), node.private_ip)
    table.apply(Plan((Change(Action.DELETE, route, current=route),)))
    table.apply(add(route))
    assert proxy.counts()["DescribeNetworkInterfaces"] == 1

"""The aws-vpc backend end to end: real boto3 over HTTP to moto (through the fault proxy), an
IMDSv2 stub per node, the real reconciler, and a real etcd for the ledger and the elections.

Each "node" is a backend built as the agent builds it (its IMDS, its etcd connection, its
lease); the test drives the reconcilers' passes itself, so every EC2 call can be counted.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_network

import pytest

from cloudroutes.backend import ExternalInterface
from cloudroutes.errors import ConfigError
from cloudroutes.lab.aws import EC2Client, ImdsStub, LabVpc, make_vpc
from cloudroutes.lab.etcd import EtcdCluster, free_port
from cloudroutes.lab.fault_proxy import (
    Call,
    CannedError,
    FaultProxy,
    RouteLimit,
    Throttle,
)
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.ledger import Ledger, LedgerEntry
from cloudroutes.reconciler import RouteState
from cloudroutes.subnet.etcd_client import EtcdSettings
from providers import aws_route_table
from providers.aws_vpc import AwsVpcBackend, Imds
from tests import cloud_harness
from tests.cloud_harness import CLUSTER, PREFIX, CloudLab
from tests.integration.test_aws_route_table import REGION, admin, proxy
from tests.wait import wait_for

__all__ = ["admin", "proxy"]  # fixtures, used by name

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

Node = cloud_harness.Node[AwsVpcBackend]


class Lab(CloudLab[AwsVpcBackend]):
    """A VPC in moto, its nodes' IMDS stubs, and the network config every node reads."""

    def __init__(
        self,
        admin: EC2Client,
        proxy: FaultProxy,
        etcd: EtcdCluster,
        monkeypatch: pytest.MonkeyPatch,
        nodes: int = 3,
        enis_per_node: int = 1,
    ) -> None:
        self.admin = admin
        self.vpc: LabVpc = make_vpc(admin, nodes=nodes, tables=2, enis_per_node=enis_per_node)
        self.stubs = [ImdsStub(i).start() for i in self.vpc.instances]
        super().__init__("aws-vpc", proxy, etcd, monkeypatch, servers=self.stubs)
        self.backend_options["RouteTableID"] = list(self.vpc.route_table_ids)
        monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", proxy.url)

    def node(self, i: int, *, six: bool = False, eni: int = 0) -> Node:
        """Node i as its agent starts: IMDS discovery, source/dest check, its lease, bind.
        ``eni``: which of its interfaces the agent uses (--iface)."""
        instance = self.vpc.instances[i]
        self.monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", self.stubs[i].url)
        ip = IPv4Address(instance.enis[eni].private_ip)
        iface = ExternalInterface("eth0", 2, 9001, ip, ip)
        client = self.etcd_client()
        ctx = self.context(f"node-{i}", iface, client)
        backend = AwsVpcBackend(ctx)
        attrs = backend.prepare()
        lease = Lease(
            subnet=IPv4Network(f"10.5.{i + 1}.0/24"),
            attrs=attrs,
            ipv6_subnet=IPv6Network(f"fc00:0:0:{i + 1}::/64") if six else None,
            store_lease_id=100 + i,
        )
        self.put_lease(lease)
        return self.bind(f"node-{i}", instance, backend, lease, client, ctx)

    def controller(self, name: str = "controller-1") -> Node:
        self.monkeypatch.setenv("AWS_REGION", REGION)
        # It runs on an instance of its own, whose role the SDK finds through IMDS.
        self.monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", self.stubs[0].url)
        client = self.etcd_client()
        ctx = self.context(name, None, client)
        return self.bind(name, None, AwsVpcBackend(ctx), None, client, ctx)

    def routes(self, table_id: str) -> dict[str, str]:
        listing = self.admin.describe_route_tables(RouteTableIds=[table_id])["RouteTables"][0]
        return {
            r.get("DestinationCidrBlock") or r.get("DestinationIpv6CidrBlock"): (
                r.get("NetworkInterfaceId") or r.get("GatewayId")
            )
            for r in listing["Routes"]
            if r.get("Origin") == "CreateRoute"
        }

    @property
    def tables(self) -> tuple[str, ...]:
        return self.vpc.route_table_ids


@pytest.fixture
def lab(
    admin: EC2Client, proxy: FaultProxy, etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Lab]:
    # Routes made seconds ago by a node count as the collector's to judge (in production it
    # waits a minute, in case their lease has not reached it yet).
    monkeypatch.setattr(aws_route_table, "LEDGER_GRACE", 0.0)
    with Lab(admin, proxy, etcd, monkeypatch) as made:
        yield made


def expected(lab: Lab, nodes: list[int]) -> dict[str, str]:
    return {f"10.5.{i + 1}.0/24": lab.vpc.instances[i].eni_id for i in nodes}


# -- node mode ------------------------------------------------------------------------------


def test_node_mode_each_node_routes_its_own_subnet_in_every_table(lab: Lab) -> None:
    nodes = [lab.node(i) for i in range(3)]
    # prepare() turned off the source/dest check of each node's ENI and published its identity.
    for node in nodes:
        assert node.instance is not None and node.lease is not None
        eni = lab.admin.describe_network_interfaces(NetworkInterfaceIds=[node.instance.eni_id])
        assert eni["NetworkInterfaces"][0]["SourceDestCheck"] is False
        assert node.lease.attrs.backend_data == {
            "InstanceID": node.instance.instance_id,
            "NetworkInterfaceID": node.instance.eni_id,
            "Region": REGION,
        }
    lab.leader()
    lab.proxy.reset_counts()
    lab.passes()
    want = expected(lab, [0, 1, 2])
    assert lab.all_routes() == {t: want for t in lab.vpc.route_table_ids}
    # Each node wrote only its own route, once per table.
    assert lab.proxy.counts()["CreateRoute"] == 6 and lab.proxy.counts().writes == 6
    for table_id in lab.vpc.route_table_ids:
        ledger = lab.ledger(table_id)
        assert {e.by for e in ledger.values()} == {"node-0", "node-1", "node-2"}
    for node in nodes:
        own = [s for k, s in node.status().items() if "/gc" not in k]
        assert [s["state"] for s in own] == ["programmed", "programmed"]

    # Steady state: a resync reads each table once per reconciler that acts, writes nothing.
    lab.proxy.reset_counts()
    lab.passes()
    active = sum(1 for n in nodes for r in n.reconcilers if r.is_active())
    assert active == 3 * 2 + 2  # every node's table bindings, plus the leader's collectors
    assert lab.proxy.counts().by_action == {"DescribeRouteTables": active}


def test_the_elected_collector_removes_a_dead_nodes_route(lab: Lab) -> None:
    nodes = [lab.node(i) for i in range(3)]
    leader = lab.leader()
    lab.passes()
    # The collector learns of routes other nodes made at its next read of the table.
    leader.passes()
    dead = next(n for n in nodes if n is not leader)
    assert dead.lease is not None
    dead.shutdown()
    lab.nodes.remove(dead)
    lab.drop_lease(dead.lease)

    lab.proxy.reset_counts()
    lab.passes(resync=False)  # the lease event alone: no read, one delete per table
    alive = [nodes.index(n) for n in nodes if n is not dead]
    assert lab.all_routes() == {t: expected(lab, alive) for t in lab.vpc.route_table_ids}
    assert lab.proxy.counts().by_action == {"DeleteRoute": 2}
    for table_id in lab.vpc.route_table_ids:
        ledger = lab.ledger(table_id)
        assert dead.lease.subnet not in ledger


def test_routes_of_leases_that_expired_while_no_agent_ran_are_collected(lab: Lab) -> None:
    first = lab.converged(3)
    gone = first[2].lease
    assert gone is not None
    for node in first:
        node.shutdown()
    lab.nodes.clear()
    # While nothing ran, node 2's lease expired.
    lab.leases.replace_all([n.lease for n in first[:2] if n.lease], revision=50)

    lab.proxy.reset_counts()
    again = [lab.node(i) for i in range(2)]  # the agents restart
    lab.leader()
    lab.passes()
    assert lab.all_routes() == {t: expected(lab, [0, 1]) for t in lab.vpc.route_table_ids}
    # The restart made no write of its own: only the two deletes of the expired lease.
    counts = lab.proxy.counts()
    assert counts["DeleteRoute"] == 2 and counts["CreateRoute"] == 0
    assert counts["ReplaceRoute"] == 0
    assert len(again) == 2


def test_an_agent_restart_writes_nothing(lab: Lab) -> None:
    lab.converged(2)
    lab.restart(2)
    # prepare() finds the source/dest check already off; no route is written.
    assert lab.proxy.counts().writes == 0
    assert lab.all_routes() == {t: expected(lab, [0, 1]) for t in lab.vpc.route_table_ids}


def test_routes_deleted_or_retargeted_by_hand_are_repaired_at_the_next_resync(
    lab: Lab,
) -> None:
    nodes = lab.converged(3)
    table_id = lab.vpc.main_route_table_id
    lab.admin.delete_route(RouteTableId=table_id, DestinationCidrBlock="10.5.1.0/24")
    other = lab.vpc.instances[2].eni_id
    lab.admin.replace_route(
        RouteTableId=table_id, DestinationCidrBlock="10.5.2.0/24", NetworkInterfaceId=other
    )
    lab.proxy.reset_counts()
    mine, second = lab.vpc.instances[0].eni_id, lab.vpc.instances[1].eni_id

    def settled() -> bool:
        # A read that misses a route made within READ_LAG takes it for EC2's read lag, so
        # each node sees the change once its own write is older than that.
        lab.passes()
        routes = lab.routes(table_id)
        return routes.get("10.5.1.0/24") == mine and routes.get("10.5.2.0/24") == second

    wait_for(settled, aws_route_table.READ_LAG + 15, "both routes repaired")
    # The route cloudroutes made and someone pointed elsewhere is still ours (its ledger
    # entry is confirmed): retargeted back in place, not deleted and re-created.
    counts = lab.proxy.counts()
    assert counts["CreateRoute"] == 1 and counts["ReplaceRoute"] == 1 and counts.writes == 2
    assert nodes[1].status()[f"{table_id} 10.5.2.0/24"]["state"] == "programmed"


def test_an_unconfirmed_ledger_entry_does_not_claim_someone_elses_route(lab: Lab) -> None:
    """A process that died between recording a route and creating it leaves an unconfirmed
    entry; a route someone else made there meanwhile is theirs, and is left alone."""
    table_id = lab.vpc.main_route_table_id
    other = lab.vpc.instances[2].eni_id
    lab.admin.create_route(
        RouteTableId=table_id, DestinationCidrBlock="10.5.1.0/24", NetworkInterfaceId=other
    )
    ledger = Ledger(lab.etcd_client(), PREFIX, CLUSTER, table_id)
    mine = lab.vpc.instances[0].eni_id
    ledger.record([LedgerEntry(ip_network("10.5.1.0/24"), mine, "10.5.1.0-24", "node0")])
    node = lab.node(0)
    lab.passes()
    wait_for(
        lambda: node.status().get(f"{table_id} 10.5.1.0/24", {}).get("state") == "failed",
        15,
        "the conflict to be reported",
    )
    assert lab.routes(table_id)["10.5.1.0/24"] == other


def test_one_lease_change_is_one_write_per_table(lab: Lab) -> None:
    nodes = lab.converged(2)
    lab.proxy.reset_counts()
    lab.node(2)
    lab.passes(resync=False)
    assert lab.proxy.counts()["CreateRoute"] == 2
    assert lab.proxy.counts()["ModifyNetworkInterfaceAttribute"] == 1  # the new node's prepare()
    assert lab.proxy.counts().writes == 2 + 1
    assert len(nodes) == 2


def test_an_ipv6_lease_gets_a_route_per_family(lab: Lab) -> None:
    lab.extra = {"EnableIPv6": True, "IPv6Network": "fc00::/48"}
    lab.node(0, six=True)
    lab.leader()
    lab.passes()
    eni = lab.vpc.instances[0].eni_id
    for table_id in lab.vpc.route_table_ids:
        assert lab.routes(table_id) == {"10.5.1.0/24": eni, "fc00:0:0:1::/64": eni}


def test_a_node_switching_from_flanneld_takes_over_its_route_in_place(lab: Lab) -> None:
    eni = lab.vpc.instances[0].eni_id
    for table_id in lab.vpc.route_table_ids:  # flanneld's aws-vpc made these
        lab.admin.create_route(
            RouteTableId=table_id, DestinationCidrBlock="10.5.1.0/24", NetworkInterfaceId=eni
        )
    node = lab.node(0)
    lab.proxy.reset_counts()
    lab.passes()
    assert lab.proxy.counts().writes == 0  # adopted, never deleted and re-added
    for table_id in lab.vpc.route_table_ids:
        assert lab.ledger(table_id)[IPv4Network("10.5.1.0/24")].target == eni
    assert {s["state"] for k, s in node.status().items() if "/gc" not in k} == {"programmed"}


def test_a_multi_interface_node_routes_to_the_interface_the_agent_uses(
    admin: EC2Client, proxy: FaultProxy, etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab(admin, proxy, etcd, monkeypatch, nodes=1, enis_per_node=2)
    try:
        node = lab.node(0, eni=1)
        second = lab.vpc.instances[0].enis[1].eni_id
        assert node.lease is not None
        assert node.lease.attrs.backend_data["NetworkInterfaceID"] == second
        lab.passes()
        for table_id in lab.vpc.route_table_ids:
            assert lab.routes(table_id) == {"10.5.1.0/24": second}
        eni = admin.describe_network_interfaces(NetworkInterfaceIds=[second])
        assert eni["NetworkInterfaces"][0]["SourceDestCheck"] is False
    finally:
        lab.close()


# -- cluster mode ---------------------------------------------------------------------------


def test_cluster_mode_one_leader_writes_every_route(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    nodes = [lab.node(i) for i in range(3)]
    leader = lab.leader()
    lab.proxy.reset_counts()
    lab.passes()
    want = expected(lab, [0, 1, 2])
    assert lab.all_routes() == {t: want for t in lab.vpc.route_table_ids}
    assert lab.proxy.counts()["CreateRoute"] == 6
    # Only the leader read or wrote.
    assert lab.proxy.counts()["DescribeRouteTables"] == 2
    for table_id in lab.vpc.route_table_ids:
        ledger = lab.ledger(table_id)
        assert {e.by for e in ledger.values()} == {leader.name}
    # Steady state: one read per table per resync, by the leader alone, and no write.
    lab.proxy.reset_counts()
    lab.passes()
    assert lab.proxy.counts().by_action == {"DescribeRouteTables": 2}
    # One lease change: one write per table.
    assert nodes[2].lease is not None
    lab.drop_lease(nodes[2].lease)
    lab.proxy.reset_counts()
    lab.passes(resync=False)
    assert lab.proxy.counts().by_action == {"DeleteRoute": 2}


def test_a_leader_killed_mid_pass_hands_over_without_duplicates(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    for i in range(3):
        lab.node(i)
    controller = lab.controller()
    _, successor = lab.kill_leader_mid_write("CreateRoute")
    written_by_old = lab.proxy.counts()["CreateRoute"]
    assert 1 <= written_by_old < 6
    successor.passes()
    want = expected(lab, [0, 1, 2])
    assert lab.all_routes() == {t: want for t in lab.vpc.route_table_ids}
    # Every route was created exactly once, across both leaders.
    assert lab.proxy.counts()["CreateRoute"] == 6
    assert lab.proxy.counts()["ReplaceRoute"] == 0 and lab.proxy.counts()["DeleteRoute"] == 0
    assert controller in lab.nodes


def test_the_controller_serves_cluster_mode_without_a_lease(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    leases = [lab.node(i) for i in range(2)]
    for node in leases:
        node.shutdown()  # agents that are not candidates (only the controller is)
    lab.nodes.clear()
    controller = lab.controller()
    lab.leader()
    controller.passes()
    assert lab.all_routes() == {t: expected(lab, [0, 1]) for t in lab.vpc.route_table_ids}


def test_an_old_flanneld_route_is_adopted_and_its_lease_resolved(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    controller = lab.controller()
    old = lab.vpc.instances[1]
    # flanneld's aws-vpc made this route for its lease, which names only its IP.
    table_id = lab.vpc.main_route_table_id
    lab.admin.create_route(
        RouteTableId=table_id, DestinationCidrBlock="10.5.9.0/24", NetworkInterfaceId=old.eni_id
    )
    lab.put_lease(
        Lease(IPv4Network("10.5.9.0/24"), LeaseAttrs(public_ip=IPv4Address(old.private_ip)))
    )
    lab.leader()
    lab.proxy.reset_counts()
    controller.passes()
    # Adopted in place in one table (no write), created in the other; one lookup of the IP.
    counts = lab.proxy.counts()
    assert counts["DescribeNetworkInterfaces"] == 1
    assert counts["CreateRoute"] == 1 and counts.writes == 1
    assert lab.all_routes() == {t: {"10.5.9.0/24": old.eni_id} for t in lab.vpc.route_table_ids}
    ledger = lab.ledger(table_id)
    assert ledger[IPv4Network("10.5.9.0/24")].target == old.eni_id
    lab.proxy.reset_counts()
    controller.passes()
    assert lab.proxy.counts().writes == 0


# -- a misbehaving EC2 ----------------------------------------------------------------------


def test_throttling_on_a_third_of_calls_still_converges_without_duplicates(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    for i in range(3):
        lab.node(i)
    leader = lab.leader()
    lab.proxy.add(Throttle(probability=0.3))
    want = expected(lab, [0, 1, 2])

    def converged() -> bool:
        leader.passes(resync=True)
        return lab.all_routes() == {t: want for t in lab.vpc.route_table_ids}

    wait_for(converged, 60, "routes despite throttling")
    lab.proxy.clear()
    states = {s["state"] for s in leader.status().values()}
    leader.passes()
    assert {s["state"] for s in leader.status().values()} == {"programmed"}, states
    assert lab.proxy.counts()["DeleteRoute"] == 0


def test_a_full_table_blocks_cleanly_and_recovers_when_the_quota_is_raised(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    limit = lab.proxy.add(RouteLimit(limit=2))
    for i in range(3):
        lab.node(i)
    leader = lab.leader()
    leader.passes()
    statuses = leader.status()
    states = sorted(s["state"] for s in statuses.values())
    assert states == ["programmed"] * 4 + ["quota-blocked"] * 2
    blocked = [s for s in statuses.values() if s["state"] == "quota-blocked"]
    assert all("RouteLimitExceeded" in s["reason"] or "full" in s["reason"] for s in blocked)
    # Blocked is quiet: further lease events make no doomed creates.
    refused = limit.fired
    leader.passes(resync=False)
    assert limit.fired == refused

    limit.limit = 50  # the quota is raised
    want = expected(lab, [0, 1, 2])

    def recovered() -> bool:
        leader.passes(resync=True)
        return lab.all_routes() == {t: want for t in lab.vpc.route_table_ids}

    wait_for(recovered, 30, "the blocked routes after the quota was raised")


def test_a_missing_permission_fails_that_route_alone(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"

    class DeniedFor(CannedError):
        """UnauthorizedOperation for creates of one destination (a policy with a condition)."""

        def applies_to(self, call: Call) -> bool:
            return super().applies_to(call) and (
                call.params().get("DestinationCidrBlock") == "10.5.2.0/24"
            )

    lab.proxy.add(
        DeniedFor(
            actions={"CreateRoute"},
            code="UnauthorizedOperation",
            message="You are not authorized. Encoded authorization failure message: abc123",
            status=403,
        )
    )
    for i in range(3):
        lab.node(i)
    leader = lab.leader()
    leader.passes()
    table_id = lab.vpc.main_route_table_id
    status = leader.status()
    failed = status[f"{table_id} 10.5.2.0/24"]
    assert failed["state"] == RouteState.FAILED.value
    assert "ec2:CreateRoute" in failed["reason"]
    assert "providers/policies/aws-vpc-controller.json" in failed["reason"]
    assert "abc123" not in failed["reason"]
    assert status[f"{table_id} 10.5.1.0/24"]["state"] == "programmed"
    assert status[f"{table_id} 10.5.3.0/24"]["state"] == "programmed"


# -- discovery --------------------------------------------------------------------------------


def test_unreachable_metadata_service_is_one_clear_error(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", closed)
    ip = IPv4Address(lab.vpc.instances[0].private_ip)
    client = lab.etcd_client()
    try:
        iface = ExternalInterface("eth0", 2, 9001, ip, ip)
        backend = AwsVpcBackend(lab.context("node-0", iface, client))
        with pytest.raises(ConfigError) as err:
            backend.prepare()
    finally:
        client.close()
    text = str(err.value)
    assert text.startswith(f"cannot reach the EC2 instance metadata service at {closed}")
    assert "AWS_EC2_METADATA_SERVICE_ENDPOINT" in text and "\n" not in text


def test_the_route_table_is_found_when_none_is_configured(lab: Lab) -> None:
    del lab.backend_options["RouteTableID"]
    node = lab.node(0)
    # The node's subnet has no table of its own: the VPC's main table.
    assert [r.table.name for r in node.reconcilers] == [
        lab.vpc.main_route_table_id,
        f"{lab.vpc.main_route_table_id}/gc",
    ]
    extra = lab.vpc.extra_route_table_ids[0]
    lab.admin.associate_route_table(RouteTableId=extra, SubnetId=lab.vpc.subnet_id)
    assert lab.node(1).backend.route_table_ids() == (extra,)


def test_credentials_come_from_the_instance_role_and_stay_out_of_repr(lab: Lab) -> None:
    node = lab.node(0)
    stub = lab.stubs[0]
    role = f"latest/meta-data/iam/security-credentials/{stub.credentials.role}"
    assert stub.hits[role] >= 1
    for text in (repr(node.backend), *(repr(r.table) for r in node.reconcilers)):
        assert stub.credentials.secret_access_key not in text
        assert stub.credentials.token not in text


def test_imds_takes_a_new_token_when_the_old_one_expired(lab: Lab) -> None:
    stub = lab.stubs[0]
    imds = Imds(stub.url)
    assert imds.get("latest/meta-data/instance-id") == lab.vpc.instances[0].instance_id
    stub.expire_tokens()
    assert imds.get("latest/meta-data/placement/region") == REGION
    token = imds._token
    assert token and token not in repr(imds)
    with pytest.raises(ConfigError, match="not an http:// URL"):
        Imds("file:///etc/passwd")


def test_the_controller_verb_routes_leases_from_etcd(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cloudroutes controller` in-process: leases in etcd become routes, a lease deleted from
    etcd takes its routes with it."""
    from cloudroutes.controller import Controller
    from cloudroutes.subnet.etcd import EtcdLeaseSource

    lab.backend_options["Mode"] = "cluster"
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", lab.stubs[0].url)
    settings = EtcdSettings(endpoints=(lab.etcd.endpoint,), request_timeout=3)
    writer = EtcdLeaseSource(settings)
    config = writer.put_config(
        json.dumps(
            {"Network": "10.5.0.0/16", "Backend": {"Type": "aws-vpc", **lab.backend_options}}
        )
    )
    leases = []
    for node in lab.vpc.instances[:2]:
        attrs = LeaseAttrs(
            public_ip=IPv4Address(node.private_ip),
            backend_type="aws-vpc",
            backend_data={"NetworkInterfaceID": node.eni_id},
        )
        leases.append(writer.acquire(config, attrs))
    controller = Controller(EtcdLeaseSource(settings))
    thread = threading.Thread(target=controller.run, daemon=True)
    thread.start()
    try:
        want = {str(x.subnet): n.eni_id for x, n in zip(leases, lab.vpc.instances, strict=False)}
        wait_for(
            lambda: lab.all_routes() == {t: want for t in lab.vpc.route_table_ids},
            30,
            "the controller's routes",
        )
        lab.etcd.etcdctl("del", writer.lease_path(leases[0].key))
        del want[str(leases[0].subnet)]
        wait_for(
            lambda: lab.all_routes() == {t: want for t in lab.vpc.route_table_ids},
            30,
            "the deleted lease's routes gone",
        )
    finally:
        controller.stop.set()
        thread.join(timeout=15)
        writer.close()


def test_a_refused_source_dest_check_change_is_a_warning_not_a_failure(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    lab.proxy.add(
        CannedError(
            actions={"ModifyNetworkInterfaceAttribute"},
            code="UnauthorizedOperation",
            message="Encoded authorization failure message: xyz987",
            status=403,
        )
    )
    with caplog.at_level("WARNING", logger="providers.aws_vpc"):
        node = lab.node(0)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "providers.aws_vpc"]
    assert "ec2:ModifyNetworkInterfaceAttribute" in warning
    assert "providers/policies/aws-vpc-node.json" in warning and "xyz987" not in warning
    lab.passes()  # the node still routes its subnet
    eni = lab.vpc.instances[0].eni_id
    assert lab.routes(lab.vpc.main_route_table_id) == {"10.5.1.0/24": eni}
    assert node.lease is not None

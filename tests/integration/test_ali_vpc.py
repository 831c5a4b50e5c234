"""The ali-vpc backend end to end: the real aliyun SDK over HTTP to the lab's fake VPC API
(through the fault proxy, Alibaba dialect), an ECS metadata server per node (whose RAM role's
STS credentials the API accepts), the real reconciler, and a real etcd for the ledger and the
elections.

Each "node" is a backend built as the agent builds it (its metadata server, its etcd
connection, its lease); the test drives the reconcilers' passes itself, so every API call can
be counted.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network

import pytest

from cloudroutes.backend import BackendContext, ExternalInterface
from cloudroutes.errors import ConfigError, Rejected
from cloudroutes.lab.alibaba import (
    AlibabaVpcApi,
    EcsMetadata,
    LabAlibabaVpc,
    LabEcsInstance,
    ManualClock,
    alibaba_client,
    at,
    make_alibaba_vpc,
)
from cloudroutes.lab.etcd import EtcdCluster, free_port
from cloudroutes.lab.fault_proxy import FaultProxy, Throttle
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.subnet.etcd_client import EtcdClient
from providers import ali_route_table
from providers.ali_vpc import AliVpcBackend, Metadata, RamRoleCredentials
from tests import cloud_harness
from tests.cloud_harness import CloudLab
from tests.integration.test_ali_route_table import api, clean_ali_env, proxy
from tests.wait import wait_for

__all__ = ["api", "clean_ali_env", "proxy"]  # fixtures, used by name

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

Node = cloud_harness.Node[AliVpcBackend]


class Lab(CloudLab[AliVpcBackend]):
    """A VPC in the fake API, its nodes' metadata servers, and the network config."""

    def __init__(
        self,
        api: AlibabaVpcApi,
        proxy: FaultProxy,
        etcd: EtcdCluster,
        monkeypatch: pytest.MonkeyPatch,
        nodes: int = 3,
        tables: int = 2,
    ) -> None:
        self.api = api
        self.vpc: LabAlibabaVpc = make_alibaba_vpc(api, nodes=nodes, tables=tables)
        self.metadata = [
            EcsMetadata(i, api, vswitch_cidr=self.vpc.vswitch_cidr).start()
            for i in self.vpc.instances
        ]
        super().__init__("ali-vpc", proxy, etcd, monkeypatch, servers=self.metadata)
        self.backend_options["RouteTableIDs"] = list(self.vpc.route_table_ids)
        monkeypatch.setenv("CLOUDROUTES_ALIYUN_VPC_ENDPOINT", proxy.url)

    @property
    def tables(self) -> tuple[str, ...]:
        return self.vpc.route_table_ids

    def context_of(self, i: int, client: EtcdClient, controller: bool = False) -> BackendContext:
        self.monkeypatch.setenv("CLOUDROUTES_ALIYUN_METADATA_ENDPOINT", self.metadata[i].url)
        ip = IPv4Address(self.vpc.instances[i].private_ip)
        iface = None if controller else ExternalInterface("eth0", 2, 1500, ip, ip)
        return self.context("controller-1" if controller else f"node-{i}", iface, client)

    def backend(self, i: int, client: EtcdClient, controller: bool = False) -> AliVpcBackend:
        return AliVpcBackend(self.context_of(i, client, controller))

    def node(self, i: int) -> Node:
        client = self.etcd_client()
        ctx = self.context_of(i, client)
        backend = AliVpcBackend(ctx)
        attrs = backend.prepare()
        lease = Lease(IPv4Network(f"10.5.{i + 1}.0/24"), attrs, store_lease_id=100 + i)
        self.put_lease(lease)
        return self.bind(f"node-{i}", None, backend, lease, client, ctx)

    def controller(self) -> Node:
        client = self.etcd_client()
        ctx = self.context_of(0, client, True)
        return self.bind("controller-1", None, AliVpcBackend(ctx), None, client, ctx)

    def routes(self, table_id: str) -> dict[str, str]:
        return {e.destination: e.next_hop_id for e in self.api.entries(table_id)}

    def instance(self, i: int) -> LabEcsInstance:
        return self.vpc.instances[i]


@pytest.fixture
def lab(
    api: AlibabaVpcApi, proxy: FaultProxy, etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Lab]:
    # Entries made seconds ago count as the collector's to judge (in production it waits a
    # minute, in case their lease has not reached it yet); a pending entry is looked at again
    # at the next pass rather than 5 s later.
    monkeypatch.setattr(ali_route_table, "LEDGER_GRACE", 0.0)
    monkeypatch.setattr(ali_route_table, "SETTLE", 0.0)
    with Lab(api, proxy, etcd, monkeypatch) as made:
        yield made


def expected(lab: Lab, nodes: list[int]) -> dict[str, str]:
    return {f"10.5.{i + 1}.0/24": lab.instance(i).instance_id for i in nodes}


def states(node: Node, gc: bool = False) -> list[str]:
    return sorted(s["state"] for k, s in node.status().items() if gc or "/gc" not in k)


# -- node mode ------------------------------------------------------------------------------


def test_node_mode_each_node_routes_its_own_subnet_with_ram_role_credentials(lab: Lab) -> None:
    nodes = [lab.node(i) for i in range(3)]
    for i, node in enumerate(nodes):
        assert node.lease is not None
        assert node.lease.attrs.backend_type == "ali-vpc"
        assert node.lease.attrs.backend_data == {
            "InstanceID": lab.instance(i).instance_id,
            "Region": lab.vpc.region,
        }
    lab.leader()
    lab.proxy.reset_counts()
    lab.passes()
    want = expected(lab, [0, 1, 2])
    assert lab.all_routes() == {t: want for t in lab.tables}
    # Each node wrote its own entry, one batch call per table.
    assert lab.proxy.counts()["CreateRouteEntries"] == 6 and lab.proxy.counts().writes == 6
    for node in nodes:
        assert states(node) == ["pending", "pending"]  # accepted; Alibaba applies it later
    lab.passes(resync=False)  # the settle time came: each table is read once more
    for node in nodes:
        assert states(node) == ["programmed", "programmed"]
    for table_id in lab.tables:
        assert {e.by for e in lab.ledger(table_id).values()} == {"node-0", "node-1", "node-2"}
    # The credentials came from each node's RAM role.
    for server in lab.metadata:
        assert server.hits["latest/meta-data/ram/security-credentials/cloudroutes-node"] >= 1

    # Steady resync: one list per table per reconciler that acts, no write.
    lab.proxy.reset_counts()
    lab.passes()
    active = sum(1 for n in nodes for r in n.reconcilers if r.is_active())
    assert active == 3 * 2 + 2  # every node's tables, and the leader's collectors
    assert lab.proxy.counts().by_action == {"DescribeRouteEntryList": active}


def test_the_elected_collector_removes_a_dead_nodes_entry(lab: Lab) -> None:
    nodes = [lab.node(i) for i in range(3)]
    leader = lab.leader()
    lab.passes()
    lab.passes(resync=False)  # the settle reads
    leader.passes()  # the collector hears of the others' entries at its next read
    dead = next(n for n in nodes if n is not leader)
    assert dead.lease is not None
    dead.shutdown()
    lab.nodes.remove(dead)
    lab.drop_lease(dead.lease)
    lab.proxy.reset_counts()
    lab.passes(resync=False)
    alive = [nodes.index(n) for n in nodes if n is not dead]
    assert lab.all_routes() == {t: expected(lab, alive) for t in lab.tables}
    assert lab.proxy.counts().by_action == {"DeleteRouteEntries": 2}
    for table_id in lab.tables:
        assert dead.lease.subnet not in lab.ledger(table_id)


def test_entries_of_leases_that_expired_while_no_agent_ran_are_collected(lab: Lab) -> None:
    first = lab.converged(3)
    lab.restart(2, leases=[n.lease for n in first[:2] if n.lease])
    assert lab.all_routes() == {t: expected(lab, [0, 1]) for t in lab.tables}
    # The restart wrote nothing of its own: only the deletes of the expired lease.
    assert lab.proxy.counts()["DeleteRouteEntries"] == 2
    assert lab.proxy.counts().writes == 2


def test_an_agent_restart_writes_nothing(lab: Lab) -> None:
    lab.converged(2)
    lab.restart(2)
    assert lab.proxy.counts().writes == 0
    assert lab.all_routes() == {t: expected(lab, [0, 1]) for t in lab.tables}


def test_drift_is_repaired_at_resync(lab: Lab) -> None:
    nodes = lab.converged(2)
    table_id = lab.tables[0]
    from aliyunsdkvpc.request.v20160428.DeleteRouteEntryRequest import DeleteRouteEntryRequest

    [gone] = [e for e in lab.api.entries(table_id) if e.destination == "10.5.1.0/24"]
    request = DeleteRouteEntryRequest()
    request.set_RouteEntryId(gone.entry_id)
    admin = alibaba_client(lab.api.url, lab.vpc.credentials, lab.vpc.region)
    admin.do_action_with_exception(at(request, lab.api.url, lab.vpc.region))
    assert "10.5.1.0/24" not in lab.routes(table_id)
    lab.proxy.reset_counts()
    lab.passes(resync=True)
    assert lab.all_routes() == {t: expected(lab, [0, 1]) for t in lab.tables}
    assert lab.proxy.counts().writes == 1
    assert len(nodes) == 2


def test_an_entry_of_ours_retargeted_by_hand_is_repaired_at_the_next_resync(lab: Lab) -> None:
    nodes = lab.converged(2)
    lab.passes(resync=False)  # the settle reads
    table_id = lab.tables[0]
    from aliyunsdkvpc.request.v20160428.ModifyRouteEntryRequest import ModifyRouteEntryRequest

    [moved] = [e for e in lab.api.entries(table_id) if e.destination == "10.5.2.0/24"]
    request = ModifyRouteEntryRequest()
    request.set_RouteEntryId(moved.entry_id)
    request.set_NewNextHopType("Instance")
    request.set_NewNextHopId(lab.instance(2).instance_id)
    admin = alibaba_client(lab.api.url, lab.vpc.credentials, lab.vpc.region)
    admin.do_action_with_exception(at(request, lab.api.url, lab.vpc.region))
    assert lab.routes(table_id)["10.5.2.0/24"] == lab.instance(2).instance_id
    lab.proxy.reset_counts()
    lab.passes(resync=True)
    # The entry cloudroutes made is still ours (its ledger entry is confirmed): pointed back
    # in place, not deleted and created again.
    assert lab.all_routes() == {t: expected(lab, [0, 1]) for t in lab.tables}
    counts = lab.proxy.counts()
    assert counts["ModifyRouteEntry"] == 1 and counts.writes == 1
    lab.passes(resync=False)  # the settle read
    assert nodes[1].status()[f"{table_id} 10.5.2.0/24"]["state"] == "programmed"


def test_a_missing_permission_keeps_the_node_up_and_recovers_once_granted(lab: Lab) -> None:
    lab.api.forbid("CreateRouteEntries")
    node = lab.node(0)
    node.passes()
    assert states(node) == ["failed", "failed"]
    for key, status in node.status().items():
        if "/gc" in key:
            continue
        reason = status["reason"]
        assert "vpc:CreateRouteEntries" in reason and key.split()[0] in reason
        assert "providers/policies/ali-vpc-node.json" in reason and "\n" not in reason
    lab.api.allow("CreateRouteEntries")

    def recovered() -> bool:
        node.passes()  # a refused entry is tried again after its backoff (5 s, jittered)
        return lab.all_routes() == {t: expected(lab, [0]) for t in lab.tables}

    wait_for(recovered, 30, "the entry once the permission was granted")


def test_a_wrong_access_key_is_one_line_and_recovers_when_the_key_exists(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "a-secret-that-must-never-show-" + "y" * 8
    monkeypatch.setenv("ACCESS_KEY_ID", "LTAInotyetknown")
    monkeypatch.setenv("ACCESS_KEY_SECRET", secret)
    with caplog.at_level("DEBUG"):
        node = lab.node(0)
        with pytest.raises(Rejected) as refused:
            node.reconcilers[0].reconcile(resync=True)
    reason = str(refused.value)
    assert "InvalidAccessKeyId" in reason and "ACCESS_KEY_ID/ACCESS_KEY_SECRET" in reason
    assert "\n" not in reason
    assert secret not in caplog.text and secret not in json.dumps(node.routing.status())
    assert secret not in repr(node.backend) and secret not in repr(node.backend.options)
    lab.api.add_access_key("LTAInotyetknown", secret)  # the operator fixes the key
    node.passes()
    assert lab.all_routes() == {t: expected(lab, [0]) for t in lab.tables}


# -- cluster mode ---------------------------------------------------------------------------


def test_cluster_mode_one_leader_writes_every_entry(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    nodes = [lab.node(i) for i in range(3)]
    leader = lab.leader()
    lab.proxy.reset_counts()
    lab.passes()
    want = expected(lab, [0, 1, 2])
    assert lab.all_routes() == {t: want for t in lab.tables}
    assert lab.proxy.counts().by_action == {
        "DescribeRouteEntryList": 2,
        "CreateRouteEntries": 2,
    }
    for table_id in lab.tables:
        assert {e.by for e in lab.ledger(table_id).values()} == {leader.name}
    lab.passes(resync=False)  # the settle read
    lab.proxy.reset_counts()
    lab.passes()
    assert lab.proxy.counts().by_action == {"DescribeRouteEntryList": 2}
    assert nodes[2].lease is not None
    lab.drop_lease(nodes[2].lease)
    lab.proxy.reset_counts()
    lab.passes(resync=False)
    assert lab.proxy.counts().by_action == {"DeleteRouteEntries": 2}


def test_a_leader_killed_mid_pass_hands_over_without_duplicates(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    for i in range(3):
        lab.node(i)
    controller = lab.controller()
    _, successor = lab.kill_leader_mid_write("CreateRouteEntries")
    assert lab.proxy.counts()["CreateRouteEntries"] == 1  # one table's batch, not the other
    successor.passes()
    want = expected(lab, [0, 1, 2])
    assert lab.all_routes() == {t: want for t in lab.tables}
    # Every entry was created once, across both leaders: two batches, nothing deleted.
    assert lab.proxy.counts()["CreateRouteEntries"] == 2
    assert lab.proxy.counts()["DeleteRouteEntries"] == 0
    assert controller in lab.nodes


def test_convergence_of_n_leases_takes_n_over_50_batches(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    controller = lab.controller()
    n = 120
    for k in range(n):
        data = {"InstanceID": lab.instance(k % 3).instance_id, "Region": lab.vpc.region}
        ip = IPv4Address(lab.instance(k % 3).private_ip)
        attrs = LeaseAttrs(public_ip=ip, backend_type="ali-vpc", backend_data=data)
        lab.put_lease(Lease(IPv4Network(f"10.5.{k + 1}.0/24"), attrs))
    lab.leader()
    lab.proxy.reset_counts()
    want = {f"10.5.{k + 1}.0/24": lab.instance(k % 3).instance_id for k in range(n)}

    def converged() -> bool:
        controller.passes(resync=False)
        return lab.all_routes() == {t: want for t in lab.tables}

    wait_for(converged, 60, f"{n} entries in each table")
    assert lab.proxy.counts()["CreateRouteEntries"] == math.ceil(n / 50) * len(lab.tables)


def test_throttling_on_a_third_of_calls_still_converges_without_duplicates(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    for i in range(3):
        lab.node(i)
    leader = lab.leader()
    lab.proxy.add(Throttle(probability=0.3))
    want = expected(lab, [0, 1, 2])

    def converged() -> bool:
        leader.passes(resync=True)
        return lab.all_routes() == {t: want for t in lab.tables}

    wait_for(converged, 60, "entries despite throttling")
    lab.proxy.clear()
    leader.passes()
    assert states(leader, gc=True) == ["programmed"] * 6
    assert lab.proxy.counts()["DeleteRouteEntries"] == 0
    for table_id in lab.tables:
        assert len(lab.api.entries(table_id)) == 3  # one entry per lease, never two


def test_a_full_table_blocks_cleanly_and_recovers_when_the_quota_is_raised(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    lab.api.set_route_quota(2)
    for i in range(3):
        lab.node(i)
    leader = lab.leader()
    leader.passes()
    statuses = leader.status()
    assert sorted(s["state"] for s in statuses.values()) == ["pending"] * 4 + ["quota-blocked"] * 2
    blocked = [s for s in statuses.values() if s["state"] == "quota-blocked"]
    assert all("QuotaExceeded" in s["reason"] for s in blocked)
    lab.proxy.reset_counts()
    leader.passes(resync=False)  # blocked is quiet: no doomed creates
    assert lab.proxy.counts()["CreateRouteEntries"] == 0
    lab.api.set_route_quota(200)
    want = expected(lab, [0, 1, 2])

    def recovered() -> bool:
        leader.passes(resync=True)
        return lab.all_routes() == {t: want for t in lab.tables}

    wait_for(recovered, 30, "the blocked entries after the quota was raised")


def test_an_entry_stuck_pending_for_30_seconds_is_never_made_twice(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    clock = ManualClock()
    lab.api.clock = clock
    lab.api.pending_seconds = 30
    controller = lab.controller()
    lease = Lease(
        IPv4Network("10.5.1.0/24"),
        LeaseAttrs(
            public_ip=IPv4Address(lab.instance(0).private_ip),
            backend_type="ali-vpc",
            backend_data={"InstanceID": lab.instance(0).instance_id, "Region": lab.vpc.region},
        ),
    )
    lab.put_lease(lease)
    lab.leader()
    lab.proxy.reset_counts()
    for _ in range(5):
        controller.passes(resync=False)
        clock.advance(5)
    # One table's entry is Pending; the VPC refuses the other table's create meanwhile
    # (TaskConflict), and retries are no duplicates.
    assert {e.status for t in lab.tables for e in lab.api.entries(t)} == {"Pending"}
    assert states(controller, gc=True) in (["pending", "retry"], ["pending", "pending"])
    clock.advance(10)  # 30 s have passed
    controller.passes(resync=True)
    controller.passes(resync=True)
    want = {"10.5.1.0/24": lab.instance(0).instance_id}
    assert lab.all_routes() == {t: want for t in lab.tables}
    clock.advance(31)
    controller.passes(resync=True)
    assert states(controller, gc=True) == ["programmed", "programmed"]
    for table_id in lab.tables:
        assert len(lab.api.entries(table_id)) == 1


# -- discovery, credentials and old leases -------------------------------------------------


def test_the_route_table_is_found_from_the_vrouter(
    api: AlibabaVpcApi, proxy: FaultProxy, etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = Lab(api, proxy, etcd, monkeypatch, nodes=1, tables=1)
    try:
        del one.backend_options["RouteTableIDs"]
        node = one.node(0)
        table_id = one.vpc.route_table_id
        assert [r.table.name for r in node.reconcilers] == [table_id, f"{table_id}/gc"]
        api.add_route_table(one.vpc.vpc_id)
        client = one.etcd_client()
        try:
            with pytest.raises(ConfigError, match="has 2 route tables") as err:
                one.backend(0, client).route_table_ids()
            assert "Backend.RouteTableIDs" in str(err.value)
        finally:
            client.close()
    finally:
        one.close()


def test_ram_role_credentials_are_renewed_before_they_expire(lab: Lab) -> None:
    server = lab.metadata[0]
    now = [datetime.now(UTC)]
    credentials = RamRoleCredentials(Metadata(server.url), clock=lambda: now[0])
    first = credentials()
    assert credentials.role == "cloudroutes-node" and first.token
    assert first.secret not in repr(first) and first.token not in repr(first)
    assert credentials() is first  # not asked again while fresh
    old = server.credentials
    assert old is not None
    server.rotate_credentials()
    now[0] += timedelta(minutes=50)  # within the renewal margin of a 1 h credential
    renewed = credentials()
    assert renewed.key_id != first.key_id
    lab.api.revoke(old.key_id)
    node = lab.node(1)
    node.passes()
    assert lab.routes(lab.tables[0]) == expected(lab, [1])


def test_an_old_flanneld_lease_is_refused_with_a_reason(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    controller = lab.controller()
    old = lab.instance(1)
    lab.put_lease(
        Lease(IPv4Network("10.5.9.0/24"), LeaseAttrs(public_ip=IPv4Address(old.private_ip)))
    )
    lab.leader()
    controller.passes()
    refused = controller.reconcilers[0].refused()
    assert "10.5.9.0-24" in refused and "ECS" in refused["10.5.9.0-24"]
    assert lab.all_routes() == {t: {} for t in lab.tables}


def test_the_metadata_server_is_asked_with_a_token_when_it_requires_one(lab: Lab) -> None:
    server = lab.metadata[0]
    server.require_token = True
    metadata = Metadata(server.url)
    assert metadata.get("latest/meta-data/instance-id") == lab.instance(0).instance_id
    assert metadata._token and metadata._token not in repr(metadata)


def test_an_unreachable_metadata_server_is_one_clear_error(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    client = lab.etcd_client()
    try:
        backend = lab.backend(0, client)
        monkeypatch.setenv("CLOUDROUTES_ALIYUN_METADATA_ENDPOINT", closed)
        with pytest.raises(ConfigError) as err:
            backend.prepare()
    finally:
        client.close()
    text = str(err.value)
    assert text.startswith(f"cannot reach the ECS metadata server at {closed}")
    assert "CLOUDROUTES_ALIYUN_METADATA_ENDPOINT" in text and "\n" not in text


def test_a_subnet_that_moves_to_another_instance_is_retargeted_in_place(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    nodes = [lab.node(i) for i in range(2)]
    leader = lab.leader()
    lab.passes()
    lab.passes(resync=False)  # the settle reads
    moved = nodes[1].lease
    assert moved is not None
    data = {"InstanceID": lab.instance(2).instance_id, "Region": lab.vpc.region}
    lab.put_lease(
        Lease(
            moved.subnet,
            LeaseAttrs(moved.attrs.public_ip, backend_type="ali-vpc", backend_data=data),
        )
    )
    lab.proxy.reset_counts()
    leader.passes(resync=False)
    assert lab.proxy.counts().by_action == {"ModifyRouteEntry": 2}  # one per table, no gap
    want = {"10.5.1.0/24": lab.instance(0).instance_id, "10.5.2.0/24": lab.instance(2).instance_id}
    assert lab.all_routes() == {t: want for t in lab.tables}
    leader.passes(resync=False)  # the settle read
    assert states(leader, gc=True) == ["programmed"] * 4


def test_the_agents_loop_says_a_refusal_once_and_recovers_by_itself(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """The reconcilers' own loop (as in the agent): a missing permission is one warning per
    table, not one per retry, and the entry appears once the permission is granted."""
    lab.api.forbid("CreateRouteEntries")
    node = lab.node(0)
    stop = threading.Event()
    own = [r for r in node.reconcilers if "/gc" not in r.table.name]
    threads = [threading.Thread(target=r.run, args=(stop,), daemon=True) for r in own]
    with caplog.at_level("WARNING", logger="cloudroutes.reconciler"):
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: states(node) == ["failed", "failed"], 20, "the refusal in /status")
            passes = sum(r.passes for r in own)
            wait_for(lambda: sum(r.passes for r in own) >= passes + 2, 30, "retries")
            said = [m for m in caplog.messages if "vpc:CreateRouteEntries" in m]
            assert len(said) == len(own), said  # once per table, not at every retry
            lab.api.allow("CreateRouteEntries")
            wait_for(
                lambda: (
                    lab.all_routes() == {t: expected(lab, [0]) for t in lab.tables}
                    and states(node) == ["programmed", "programmed"]
                ),
                40,
                "the entry once the permission was granted",
            )
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)

"""The gce backend end to end: google-cloud-compute over HTTP to the lab's fake Compute API
(through the fault proxy, GCE dialect), a metadata server per node (identity and the service
account's token), the real reconciler, and a real etcd for the ledger and the elections.

Each "node" is a backend built as the agent builds it (its metadata server, its etcd
connection, its lease); the test drives the reconcilers' passes itself, so every Compute call
can be counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from cloudroutes.backend import ExternalInterface
from cloudroutes.errors import CloudroutesError, ConfigError
from cloudroutes.lab.etcd import EtcdCluster, free_port
from cloudroutes.lab.fault_proxy import (
    HTTP,
    CannedError,
    FaultProxy,
    Throttle,
)
from cloudroutes.lab.gce import FakeMetadataServer, LabGceProject
from cloudroutes.lab.gce import GceLab as Cloud
from cloudroutes.lease import Lease, LeaseAttrs
from providers import gce_route_table
from providers.gce import API_ENDPOINT_VARIABLE, GceBackend, Metadata, discover
from providers.gce_api import flannel_name, route_name
from tests import cloud_harness
from tests.cloud_harness import CLUSTER, CloudLab
from tests.integration.test_gce_route_table import (
    NODE_IPS,
    admin_delete,
    admin_insert,
    clean_gce_env,
    point_google_auth_at,
)
from tests.wait import wait_for

__all__ = ["clean_gce_env"]  # fixtures, used by name

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

Node = cloud_harness.Node[GceBackend]


class Lab(CloudLab[GceBackend]):
    """A GCE project of the lab, its nodes' metadata servers, and the network config."""

    def __init__(
        self,
        cloud: Cloud,
        etcd: EtcdCluster,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        assert cloud.project is not None and cloud.proxy is not None
        super().__init__("gce", cloud.proxy, etcd, monkeypatch)
        self.cloud = cloud
        self.project: LabGceProject = cloud.project
        monkeypatch.setenv(API_ENDPOINT_VARIABLE, cloud.api_url)
        point_google_auth_at(monkeypatch, cloud.metadata[0].host_port)

    @property
    def network(self) -> str:
        return self.project.network_path

    def node(self, i: int) -> Node:
        """Node i as its agent starts: metadata discovery, its lease, bind."""
        instance = self.project.instances[i]
        self.monkeypatch.setenv("GCE_METADATA_HOST", self.cloud.metadata[i].host_port)
        self.monkeypatch.setenv("GCE_METADATA_IP", self.cloud.metadata[i].host_port)
        ip = IPv4Address(instance.ip)
        iface = ExternalInterface("eth0", 2, 1460, ip, ip)
        client = self.etcd_client()
        ctx = self.context(f"node-{i}", iface, client)
        backend = GceBackend(ctx)
        attrs = backend.prepare()
        lease = Lease(subnet=IPv4Network(f"10.5.{i + 1}.0/24"), attrs=attrs, store_lease_id=100 + i)
        self.put_lease(lease)
        return self.bind(f"node-{i}", instance, backend, lease, client, ctx)

    def controller(self, name: str = "controller-1") -> Node:
        # It runs on an instance of its own, whose metadata server says where it is.
        self.monkeypatch.setenv("GCE_METADATA_HOST", self.cloud.metadata[0].host_port)
        client = self.etcd_client()
        ctx = self.context(name, None, client)
        return self.bind(name, None, GceBackend(ctx), None, client, ctx)

    @property
    def tables(self) -> tuple[str, ...]:
        return (self.network,)

    def ledger(self, table_id: str | None = None) -> dict[Any, Any]:
        return super().ledger(table_id or self.network)

    def routes(self, table_id: str | None = None) -> dict[str, str]:
        """destRange -> next-hop instance name, of every route but the network's own."""
        return {
            r["destRange"]: r.get("nextHopInstance", r.get("nextHopIp", "")).rsplit("/", 1)[-1]
            for r in self.cloud.api.routes(self.project.project_id)
            if not r["name"].startswith("default-route-")
        }

    def names(self) -> set[str]:
        return {
            r["name"]
            for r in self.cloud.api.routes(self.project.project_id)
            if not r["name"].startswith("default-route-")
        }

    def writes(self) -> int:
        counts = self.proxy.counts()
        return counts["routes.insert"] + counts["routes.delete"]


@contextlib.contextmanager
def lab_of(
    etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch, forward: bool | list[bool] = True
) -> Iterator[Lab]:
    with Cloud(NODE_IPS, can_ip_forward=forward) as cloud:
        made = Lab(cloud, etcd, monkeypatch)
        try:
            yield made
        finally:
            made.close()


@pytest.fixture
def lab(clean_gce_env: None, etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    # Routes made seconds ago by a node count as the collector's to judge (in production it
    # waits a minute, in case their lease has not reached it yet).
    monkeypatch.setattr(gce_route_table, "LEDGER_GRACE", 0.0)
    with lab_of(etcd, monkeypatch) as made:
        yield made


def expected(lab: Lab, nodes: list[int]) -> dict[str, str]:
    return {f"10.5.{i + 1}.0/24": lab.project.instances[i].name for i in nodes}


# -- node mode ------------------------------------------------------------------------------


def test_node_mode_each_node_routes_its_own_subnet(lab: Lab) -> None:
    nodes = [lab.node(i) for i in range(3)]
    for node in nodes:
        assert node.instance is not None and node.lease is not None
        assert node.lease.attrs.backend_type == "gce"
        assert node.lease.attrs.backend_data == {
            "Project": lab.project.project_id,
            "Zone": lab.project.zone,
            "Instance": node.instance.name,
        }
    lab.leader()
    lab.proxy.reset_counts()
    lab.passes()
    assert lab.routes() == expected(lab, [0, 1, 2])
    assert lab.names() == {route_name(CLUSTER, IPv4Network(f"10.5.{i}.0/24")) for i in (1, 2, 3)}
    # Each node inserted only its own route, once.
    assert lab.proxy.counts()["routes.insert"] == 3 and lab.writes() == 3
    assert {e.by for e in lab.ledger().values()} == {"node-0", "node-1", "node-2"}
    for node in nodes:
        own = [s for k, s in node.status().items() if "/gc" not in k]
        assert [s["state"] for s in own] == ["programmed"]

    # Steady state: a resync lists the routes once per reconciler that acts, writes nothing.
    lab.proxy.reset_counts()
    lab.passes()
    active = sum(1 for n in nodes for r in n.reconcilers if r.is_active())
    assert active == 3 + 1  # every node's own binding, plus the leader's collector
    assert lab.proxy.counts().by_action == {"routes.list": active}


def test_the_elected_collector_removes_a_dead_nodes_route(lab: Lab) -> None:
    nodes = [lab.node(i) for i in range(3)]
    leader = lab.leader()
    lab.passes()
    leader.passes()  # the collector learns of the others' routes at its next read
    dead = next(n for n in nodes if n is not leader)
    assert dead.lease is not None
    dead.shutdown()
    lab.nodes.remove(dead)
    lab.drop_lease(dead.lease)

    lab.proxy.reset_counts()
    lab.passes(resync=False)  # the lease event alone: no read, one delete
    alive = [nodes.index(n) for n in nodes if n is not dead]
    assert lab.routes() == expected(lab, alive)
    counts = lab.proxy.counts()
    assert counts["routes.delete"] == 1 and lab.writes() == 1 and counts["routes.list"] == 0
    assert dead.lease.subnet not in lab.ledger()


def test_routes_of_leases_that_expired_while_no_agent_ran_are_collected(lab: Lab) -> None:
    first = lab.converged(3)
    # While nothing ran, node 2's lease expired.
    lab.restart(2, leases=[n.lease for n in first[:2] if n.lease])
    assert lab.routes() == expected(lab, [0, 1])
    # The restart made no write of its own: only the delete of the expired lease's route.
    assert lab.proxy.counts()["routes.delete"] == 1 and lab.writes() == 1


def test_an_agent_restart_writes_nothing(lab: Lab) -> None:
    lab.converged(2)
    lab.restart(2)
    assert lab.writes() == 0
    assert lab.routes() == expected(lab, [0, 1])


def test_a_route_deleted_by_hand_comes_back_at_the_resync(lab: Lab) -> None:
    nodes = lab.converged(2)
    name = route_name(CLUSTER, IPv4Network("10.5.1.0/24"))
    gone = {r["name"]: r for r in lab.cloud.api.routes(lab.project.project_id)}[name]
    assert gone["nextHopInstance"].endswith(lab.project.instances[0].name)
    # Deleted by hand, as `gcloud compute routes delete` would.
    admin_delete(lab.cloud, name)
    assert "10.5.1.0/24" not in lab.routes()
    lab.proxy.reset_counts()
    lab.passes(resync=False)  # no read: nothing to do as far as the reconcilers know
    assert lab.writes() == 0
    lab.passes(resync=True)
    assert lab.routes() == expected(lab, [0, 1])
    assert lab.proxy.counts()["routes.insert"] == 1 and lab.writes() == 1
    assert len(nodes) == 2


def test_a_route_of_ours_re_created_by_hand_elsewhere_is_repaired_at_the_resync(lab: Lab) -> None:
    nodes = lab.converged(3)
    name = route_name(CLUSTER, IPv4Network("10.5.2.0/24"))
    # GCE routes cannot change: pointed elsewhere by hand is deleted and inserted again under
    # its name, as `gcloud compute routes create` would (without cloudroutes' description).
    admin_delete(lab.cloud, name)
    admin_insert(lab.cloud, name, "10.5.2.0/24", 2)
    assert lab.routes()["10.5.2.0/24"] == lab.project.instances[2].name
    lab.proxy.reset_counts()
    lab.passes(resync=True)
    # Still ours (its ledger entry is confirmed): replaced by a delete and an insert.
    assert lab.routes() == expected(lab, [0, 1, 2])
    counts = lab.proxy.counts()
    assert counts["routes.delete"] == 1 and counts["routes.insert"] == 1 and lab.writes() == 2
    assert nodes[1].status()[f"{lab.network} 10.5.2.0/24"]["state"] == "programmed"


def test_one_lease_change_is_one_insert(lab: Lab) -> None:
    lab.converged(2)
    lab.proxy.reset_counts()
    lab.node(2)
    lab.passes(resync=False)
    counts = lab.proxy.counts()
    assert counts["routes.insert"] == 1 and lab.writes() == 1
    assert counts["routes.list"] == 1  # the new node's first read of its own table


def test_a_node_switching_from_flanneld_adopts_its_route_in_place(lab: Lab) -> None:
    old = flannel_name(IPv4Network("10.5.1.0/24"))
    admin_insert(lab.cloud, old, "10.5.1.0/24", 0)  # flanneld's gce made it
    node = lab.node(0)
    lab.proxy.reset_counts()
    lab.passes()
    assert lab.writes() == 0  # adopted, never deleted and re-added
    assert lab.names() == {old}
    assert lab.ledger()[IPv4Network("10.5.1.0/24")].target.endswith(f" as {old}")
    assert {s["state"] for k, s in node.status().items() if "/gc" not in k} == {"programmed"}


def test_an_old_flanneld_lease_is_refused_with_its_reason(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    controller = lab.controller()
    lab.put_lease(Lease(IPv4Network("10.5.9.0/24"), LeaseAttrs(public_ip=IPv4Address(NODE_IPS[1]))))
    lab.leader()
    controller.passes()
    [reason] = controller.routing.status()["refused_leases"].values()
    assert "flanneld's gce backend" in reason and NODE_IPS[1] in reason
    assert lab.writes() == 0


# -- an instance without IP forwarding ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["node", "cluster"])
def test_an_instance_without_ip_forwarding_gets_no_route_and_says_why(
    clean_gce_env: None,
    etcd: EtcdCluster,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    monkeypatch.setattr(gce_route_table, "LEDGER_GRACE", 0.0)
    with lab_of(etcd, monkeypatch, forward=[True, True, False]) as lab:
        lab.backend_options["Mode"] = mode
        nodes = [lab.node(i) for i in range(3)]  # prepare() does not fail: the agent runs on
        leader = lab.leader()
        with caplog.at_level("WARNING"):
            lab.passes()
            lab.passes()
        assert lab.routes() == expected(lab, [0, 1])
        writer = nodes[2] if mode == "node" else leader
        [failed] = [s for k, s in writer.status().items() if "10.5.3.0/24" in k and "/gc" not in k]
        assert failed["state"] == "failed"
        assert "IP forwarding" in failed["reason"] and "--can-ip-forward" in failed["reason"]
        lines = [r.getMessage() for r in caplog.records if "IP forwarding" in r.getMessage()]
        assert len(lines) == 1, lines  # said once, not at every pass
        assert lab.proxy.counts()["routes.insert"] == 2


# -- cluster mode ---------------------------------------------------------------------------


def test_cluster_mode_one_leader_writes_every_route(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    nodes = [lab.node(i) for i in range(3)]
    leader = lab.leader()
    lab.proxy.reset_counts()
    lab.passes()
    assert lab.routes() == expected(lab, [0, 1, 2])
    assert lab.proxy.counts()["routes.insert"] == 3
    assert lab.proxy.counts()["routes.list"] == 1  # only the leader read
    assert {e.by for e in lab.ledger().values()} == {leader.name}
    lab.proxy.reset_counts()
    lab.passes()
    assert lab.proxy.counts().by_action == {"routes.list": 1}
    assert nodes[2].lease is not None
    lab.drop_lease(nodes[2].lease)
    lab.proxy.reset_counts()
    lab.passes(resync=False)
    assert lab.proxy.counts()["routes.delete"] == 1 and lab.writes() == 1


def test_a_leader_killed_mid_pass_hands_over_without_duplicates(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    for i in range(3):
        lab.node(i)
    controller = lab.controller()
    # One insert at a time, so the leader is killed between two of them.
    lab.monkeypatch.setattr(gce_route_table, "MAX_IN_FLIGHT", 1)
    _, successor = lab.kill_leader_mid_write("routes.insert")
    by_old = lab.proxy.counts()["routes.insert"]
    assert 1 <= by_old < 3
    successor.passes()
    assert lab.routes() == expected(lab, [0, 1, 2])
    assert lab.proxy.counts()["routes.insert"] == 3 and lab.proxy.counts()["routes.delete"] == 0
    assert controller in lab.nodes


# -- a misbehaving GCE ----------------------------------------------------------------------


def test_throttling_on_a_third_of_calls_still_converges_without_duplicates(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    for i in range(3):
        lab.node(i)
    leader = lab.leader()
    lab.proxy.add(Throttle(probability=0.3))
    want = expected(lab, [0, 1, 2])

    def converged() -> bool:
        leader.passes(resync=True)
        return lab.routes() == want

    wait_for(converged, 60, "routes despite throttling")
    lab.proxy.clear()
    leader.passes()
    assert {s["state"] for s in leader.status().values()} == {"programmed"}
    assert lab.proxy.counts()["routes.delete"] == 0
    assert len(lab.names()) == 3


def test_a_full_quota_blocks_cleanly_and_recovers(lab: Lab) -> None:
    lab.backend_options["Mode"] = "cluster"
    lab.cloud.api.set_route_quota(2)
    for i in range(3):
        lab.node(i)
    leader = lab.leader()
    leader.passes()
    states = sorted(s["state"] for s in leader.status().values())
    assert states == ["programmed", "programmed", "quota-blocked"]
    [blocked] = [s for s in leader.status().values() if s["state"] == "quota-blocked"]
    assert "quota" in blocked["reason"]
    # Blocked is quiet: a lease event makes no doomed insert.
    lab.proxy.reset_counts()
    leader.passes(resync=False)
    assert lab.proxy.counts()["routes.insert"] == 0

    lab.cloud.api.set_route_quota(50)

    def recovered() -> bool:
        leader.passes(resync=True)
        return lab.routes() == expected(lab, [0, 1, 2])

    wait_for(recovered, 30, "the blocked route after the quota was raised")


# -- discovery and configuration --------------------------------------------------------------


def test_unreachable_metadata_server_is_one_clear_error(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("GCE_METADATA_HOST", closed)
    monkeypatch.setenv("GCE_METADATA_IP", closed)
    ip = IPv4Address(NODE_IPS[0])
    client = lab.etcd_client()
    try:
        iface = ExternalInterface("eth0", 2, 1460, ip, ip)
        backend = GceBackend(lab.context("node-0", iface, client))
        with pytest.raises(ConfigError) as err:
            backend.prepare()
    finally:
        client.close()
    text = str(err.value)
    assert text.startswith(f"cannot reach the GCE metadata server ({closed}")
    assert "GCE_METADATA_HOST" in text and "\n" not in text


def test_the_metadata_network_becomes_the_apis_network(lab: Lab) -> None:
    node = lab.node(0)
    # Metadata says projects/NUM/networks/NET; the routes go to projects/ID/global/networks/NET.
    assert node.backend.identity().network == lab.project.network_path
    assert [r.table.name for r in node.reconcilers] == [
        lab.project.network_path,
        f"{lab.project.network_path}/gc",
    ]


def test_credentials_come_from_the_metadata_server_and_stay_out_of_repr(lab: Lab) -> None:
    node = lab.node(0)
    node.passes()
    token, _ = lab.cloud.api.tokens.issue()
    assert any("token" in path for path in lab.cloud.metadata[0].hits)
    for text in (repr(node.backend), *(repr(r.table) for r in node.reconcilers)):
        assert token not in text


def test_a_revoked_token_is_replaced_by_itself(lab: Lab) -> None:
    node = lab.node(0)
    node.passes()
    admin_delete(lab.cloud, route_name(CLUSTER, IPv4Network("10.5.1.0/24")))
    tokens = lab.cloud.metadata[0].hits["instance/service-accounts/default/token"]
    # The token the node's clients hold is revoked: the API answers 401 until a new one.
    lab.cloud.api.tokens.rotate()
    node.passes()
    assert lab.routes() == expected(lab, [0])
    assert lab.cloud.metadata[0].hits["instance/service-accounts/default/token"] > tokens


def test_no_token_from_the_metadata_server_fails_the_pass_and_recovers(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = lab.node(0)
    metadata = FaultProxy(lab.cloud.metadata[0].url, dialect=HTTP).start()
    try:
        # google-auth asks the metadata server for the service account's token through it.
        point_google_auth_at(monkeypatch, metadata.url.removeprefix("http://"))
        refused = metadata.add(
            CannedError(
                actions={"GET /computeMetadata/v1/instance/service-accounts/default/token"},
                code="NotFound",
                message="no service account",
                status=404,
            )
        )
        [own, _] = node.reconcilers
        with pytest.raises(CloudroutesError) as err:
            own.reconcile(resync=True)
        assert "token" in str(err.value) and "\n" not in str(err.value)
        assert lab.routes() == {}
        metadata.remove(refused)  # the instance got its service account
        node.passes()
        assert lab.routes() == expected(lab, [0])
    finally:
        metadata.stop()


def test_operations_in_flight_are_capped_across_a_cluster(
    clean_gce_env: None, etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gce_route_table, "PASS_DEADLINE", 1.0)
    ips = [f"198.18.0.{10 + i}" for i in range(14)]
    with Cloud(ips) as cloud:
        lab = Lab(cloud, etcd, monkeypatch)
        try:
            lab.backend_options["Mode"] = "cluster"
            controller = lab.controller()
            for i, instance in enumerate(lab.project.instances):
                data = {"Project": lab.project.project_id, "Zone": instance.zone}
                attrs = LeaseAttrs(
                    IPv4Address(instance.ip),
                    backend_type="gce",
                    backend_data={**data, "Instance": instance.name},
                )
                lab.put_lease(Lease(IPv4Network(f"10.5.{i + 1}.0/24"), attrs))
            lab.leader()
            cloud.api.operation_seconds = 60.0
            controller.passes()
            # Ten inserts at once, all still running at the end of the pass; the rest wait.
            assert lab.proxy.counts()["routes.insert"] == gce_route_table.MAX_IN_FLIGHT
            states = [s["state"] for s in controller.status().values()]
            assert states.count("pending") == len(ips)
            controller.passes(resync=False)
            assert lab.proxy.counts()["routes.insert"] == gce_route_table.MAX_IN_FLIGHT

            cloud.api.operation_seconds = 0.0
            cloud.api.complete_operations()

            def converged() -> bool:
                controller.passes()
                return len(lab.routes()) == len(ips)

            wait_for(converged, 30, "every route once the operations are done")
            assert lab.proxy.counts()["routes.insert"] == len(ips)  # none made twice
        finally:
            lab.close()


def test_every_client_uses_the_configured_endpoint(lab: Lab) -> None:
    node = lab.node(0)
    clients = node.backend.compute.clients("routes.list")
    # The operations client too: waiting on an insert never goes to Google's default host.
    for client in (clients.routes, clients.operations, clients.instances):
        assert client.api_endpoint == lab.cloud.api_url
    assert clients.project == lab.project.project_id


def test_a_shared_vpc_network_is_refused_in_one_line(lab: Lab) -> None:
    class SharedVpc(FakeMetadataServer):
        """An instance whose interface is in a network of another (host) project."""

        def paths(self) -> dict[str, str]:
            return {
                **super().paths(),
                "instance/network-interfaces/0/network": "projects/999/networks/host-net",
            }

    project = lab.project
    server = SharedVpc(project, project.instances[0], lab.cloud.api.tokens)
    with server, pytest.raises(ConfigError) as err:
        discover(Metadata([server.host_port]), None)
    text = str(err.value)
    assert "Shared VPC" in text and "host-net" in text and "\n" not in text
    # The same instance in its own project's network is found.
    identity = discover(Metadata([lab.cloud.metadata[0].host_port]), project.instances[0].ip)
    assert (identity.project, identity.zone, identity.instance) == (
        project.project_id,
        project.zone,
        project.instances[0].name,
    )

"""The GCE routes of a network as a route table: google-cloud-compute over HTTP to the lab's
fake Compute API, through the fault proxy (GCE dialect), credentials from the lab's metadata
server through google-auth, and the ledger in a real etcd.

The fixtures here (the lab, an environment without the host's Google settings) are also used
by the backend's tests in test_gce.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cloudroutes.errors import QuotaExceeded, Rejected, RouteNotFound, Throttled, Transient
from cloudroutes.lab.fault_proxy import CannedError, FaultProxy, Throttle
from cloudroutes.lab.gce import GceLab, LabGceProject
from cloudroutes.ledger import Ledger
from cloudroutes.reconciler import Gate
from cloudroutes.routes import Action, Change, EntryState, Plan, Route
from cloudroutes.subnet.etcd_client import EtcdClient
from providers import gce_api, gce_route_table
from providers.gce import API_ENDPOINT_VARIABLE, compute_clients
from providers.gce_api import Compute, ComputeClients, ForwardingCheck, flannel_name, route_name
from providers.gce_route_table import GceRouteTable

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CLUSTER = "prod"
NETWORK = IPv4Network("10.5.0.0/16")
POLICY = "providers/policies/gce-node.json"
NODE_IPS = ("198.18.0.10", "198.18.0.11", "198.18.0.12")


# -- fixtures shared with test_gce.py -------------------------------------------------------


def point_google_auth_at(monkeypatch: pytest.MonkeyPatch, host_port: str) -> None:
    """What a VM's environment gives google-auth: its metadata server (google-auth reads
    GCE_METADATA_HOST once, at import, so its copy is set too)."""
    from google.auth.compute_engine import _metadata

    monkeypatch.setenv("GCE_METADATA_HOST", host_port)
    monkeypatch.setenv("GCE_METADATA_IP", host_port)
    monkeypatch.setattr(_metadata, "_GCE_METADATA_HOST", host_port)


@pytest.fixture
def clean_gce_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Google setting of the host (credentials, gcloud config, metadata) reaches the test."""
    import os

    for name in list(os.environ):
        if name.startswith(("GOOGLE_", "GCE_METADATA_", "CLOUDSDK_", "CLOUDROUTES_GCE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))


@pytest.fixture
def gce_lab(clean_gce_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[GceLab]:
    """Three instances (the third without IP forwarding) in a fake project; the API requires
    the token the metadata servers hand out; calls go through the proxy."""
    with GceLab(NODE_IPS, can_ip_forward=[True, True, False]) as lab:
        point_google_auth_at(monkeypatch, lab.metadata[0].host_port)
        monkeypatch.setenv(API_ENDPOINT_VARIABLE, lab.api_url)
        yield lab


# -- helpers --------------------------------------------------------------------------------


def project(lab: GceLab) -> LabGceProject:
    assert lab.project is not None
    return lab.project


def proxy(lab: GceLab) -> FaultProxy:
    assert lab.proxy is not None
    return lab.proxy


@pytest.fixture
def clients(gce_lab: GceLab) -> ComputeClients:
    return compute_clients(project(gce_lab).project_id)


def make_table(
    lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient, **kw: Any
) -> GceRouteTable:
    network = project(lab).network_path
    compute = Compute(lambda: clients, POLICY)
    return GceRouteTable(
        compute,
        network,
        ledger=Ledger(etcd_client, PREFIX, CLUSTER, network),
        networks=(NETWORK,),
        cluster=CLUSTER,
        member="node-0",
        gate=Gate(),
        can_forward=ForwardingCheck(compute),
        **kw,
    )


def net(i: int) -> IPv4Network:
    return IPv4Network(f"10.5.{i}.0/24")


def hop(lab: GceLab, i: int) -> str:
    return project(lab).instances[i].path


def routes(lab: GceLab) -> dict[str, dict[str, Any]]:
    """The project's routes as the API holds them, by name, but for the network's own (its
    subnet route and default route)."""
    listed = lab.api.routes(project(lab).project_id)
    return {r["name"]: r for r in listed if not r["name"].startswith("default-route-")}


def targets(lab: GceLab) -> dict[str, str]:
    """destRange -> the next-hop instance's name, for every route."""
    return {
        r["destRange"]: r.get("nextHopInstance", "").rsplit("/", 1)[-1]
        for r in routes(lab).values()
    }


def add(*pairs: tuple[IPv4Network, str]) -> Plan:
    return Plan(tuple(Change(Action.ADD, Route(d, h, lease_key=str(d))) for d, h in pairs))


def delete(route: Route) -> Plan:
    return Plan((Change(Action.DELETE, route, current=route),))


def admin_routes(lab: GceLab) -> Any:
    """A routes client of someone else (flanneld, an operator), straight to the API: not
    counted by the proxy, no faults."""
    from google.cloud import compute_v1
    from google.oauth2.credentials import Credentials

    token, _ = lab.api.tokens.issue()
    return compute_v1.RoutesClient(
        credentials=Credentials(token), client_options={"api_endpoint": lab.api.url}
    )


def admin_insert(lab: GceLab, name: str, dest: str, node: int, text: str = "") -> None:
    from google.cloud import compute_v1

    route = compute_v1.Route(
        name=name,
        network=project(lab).network_path,
        dest_range=dest,
        next_hop_instance=hop(lab, node),
        priority=1000,
        description=text,
    )
    admin_routes(lab).insert_unary(project=project(lab).project_id, route_resource=route)
    lab.api.complete_operations()


def admin_delete(lab: GceLab, name: str) -> None:
    admin_routes(lab).delete_unary(project=project(lab).project_id, route=name)
    lab.api.complete_operations()


def writes(lab: GceLab) -> int:
    counts = proxy(lab).counts()
    return counts["routes.insert"] + counts["routes.delete"]


# -- tests ----------------------------------------------------------------------------------


def test_insert_observe_delete(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    table = make_table(gce_lab, clients, etcd_client)
    [outcome] = table.apply(add((net(1), hop(gce_lab, 0))))
    assert outcome.ok and not outcome.pending
    name = route_name(CLUSTER, net(1))
    made = routes(gce_lab)[name]
    assert made["destRange"] == "10.5.1.0/24" and made["priority"] == 1000
    assert made["nextHopInstance"].endswith(hop(gce_lab, 0))
    assert made["network"].endswith(project(gce_lab).network_path)
    assert made["description"].startswith("cloudroutes cluster=")
    assert "lease=10.5.1.0/24" in made["description"]
    assert len(name) <= 63 and CLUSTER not in name
    counts = proxy(gce_lab).counts()
    assert counts["routes.insert"] == 1 and counts["globalOperations.wait"] == 1
    assert counts["instances.get"] == 1  # IP forwarding of the next hop, checked once
    ledger = Ledger(etcd_client, PREFIX, CLUSTER, project(gce_lab).network_path).entries()
    assert ledger[net(1)].target == hop(gce_lab, 0)

    proxy(gce_lab).reset_counts()
    seen = table.observe()
    assert seen.owned[net(1)].entry == Route(net(1), hop(gce_lab, 0))
    assert seen.owned[net(1)].state is EntryState.ACTIVE
    assert seen.capacity is None
    assert proxy(gce_lab).counts().by_action == {"routes.list": 1}

    route = Route(net(1), hop(gce_lab, 0))
    [outcome] = table.apply(delete(route))
    assert outcome.ok and name not in routes(gce_lab)
    assert Ledger(etcd_client, PREFIX, CLUSTER, project(gce_lab).network_path).entries() == {}
    # Deleting again: not in the ledger any more, so nothing is called.
    proxy(gce_lab).reset_counts()
    [again] = table.apply(delete(route))
    assert isinstance(again.error, RouteNotFound) and writes(gce_lab) == 0


def test_the_listing_is_paged_to_the_end(
    gce_lab: GceLab,
    clients: ComputeClients,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gce_route_table, "PAGE_SIZE", 2)
    table = make_table(gce_lab, clients, etcd_client)
    outcomes = table.apply(add(*((net(i), hop(gce_lab, i % 2)) for i in range(1, 6))))
    assert all(o.ok for o in outcomes)
    proxy(gce_lab).reset_counts()
    assert set(table.observe().owned) == {net(i) for i in range(1, 6)}
    # Every route of the network, ours and the network's own, two per page.
    pages = -(-len(gce_lab.api.routes(project(gce_lab).project_id)) // 2)
    assert pages >= 3 and proxy(gce_lab).counts()["routes.list"] == pages


def test_a_running_operation_is_a_pending_entry(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    gce_lab.api.operation_seconds = 60.0
    table = make_table(gce_lab, clients, etcd_client)
    [outcome] = table.apply(add((net(1), hop(gce_lab, 0))), deadline=time.monotonic() + 0.5)
    assert outcome.ok and outcome.pending
    assert table.in_flight() == 1
    proxy(gce_lab).reset_counts()
    seen = table.observe()
    assert seen.owned[net(1)].entry == Route(net(1), hop(gce_lab, 0))
    assert seen.owned[net(1)].state is EntryState.PENDING
    assert proxy(gce_lab).counts().by_action == {"routes.list": 1, "globalOperations.get": 1}

    gce_lab.api.complete_operations()
    seen = table.observe()
    assert seen.owned[net(1)].state is EntryState.ACTIVE and table.in_flight() == 0


def test_operations_in_flight_are_capped(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    gce_lab.api.operation_seconds = 60.0
    table = make_table(gce_lab, clients, etcd_client)
    many = add(*((net(i), hop(gce_lab, 0)) for i in range(1, 16)))
    outcomes = table.apply(many, deadline=time.monotonic() + 1.5)
    # The first ten ran at once: one after the other, the first would have waited out the
    # pass alone. They are still running; the other five were not started (the reconciler
    # plans them again).
    assert len(outcomes) == gce_route_table.MAX_IN_FLIGHT
    assert all(o.ok and o.pending for o in outcomes)
    assert proxy(gce_lab).counts()["routes.insert"] == gce_route_table.MAX_IN_FLIGHT
    # A next pass starts nothing while all ten still run.
    more = Plan(many.changes[10:])
    assert table.apply(more, deadline=time.monotonic() + 0.3) == []
    gce_lab.api.operation_seconds = 0.0
    gce_lab.api.complete_operations()
    outcomes = table.apply(more, deadline=time.monotonic() + 5)
    assert len(outcomes) == 5 and all(o.ok and not o.pending for o in outcomes)
    assert len(routes(gce_lab)) == 15


def test_already_exists_is_checked_against_its_target(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    table = make_table(gce_lab, clients, etcd_client)
    name = route_name(CLUSTER, net(1))
    # Our route of that name, to another instance (a write of ours whose answer was lost,
    # for a lease that moved since): the name is ours alone, so it is replaced.
    mark = f"cloudroutes cluster={gce_api.cluster_mark(CLUSTER)} lease=10.5.1.0-24"
    admin_insert(gce_lab, name, "10.5.1.0/24", 1, mark)
    proxy(gce_lab).reset_counts()
    [outcome] = table.apply(add((net(1), hop(gce_lab, 0))))
    assert outcome.ok
    assert targets(gce_lab)["10.5.1.0/24"] == project(gce_lab).instances[0].name
    history = [a for a in proxy(gce_lab).history() if a.startswith("routes.")]
    assert history == ["routes.insert", "routes.get", "routes.delete", "routes.insert"]

    # Already there and right: done, nothing more written.
    proxy(gce_lab).reset_counts()
    [outcome] = table.apply(add((net(1), hop(gce_lab, 0))))
    assert outcome.ok and writes(gce_lab) == 1  # the refused insert alone


def test_a_flanneld_route_is_adopted_with_no_write_and_keeps_its_name(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    old = flannel_name(net(1))
    assert old == "flannel-10-5-1-0-24"
    admin_insert(gce_lab, old, "10.5.1.0/24", 0)
    table = make_table(gce_lab, clients, etcd_client)
    seen = table.observe()
    foreign = seen.foreign[net(1)]
    assert foreign.adoptable and foreign.entry == Route(net(1), hop(gce_lab, 0))

    proxy(gce_lab).reset_counts()
    want = Route(net(1), hop(gce_lab, 0), lease_key="10.5.1.0-24")
    [outcome] = table.apply(Plan((Change(Action.ADOPT, want, current=foreign.entry),)))
    assert outcome.ok and writes(gce_lab) == 0
    assert table.observe().owned[net(1)].entry == Route(net(1), hop(gce_lab, 0))
    assert set(routes(gce_lab)) == {old}

    # The lease moves to another instance: the adopted route is deleted and ours inserted.
    moved = Route(net(1), hop(gce_lab, 1), lease_key="10.5.1.0-24")
    current = Route(net(1), hop(gce_lab, 0))
    [outcome] = table.apply(Plan((Change(Action.REPLACE, moved, current=current),)))
    assert outcome.ok
    assert set(routes(gce_lab)) == {route_name(CLUSTER, net(1))}
    assert table.observe().owned[net(1)].entry == Route(net(1), hop(gce_lab, 1))
    entry = Ledger(etcd_client, PREFIX, CLUSTER, project(gce_lab).network_path).entries()
    assert entry[net(1)].target == hop(gce_lab, 1) and entry[net(1)].previous_target is None


def test_foreign_routes_are_reported_and_never_touched(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    admin_insert(gce_lab, "operator-route", "10.5.7.0/24", 1)
    admin_insert(gce_lab, "outside", "192.0.2.0/24", 1)
    # Another cluster's route: its name and mark are not ours.
    other = route_name("other-cluster", net(8))
    admin_insert(gce_lab, other, "10.5.8.0/24", 1, "cloudroutes cluster=0123 lease=x")
    before = routes(gce_lab)
    table = make_table(gce_lab, clients, etcd_client)
    seen = table.observe()
    assert seen.owned == {}
    assert set(seen.foreign) == {net(7), net(8)}
    assert not seen.foreign[net(7)].adoptable
    assert "did not create" in seen.foreign[net(7)].holder
    assert "gcloud compute routes delete operator-route" in seen.foreign[net(7)].advice
    proxy(gce_lab).reset_counts()
    for route in (Route(net(7), hop(gce_lab, 1)), Route(net(8), hop(gce_lab, 1))):
        [outcome] = table.apply(delete(route))
        assert isinstance(outcome.error, RouteNotFound)
    assert writes(gce_lab) == 0 and routes(gce_lab) == before


def test_throttling_is_throttled(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    table = make_table(gce_lab, clients, etcd_client)
    proxy(gce_lab).add(Throttle(actions={"routes.insert"}, times=1))
    [outcome] = table.apply(add((net(1), hop(gce_lab, 0))))
    assert isinstance(outcome.error, Throttled) and "rateLimitExceeded" in str(outcome.error)
    proxy(gce_lab).add(
        CannedError(
            actions={"routes.insert"},
            code="RATE_LIMIT_EXCEEDED",
            message="Quota exceeded for quota metric 'Queries'",
            status=429,
            times=1,
        )
    )
    [outcome] = table.apply(add((net(1), hop(gce_lab, 0))))
    assert isinstance(outcome.error, Throttled)
    proxy(gce_lab).add(Throttle(actions={"routes.list"}, times=1))
    with pytest.raises(Throttled):
        table.observe()
    [outcome] = table.apply(add((net(1), hop(gce_lab, 0))))
    assert outcome.ok


def test_the_routes_quota_is_quota_exceeded(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    table = make_table(gce_lab, clients, etcd_client, route_limit=2)
    gce_lab.api.set_route_quota(1)
    [ok] = table.apply(add((net(1), hop(gce_lab, 0))))
    [full] = table.apply(add((net(2), hop(gce_lab, 0))))
    assert ok.ok
    # Refused by the operation (accepted, then DONE with QUOTA_EXCEEDED).
    assert isinstance(full.error, QuotaExceeded) and "ROUTES quota" in str(full.error)
    seen = table.observe()
    assert seen.capacity is not None and (seen.capacity.limit, seen.capacity.used) == (2, 1)
    # Refused at once (403 QUOTA_EXCEEDED).
    gce_lab.api.quota_in_operation = False
    [full] = table.apply(add((net(2), hop(gce_lab, 0))))
    assert isinstance(full.error, QuotaExceeded)
    gce_lab.api.set_route_quota(10)
    [now] = table.apply(add((net(2), hop(gce_lab, 0))))
    assert now.ok


def test_a_missing_permission_names_it_and_the_role_file(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    table = make_table(gce_lab, clients, etcd_client)
    proxy(gce_lab).add(
        CannedError(
            actions={"routes.insert"},
            code="forbidden",
            message="Required 'compute.routes.create' permission for 'projects/x/global/routes/y'",
            status=403,
            times=1,
        )
    )
    [outcome] = table.apply(add((net(1), hop(gce_lab, 0))))
    assert isinstance(outcome.error, Rejected)
    text = str(outcome.error)
    assert "compute.routes.create" in text and POLICY in text and "\n" not in text


def test_an_instance_without_ip_forwarding_gets_no_route(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    table = make_table(gce_lab, clients, etcd_client)
    [outcome] = table.apply(add((net(3), hop(gce_lab, 2))))
    assert isinstance(outcome.error, Rejected)
    text = str(outcome.error)
    assert "IP forwarding" in text and "--can-ip-forward" in text and "\n" not in text
    assert writes(gce_lab) == 0 and routes(gce_lab) == {}
    # Recreated with forwarding (here: switched on): routed at the next attempt.
    inst = project(gce_lab).instances[2]
    gce_lab.api.set_can_ip_forward(project(gce_lab).project_id, inst.zone, inst.name, True)
    [outcome] = table.apply(add((net(3), hop(gce_lab, 2))))
    assert outcome.ok


def test_a_failed_operation_is_classified_like_a_direct_error(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    table = make_table(gce_lab, clients, etcd_client)
    gce_lab.api.fail_operations("INTERNAL_ERROR", "Internal error.", status=500)
    [outcome] = table.apply(add((net(1), hop(gce_lab, 0))))
    assert isinstance(outcome.error, Transient) and outcome.present is None
    assert routes(gce_lab) == {}
    [outcome] = table.apply(add((net(1), hop(gce_lab, 0))))
    assert outcome.ok


def test_a_replace_whose_insert_fails_says_nothing_is_there(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    table = make_table(gce_lab, clients, etcd_client)
    table.apply(add((net(1), hop(gce_lab, 0))))
    table.observe()
    gce_lab.api.fail_operations("INTERNAL_ERROR", "Internal error.", op_type="insert", status=500)
    moved = Route(net(1), hop(gce_lab, 1), lease_key="10.5.1.0-24")
    current = Route(net(1), hop(gce_lab, 0))
    [outcome] = table.apply(Plan((Change(Action.REPLACE, moved, current=current),)))
    assert isinstance(outcome.error, Transient) and outcome.present is None
    assert routes(gce_lab) == {}


def test_a_pass_with_nothing_to_do_costs_one_list(
    gce_lab: GceLab, clients: ComputeClients, etcd_client: EtcdClient
) -> None:
    table = make_table(gce_lab, clients, etcd_client)
    table.observe()
    assert table.apply(Plan()) == []
    assert proxy(gce_lab).counts().by_action == {"routes.list": 1}

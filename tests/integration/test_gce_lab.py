"""The local GCE lab: the fake Compute API and metadata server, checked with the real clients.

The gce backend's tests trust this lab, so every behaviour is shown through
google-cloud-compute (the routes, operations and instances clients) and google-auth's own
metadata code, over HTTP on 127.0.0.1, as the backend will use them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from google.api_core.client_options import ClientOptions
from google.api_core.exceptions import (
    BadRequest,
    Conflict,
    Forbidden,
    GoogleAPICallError,
    NotFound,
    TooManyRequests,
)
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import compute_v1

import cloudroutes.lab.gce as gce_module
from cloudroutes.lab.fault_proxy import (
    GCE,
    GCE_429,
    Call,
    CannedError,
    Delay,
    DropAfterForward,
    FaultProxy,
    ServerError,
    Throttle,
    TokenBucket,
)
from cloudroutes.lab.gce import (
    LINK_BASE,
    AccessTokens,
    ApiError,
    FakeComputeApi,
    FakeMetadataServer,
    GceLab,
    LabGceProject,
    make_gce_project,
    metadata_servers,
    route_filter,
)
from tests.cloud_harness import CLOUD_HOST, NODE_IP, CloudNetwork
from tests.conftest import needs_root
from tests.wait import wait_for


@pytest.fixture(scope="module")
def server() -> Iterator[FakeComputeApi]:
    with FakeComputeApi() as api:
        yield api


@pytest.fixture
def api(server: FakeComputeApi) -> Iterator[FakeComputeApi]:
    """The module's API, emptied, with the default options back after the test."""
    server.reset()
    yield server
    server.operation_seconds = 0.0
    server.wait_seconds = 120.0
    server.quota_in_operation = True
    server.require_token = False


@pytest.fixture
def lab(api: FakeComputeApi) -> LabGceProject:
    """Three VMs, the third without IP forwarding. Without the routes GCE makes for a
    network (the subnet's, the internet's): those have tests of their own."""
    return make_gce_project(api, nodes=3, can_ip_forward=[True, True, False], system_routes=False)


class Gce:
    """The three clients the backend uses, built on one endpoint as the backend will."""

    def __init__(self, url: str, credentials: Credentials | None = None) -> None:
        creds = credentials or AnonymousCredentials()
        options = ClientOptions(api_endpoint=url)
        self.routes = compute_v1.RoutesClient(credentials=creds, client_options=options)
        self.operations = compute_v1.GlobalOperationsClient(
            credentials=creds, client_options=options
        )
        self.instances = compute_v1.InstancesClient(credentials=creds, client_options=options)

    def insert(
        self, lab: LabGceProject, name: str, dest: str, **fields: Any
    ) -> compute_v1.Operation:
        """insert_unary, then wait on the operation: what the backend does."""
        fields.setdefault("next_hop_instance", lab.instances[0].self_link)
        fields.setdefault("network", lab.network_path)
        route = compute_v1.Route(name=name, dest_range=dest, **fields)
        op = self.routes.insert_unary(project=lab.project_id, route_resource=route)
        return self.operations.wait(project=lab.project_id, operation=op.name)

    def delete(self, lab: LabGceProject, name: str) -> compute_v1.Operation:
        op = self.routes.delete_unary(project=lab.project_id, route=name)
        return self.operations.wait(project=lab.project_id, operation=op.name)

    def names(self, lab: LabGceProject, filter: str = "", max_results: int = 0) -> list[str]:
        request = compute_v1.ListRoutesRequest(project=lab.project_id, filter=filter)
        if max_results:
            request.max_results = max_results
        return [r.name for r in self.routes.list(request=request)]


@pytest.fixture
def gce(api: FakeComputeApi) -> Gce:
    return Gce(api.url)


DONE = compute_v1.Operation.Status.DONE
RUNNING = compute_v1.Operation.Status.RUNNING
PENDING = compute_v1.Operation.Status.PENDING


def _reason(err: pytest.ExceptionInfo[GoogleAPICallError]) -> str:
    """The legacy errors[].reason every Compute error carries."""
    return err.value.errors[0]["reason"]


# -- routes ---------------------------------------------------------------------------------


def test_insert_then_wait_then_the_route_is_there_with_full_links(
    api: FakeComputeApi, gce: Gce, lab: LabGceProject
) -> None:
    node = lab.instances[1]
    route = compute_v1.Route(
        name="cr-10-244-1-0-24",
        network=lab.network_path,
        dest_range="10.244.1.0/24",
        priority=900,
        next_hop_instance=node.path,  # a partial path, as the API also takes
        description="cloudroutes: lease 10.244.1.0/24",
        tags=["pods"],
    )
    op = gce.routes.insert_unary(project=lab.project_id, route_resource=route)
    assert op.status == PENDING
    assert op.operation_type == "insert"
    assert op.target_link == f"{LINK_BASE}/projects/{lab.project_id}/global/routes/{route.name}"

    done = gce.operations.wait(project=lab.project_id, operation=op.name)
    assert (done.status, done.error.errors) == (DONE, [])
    assert gce.operations.get(project=lab.project_id, operation=op.name).status == DONE

    got = gce.routes.get(project=lab.project_id, route=route.name)
    assert got.network == lab.network_link
    assert got.next_hop_instance == node.self_link
    assert (got.dest_range, got.priority, got.description) == (
        "10.244.1.0/24",
        900,
        "cloudroutes: lease 10.244.1.0/24",
    )
    assert list(got.tags) == ["pods"]
    assert got.warnings == []


def test_an_operation_runs_for_a_while_and_the_route_appears_only_when_done(
    api: FakeComputeApi, gce: Gce, lab: LabGceProject
) -> None:
    api.operation_seconds = 60.0
    route = compute_v1.Route(
        name="cr-slow",
        network=lab.network_path,
        dest_range="10.244.2.0/24",
        next_hop_ip="198.18.0.11",
    )
    op = gce.routes.insert_unary(project=lab.project_id, route_resource=route)
    assert op.status == PENDING
    assert gce.operations.get(project=lab.project_id, operation=op.name).status == RUNNING
    assert gce.names(lab) == []
    # The name is taken while the insert runs.
    with pytest.raises(Conflict):
        gce.routes.insert_unary(project=lab.project_id, route_resource=route)

    api.wait_seconds = 0.2
    # A wait that runs out answers the operation as it stands, as GCE's does.
    assert gce.operations.wait(project=lab.project_id, operation=op.name).status == RUNNING
    api.complete_operations()
    assert gce.operations.wait(project=lab.project_id, operation=op.name).status == DONE
    assert gce.names(lab) == ["cr-slow"]
    assert gce.routes.get(project=lab.project_id, route="cr-slow").next_hop_ip == "198.18.0.11"


def test_wait_blocks_until_the_operation_is_done(
    api: FakeComputeApi, gce: Gce, lab: LabGceProject
) -> None:
    api.operation_seconds = 0.3
    done = gce.insert(lab, "cr-a", "10.244.1.0/24")
    assert done.status == DONE
    assert gce.names(lab) == ["cr-a"]


def test_list_filters_by_name_description_and_network_across_pages(
    api: FakeComputeApi, gce: Gce, lab: LabGceProject
) -> None:
    for i in range(7):
        gce.insert(lab, f"cr-{i}", f"10.244.{i}.0/24", description="cloudroutes")
    gce.insert(lab, "other-a", "10.9.0.0/24", description="someone else")
    gce.insert(lab, "other-b", "10.9.1.0/24")

    before = api.counts().get("routes.list", 0)
    names = gce.names(lab, filter='name eq "cr-.*"', max_results=3)
    assert names == [f"cr-{i}" for i in range(7)]
    assert api.counts()["routes.list"] - before == 3  # pages of 3, 3 and 1

    assert gce.names(lab, filter='description eq "cloudroutes"') == names
    assert gce.names(lab, filter="description ne cloudroutes") == ["other-a", "other-b"]
    assert gce.names(lab, filter=f'network eq ".*/networks/{lab.network_name}"') == sorted(
        [*names, "other-a", "other-b"]
    )
    assert gce.names(lab, filter='(name eq "cr-.*") (destRange eq "10.244.[12].0/24")') == [
        "cr-1",
        "cr-2",
    ]
    assert gce.names(lab, filter='name = "cr-1"') == ["cr-1"]
    # A regex must match the whole field, as RE2 full match on GCE.
    assert gce.names(lab, filter='name eq "cr"') == []
    assert gce.names(lab, filter='name eq "nothing-.*"') == []


def test_list_refuses_what_it_does_not_understand(gce: Gce, lab: LabGceProject) -> None:
    for bad in ('name eq "a" description eq "b"', "nosuchfield eq x", 'name eq "("'):
        with pytest.raises(BadRequest) as err:
            gce.names(lab, filter=bad)
        assert _reason(err) == "invalid"
    with pytest.raises(BadRequest):
        gce.names(lab, max_results=501)


def test_delete_removes_the_route_and_a_second_delete_is_not_found(
    gce: Gce, lab: LabGceProject
) -> None:
    gce.insert(lab, "cr-a", "10.244.1.0/24")
    gce.insert(lab, "cr-b", "10.244.2.0/24")
    done = gce.delete(lab, "cr-a")
    assert (done.status, done.operation_type, done.error.errors) == (DONE, "delete", [])
    assert gce.names(lab) == ["cr-b"]
    with pytest.raises(NotFound) as err:
        gce.routes.delete_unary(project=lab.project_id, route="cr-a")
    assert _reason(err) == "notFound"
    with pytest.raises(NotFound):
        gce.routes.get(project=lab.project_id, route="cr-a")


def test_a_route_being_deleted_cannot_be_deleted_again(
    api: FakeComputeApi, gce: Gce, lab: LabGceProject
) -> None:
    gce.insert(lab, "cr-a", "10.244.1.0/24")
    api.operation_seconds = 60.0
    gce.routes.delete_unary(project=lab.project_id, route="cr-a")
    with pytest.raises(BadRequest) as err:
        gce.routes.delete_unary(project=lab.project_id, route="cr-a")
    assert _reason(err) == "resourceNotReady"
    assert gce.names(lab) == ["cr-a"]  # still there until the delete is DONE
    api.complete_operations()
    assert gce.names(lab) == []


def test_a_taken_name_is_409_already_exists(gce: Gce, lab: LabGceProject) -> None:
    gce.insert(lab, "cr-a", "10.244.1.0/24")
    with pytest.raises(Conflict) as err:
        gce.insert(lab, "cr-a", "10.244.9.0/24")
    assert err.value.code == 409
    assert _reason(err) == "alreadyExists"
    assert "projects/cloudroutes-lab/global/routes/cr-a" in err.value.message
    assert gce.routes.get(project=lab.project_id, route="cr-a").dest_range == "10.244.1.0/24"


def test_a_retried_insert_with_the_same_request_id_gets_the_same_operation(
    gce: Gce, lab: LabGceProject
) -> None:
    route = compute_v1.Route(
        name="cr-a", network=lab.network_path, dest_range="10.244.1.0/24", next_hop_ip="198.18.0.10"
    )
    request = compute_v1.InsertRouteRequest(
        project=lab.project_id,
        route_resource=route,
        request_id="6f1c1b7e-1d3a-4c55-9a3e-6c9a8a1d2b10",
    )
    first = gce.routes.insert_unary(request=request)
    again = gce.routes.insert_unary(request=request)  # the answer was lost; the client retries
    assert again.name == first.name
    assert gce.names(lab) == ["cr-a"]


@pytest.mark.parametrize(
    ("fields", "what"),
    [
        ({"name": "Cr_A"}, "resource.name"),
        ({"name": "a" * 64}, "resource.name"),
        ({"name": "cr-"}, "resource.name"),
        ({"dest_range": "10.244.1.1/24"}, "resource.destRange"),
        ({"dest_range": "not-a-cidr"}, "resource.destRange"),
        ({"next_hop_ip": "198.18.0.11"}, "Exactly one next hop"),
        ({"next_hop_instance": ""}, "Exactly one next hop"),
        ({"network": "projects/elsewhere/global/networks/x"}, "resource.network"),
    ],
)
def test_an_invalid_route_is_refused_and_nothing_is_made(
    gce: Gce, lab: LabGceProject, fields: dict[str, str], what: str
) -> None:
    values = {
        "name": "cr-a",
        "network": lab.network_path,
        "dest_range": "10.244.1.0/24",
        "next_hop_instance": lab.instances[0].self_link,
        **fields,
    }
    route = compute_v1.Route(**values)
    with pytest.raises(BadRequest) as err:
        gce.routes.insert_unary(project=lab.project_id, route_resource=route)
    assert _reason(err) == "invalid"
    assert what in err.value.message
    assert gce.names(lab) == []


def test_unknown_network_and_next_hop_instance_are_not_found(gce: Gce, lab: LabGceProject) -> None:
    missing_network = f"projects/{lab.project_id}/global/networks/missing"
    with pytest.raises(NotFound):
        gce.insert(lab, "cr-a", "10.244.1.0/24", network=missing_network)
    missing_vm = f"projects/{lab.project_id}/zones/{lab.zone}/instances/missing"
    with pytest.raises(NotFound):
        gce.insert(lab, "cr-a", "10.244.1.0/24", next_hop_instance=missing_vm)
    with pytest.raises(NotFound):
        gce.routes.get(project="no-such-project", route="cr-a")
    assert gce.names(lab) == []


def test_routes_are_immutable(api: FakeComputeApi, gce: Gce, lab: LabGceProject) -> None:
    gce.insert(lab, "cr-a", "10.244.1.0/24")
    status, doc = api.answer(
        "PATCH", f"/compute/v1/projects/{lab.project_id}/global/routes/cr-a", {}, b"{}"
    )
    assert (status, doc["error"]["errors"][0]["reason"]) == (405, "httpMethodNotAllowed")


def test_routes_show_gce_warnings_about_their_next_hop(
    api: FakeComputeApi, gce: Gce, lab: LabGceProject
) -> None:
    gce.insert(lab, "cr-fwd", "10.244.1.0/24", next_hop_instance=lab.instances[0].self_link)
    gce.insert(lab, "cr-nofwd", "10.244.2.0/24", next_hop_instance=lab.instances[2].self_link)
    gce.insert(lab, "cr-gone", "10.244.3.0/24", next_hop_instance=lab.instances[1].self_link)
    api.remove_instance(lab.project_id, lab.zone, lab.instances[1].name)  # the VM is deleted

    def warnings() -> dict[str, list[str]]:
        listed = gce.routes.list(project=lab.project_id)
        return {r.name: [w.code for w in r.warnings] for r in listed}

    assert warnings() == {
        "cr-fwd": [],
        "cr-nofwd": ["NEXT_HOP_CANNOT_IP_FORWARD"],
        "cr-gone": ["NEXT_HOP_INSTANCE_NOT_FOUND"],
    }
    api.set_can_ip_forward(lab.project_id, lab.zone, lab.instances[2].name, True)
    assert warnings()["cr-nofwd"] == []
    with pytest.raises(NotFound):  # a route to a VM that is gone cannot be made
        gce.insert(lab, "cr-new", "10.244.4.0/24", next_hop_instance=lab.instances[1].self_link)


def test_a_network_lists_the_routes_gce_made_for_it(api: FakeComputeApi, gce: Gce) -> None:
    lab = make_gce_project(api, nodes=1, route_quota=1)
    routes = {r.dest_range: r for r in gce.routes.list(project=lab.project_id)}
    assert set(routes) == {"198.18.0.0/20", "0.0.0.0/0"}
    subnet, internet = routes["198.18.0.0/20"], routes["0.0.0.0/0"]
    assert (subnet.route_type, subnet.next_hop_network, subnet.priority) == (
        "SUBNET",
        lab.network_link,
        0,
    )
    assert internet.next_hop_gateway.endswith("/global/gateways/default-internet-gateway")
    assert all(r.name.startswith("default-route-") for r in routes.values())
    assert gce.names(lab, filter='name eq "cr-.*"') == []

    # They do not use up the quota (of 1 here); the subnet's cannot be deleted.
    assert gce.insert(lab, "cr-a", "10.244.1.0/24").error.errors == []
    with pytest.raises(BadRequest):
        gce.routes.delete_unary(project=lab.project_id, route=subnet.name)
    assert gce.delete(lab, internet.name).error.errors == []
    assert sorted(gce.names(lab)) == sorted(["cr-a", subnet.name])


def test_a_route_made_by_someone_else_is_there_at_once_and_uncounted(
    api: FakeComputeApi, gce: Gce, lab: LabGceProject
) -> None:
    body = {
        "name": "flannel-10-5-1-0-24",
        "network": lab.network_link,
        "destRange": "10.5.1.0/24",
        "nextHopInstance": lab.instances[2].self_link,
        "description": "flanneld",
    }
    shown = api.add_route(lab.project_id, body)
    assert shown["warnings"][0]["code"] == "NEXT_HOP_CANNOT_IP_FORWARD"
    assert api.counts() == {}
    got = gce.routes.get(project=lab.project_id, route="flannel-10-5-1-0-24")
    assert (got.dest_range, got.description) == ("10.5.1.0/24", "flanneld")
    with pytest.raises(ApiError):  # the same rules as an insert
        api.add_route(lab.project_id, {**body, "name": "Flannel"})
    with pytest.raises(ApiError):
        api.add_route(lab.project_id, body)


# -- quota and failed operations ------------------------------------------------------------


def test_quota_ends_the_operation_done_with_quota_exceeded_until_raised(
    api: FakeComputeApi, gce: Gce, lab: LabGceProject
) -> None:
    api.set_route_quota(2)
    gce.insert(lab, "cr-1", "10.244.1.0/24")
    gce.insert(lab, "cr-2", "10.244.2.0/24")
    done = gce.insert(lab, "cr-3", "10.244.3.0/24")
    assert done.status == DONE
    assert [e.code for e in done.error.errors] == ["QUOTA_EXCEEDED"]
    assert "Quota 'ROUTES' exceeded" in done.error.errors[0].message
    assert done.http_error_status_code == 403
    assert gce.names(lab) == ["cr-1", "cr-2"]

    api.set_route_quota(3)
    assert gce.insert(lab, "cr-3", "10.244.3.0/24").error.errors == []
    assert gce.names(lab) == ["cr-1", "cr-2", "cr-3"]


def test_quota_can_be_refused_at_once_as_403_quota_exceeded(
    api: FakeComputeApi, gce: Gce, lab: LabGceProject
) -> None:
    api.quota_in_operation = False
    api.set_route_quota(1, lab.project_id)
    gce.insert(lab, "cr-1", "10.244.1.0/24")
    with pytest.raises(Forbidden) as err:
        gce.insert(lab, "cr-2", "10.244.2.0/24")
    assert err.value.reason == "QUOTA_EXCEEDED"
    assert _reason(err) == "quotaExceeded"
    gce.delete(lab, "cr-1")  # a delete frees room
    gce.insert(lab, "cr-2", "10.244.2.0/24")
    assert gce.names(lab) == ["cr-2"]


def test_an_injected_operation_error_ends_done_with_it_and_changes_nothing(
    api: FakeComputeApi, gce: Gce, lab: LabGceProject
) -> None:
    api.fail_operations("RESOURCE_OPERATION_RATE_EXCEEDED", "slow down", op_type="insert")
    done = gce.insert(lab, "cr-a", "10.244.1.0/24")
    assert [e.code for e in done.error.errors] == ["RESOURCE_OPERATION_RATE_EXCEEDED"]
    assert gce.names(lab) == []
    assert gce.insert(lab, "cr-a", "10.244.1.0/24").error.errors == []  # only once
    assert gce.names(lab) == ["cr-a"]


def test_old_operations_are_forgotten_the_newest_kept(
    api: FakeComputeApi, gce: Gce, lab: LabGceProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gce_module, "KEPT_OPERATIONS", 10)
    done = [gce.insert(lab, f"cr-{i}", f"10.244.{i}.0/24") for i in range(25)]
    with pytest.raises(NotFound):
        gce.operations.get(project=lab.project_id, operation=done[0].name)
    for op in done[-10:]:
        assert gce.operations.get(project=lab.project_id, operation=op.name).status == DONE
    assert len(gce.names(lab)) == 25  # the routes stay, of course


# -- instances ----------------------------------------------------------------------------------


def test_instances_get_shows_can_ip_forward_and_the_address(gce: Gce, lab: LabGceProject) -> None:
    seen = [
        gce.instances.get(project=lab.project_id, zone=lab.zone, instance=node.name)
        for node in lab.instances
    ]
    assert [i.can_ip_forward for i in seen] == [True, True, False]
    assert [i.network_interfaces[0].network_i_p for i in seen] == [n.ip for n in lab.instances]
    assert {i.network_interfaces[0].network for i in seen} == {lab.network_link}
    assert [i.self_link for i in seen] == [n.self_link for n in lab.instances]
    with pytest.raises(NotFound):
        gce.instances.get(project=lab.project_id, zone=lab.zone, instance="missing")


def test_reset_forgets_everything(api: FakeComputeApi, gce: Gce, lab: LabGceProject) -> None:
    gce.insert(lab, "cr-a", "10.244.1.0/24")
    api.reset()
    assert api.counts() == {}
    with pytest.raises(NotFound):
        gce.routes.get(project=lab.project_id, route="cr-a")
    again = make_gce_project(api, nodes=1, system_routes=False)
    assert gce.names(again) == []


# -- the metadata server and the token ----------------------------------------------------------


def _metadata(server: FakeMetadataServer, path: str, flavor: bool = True) -> tuple[int, str]:
    headers = {"Metadata-Flavor": "Google"} if flavor else {}
    answer = requests.get(f"{server.url}/computeMetadata/v1/{path}", headers=headers, timeout=5)
    return answer.status_code, answer.text if answer.ok else ""


@pytest.fixture
def metadata(
    api: FakeComputeApi, lab: LabGceProject, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeMetadataServer]:
    """Node 0's metadata server, where google-auth looks for it (and nowhere else)."""
    from google.auth.compute_engine import _metadata

    with FakeMetadataServer(lab, lab.instances[0], api.tokens) as server:
        # google-auth read GCE_METADATA_HOST at import; the IP (its ping) it reads per call.
        monkeypatch.setattr(_metadata, "_GCE_METADATA_HOST", server.host_port)
        monkeypatch.setenv("GCE_METADATA_IP", server.host_port)
        monkeypatch.setenv("GCE_METADATA_HOST", server.host_port)
        yield server


def test_metadata_refuses_requests_without_the_flavor_header(
    metadata: FakeMetadataServer,
) -> None:
    assert _metadata(metadata, "project/project-id", flavor=False)[0] == 403
    assert _metadata(metadata, "project/project-id") == (200, "cloudroutes-lab")
    assert _metadata(metadata, "instance/nothing-here")[0] == 404


def test_each_node_has_its_own_metadata_server(api: FakeComputeApi, lab: LabGceProject) -> None:
    with metadata_servers(lab, api.tokens) as servers:
        assert len({s.url for s in servers}) == len(lab.instances)
        assert [_metadata(s, "instance/name")[1] for s in servers] == [
            n.name for n in lab.instances
        ]
        assert [_metadata(s, "instance/network-interfaces/0/ip")[1] for s in servers] == [
            n.ip for n in lab.instances
        ]


def test_google_auth_reads_who_the_instance_is(
    metadata: FakeMetadataServer, lab: LabGceProject
) -> None:
    import google.auth.transport.requests
    from google.auth.compute_engine import _metadata

    request = google.auth.transport.requests.Request()
    node = lab.instances[0]
    assert _metadata.ping(request)
    assert _metadata.get_project_id(request) == lab.project_id
    assert _metadata.get_universe_domain(request) == "googleapis.com"
    assert _metadata.get(request, "project/numeric-project-id") == str(lab.project_number)
    assert _metadata.get(request, "instance/name") == node.name
    assert _metadata.get(request, "instance/id") == node.instance_id
    assert (
        _metadata.get(request, "instance/zone") == f"projects/{lab.project_number}/zones/{lab.zone}"
    )
    assert _metadata.get(request, "instance/network-interfaces/0/ip") == node.ip
    assert _metadata.get(request, "instance/network-interfaces/0/mac") == "42:01:c6:12:00:0a"
    assert _metadata.get(request, "instance/network-interfaces/0/gateway") == "198.18.0.1"
    network = _metadata.get(request, "instance/network-interfaces/0/network")
    assert network == f"projects/{lab.project_number}/networks/{lab.network_name}"
    assert network == lab.metadata_network
    assert _metadata.get(request, "instance/hostname").startswith(f"{node.name}.")


def test_compute_engine_credentials_get_a_token_the_api_requires(
    api: FakeComputeApi, metadata: FakeMetadataServer, lab: LabGceProject
) -> None:
    from google.auth import compute_engine

    api.require_token = True
    # Without a token (AnonymousCredentials would try to refresh on the 401, so plain HTTP).
    url = f"{api.url}/compute/v1/projects/{lab.project_id}/global/routes"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=5)
    refused.value.close()
    assert refused.value.code == 401

    gce = Gce(api.url, compute_engine.Credentials())
    assert gce.insert(lab, "cr-a", "10.244.1.0/24").status == DONE
    assert gce.names(lab) == ["cr-a"]
    fetched = metadata.hits["instance/service-accounts/default/token"]
    assert fetched >= 1

    # The token goes stale: the API answers 401, the client fetches a new one and retries.
    api.tokens.rotate()
    assert gce.routes.get(project=lab.project_id, route="cr-a").name == "cr-a"
    assert metadata.hits["instance/service-accounts/default/token"] == fetched + 1


def test_a_vm_without_a_service_account_gives_no_token(
    api: FakeComputeApi, metadata: FakeMetadataServer, lab: LabGceProject
) -> None:
    from google.auth import compute_engine
    from google.auth.exceptions import RefreshError

    metadata.has_service_account = False
    assert _metadata(metadata, "instance/service-accounts/default/token")[0] == 404
    api.require_token = True
    with pytest.raises(RefreshError):
        Gce(api.url, compute_engine.Credentials()).routes.get(project=lab.project_id, route="x")
    assert api.counts() == {}  # no call reached the API without a token


def test_a_renewed_token_leaves_the_ones_handed_out_valid_until_they_expire() -> None:
    tokens = AccessTokens(lifetime=2)  # renewed in its last half second
    first, left = tokens.issue()
    assert 1 <= left <= 2 and tokens.issue()[0] == first  # one cached token for every node
    second = wait_for(lambda: tokens.issue()[0] != first and tokens.issue()[0], 5, "a renewal")
    assert tokens.valid(second)
    wait_for(lambda: not tokens.valid(first), 5, "the first token to expire")
    assert tokens.valid(second)
    tokens.rotate()
    assert not tokens.valid(second) and not tokens.valid(None) and not tokens.valid("")
    assert "ya29" not in repr(tokens)


# -- through the fault proxy --------------------------------------------------------------------


@pytest.fixture
def proxy(api: FakeComputeApi) -> Iterator[FaultProxy]:
    with FaultProxy(api.url, dialect=GCE) as server:
        yield server


def test_calls_through_the_proxy_are_counted_per_action(
    proxy: FaultProxy, lab: LabGceProject
) -> None:
    gce = Gce(proxy.url)
    gce.insert(lab, "cr-a", "10.244.1.0/24")
    gce.names(lab, filter='name eq "cr-.*"')
    gce.routes.get(project=lab.project_id, route="cr-a")
    gce.instances.get(project=lab.project_id, zone=lab.zone, instance=lab.instances[0].name)
    op = gce.routes.delete_unary(project=lab.project_id, route="cr-a")
    gce.operations.get(project=lab.project_id, operation=op.name)

    counts = proxy.counts()
    assert dict(counts.by_action) == {
        "routes.insert": 1,
        "globalOperations.wait": 1,
        "routes.list": 1,
        "routes.get": 1,
        "instances.get": 1,
        "routes.delete": 1,
        "globalOperations.get": 1,
    }
    assert (counts.reads, counts.writes) == (5, 2)


def test_a_write_bucket_throttles_inserts_and_deletes_but_not_reads(
    proxy: FaultProxy, lab: LabGceProject
) -> None:
    gce = Gce(proxy.url)
    writes = proxy.add(TokenBucket(kind="write", capacity=2, rate=0))
    gce.insert(lab, "cr-a", "10.244.1.0/24")
    gce.insert(lab, "cr-b", "10.244.2.0/24")
    with pytest.raises(Forbidden) as err:
        gce.routes.delete_unary(project=lab.project_id, route="cr-a")
    assert _reason(err) == "rateLimitExceeded"
    assert gce.names(lab) == ["cr-a", "cr-b"]  # reads (list, wait) have their own budget
    assert writes.fired == 1


@pytest.mark.parametrize(
    ("dialect", "exception", "status"), [(GCE, Forbidden, 403), (GCE_429, TooManyRequests, 429)]
)
def test_throttling_surfaces_as_rate_limit_exceeded(
    api: FakeComputeApi,
    lab: LabGceProject,
    dialect: Any,
    exception: type[GoogleAPICallError],
    status: int,
) -> None:
    with FaultProxy(api.url, dialect=dialect) as proxy:
        gce = Gce(proxy.url)
        throttle = proxy.add(Throttle(actions={"routes.insert"}, times=1))
        with pytest.raises(exception) as err:
            gce.insert(lab, "cr-a", "10.244.1.0/24")
        assert err.value.code == status
        assert _reason(err) == "rateLimitExceeded"
        assert gce.names(lab) == []  # nothing was applied

        gce.insert(lab, "cr-a", "10.244.1.0/24")
        assert gce.names(lab) == ["cr-a"]
        assert throttle.fired == 1
        assert proxy.counts()["routes.insert"] == 2
    if status == 429:
        assert err.value.reason == "RATE_LIMIT_EXCEEDED"


def test_quota_injected_by_the_proxy_is_compute_quota_exceeded(
    proxy: FaultProxy, lab: LabGceProject
) -> None:
    gce = Gce(proxy.url)
    message = "Quota 'ROUTES' exceeded.  Limit: 250.0 globally."
    proxy.add(
        CannedError(actions={"routes.insert"}, code="QUOTA_EXCEEDED", message=message, status=403)
    )
    with pytest.raises(Forbidden) as err:
        gce.insert(lab, "cr-a", "10.244.1.0/24")
    assert (err.value.reason, _reason(err)) == ("QUOTA_EXCEEDED", "quotaExceeded")
    assert message in err.value.message


@pytest.mark.parametrize(
    ("method", "path", "action"),
    [
        ("POST", "/compute/v1/projects/p/global/routes?requestId=x", "routes.insert"),
        ("GET", "/compute/v1/projects/p/global/routes?filter=name+eq+x", "routes.list"),
        ("GET", "/compute/v1/projects/p/global/routes/cr-a", "routes.get"),
        ("DELETE", "/compute/v1/projects/p/global/routes/cr-a", "routes.delete"),
        ("GET", "/compute/v1/projects/p/global/operations/operation-1", "globalOperations.get"),
        ("POST", "/compute/v1/projects/p/global/operations/op-1/wait", "globalOperations.wait"),
        ("GET", "/compute/v1/projects/p/zones/z/instances/vm", "instances.get"),
        ("GET", "/compute/v1/projects/p/global/networks/net", "networks.get"),
        (
            "PATCH",
            "/compute/v1/projects/p/global/routes/cr-a",
            "PATCH /compute/v1/projects/p/global/routes/cr-a",
        ),
        ("GET", "/computeMetadata/v1/instance/id", "GET /computeMetadata/v1/instance/id"),
    ],
)
def test_the_gce_dialect_names_each_compute_method(method: str, path: str, action: str) -> None:
    assert GCE.action(Call(method, path, (), b"")) == action
    assert GCE.is_read(action) == (method == "GET" or action == "globalOperations.wait")


# -- the filter itself ----------------------------------------------------------------------------


def test_route_filter_forms() -> None:
    route = {"name": "cr-a", "priority": 1000, "description": 'say "hi"'}
    assert route_filter("")(route)
    assert route_filter("priority eq 1000")(route)
    assert route_filter("priority != 999")(route)
    assert route_filter(r'description eq "say \"hi\""')(route)
    assert route_filter("(name eq 'cr-.*') (priority = 1000)")(route)
    assert not route_filter("(name eq 'cr-.*') (priority ne 1000)")(route)
    assert route_filter("nextHopIp ne .*")(route)  # absent field: ne holds
    with pytest.raises(ApiError):
        route_filter("name eq")


def test_a_write_whose_answer_is_lost_is_applied_and_a_retry_conflicts(
    proxy: FaultProxy, lab: LabGceProject
) -> None:
    gce = Gce(proxy.url)
    proxy.add(DropAfterForward(actions={"routes.insert"}, times=1))
    with pytest.raises(requests.ConnectionError):
        gce.insert(lab, "cr-a", "10.244.1.0/24")
    assert gce.names(lab) == ["cr-a"]  # GCE made it; the client cannot know
    with pytest.raises(Conflict) as err:
        gce.insert(lab, "cr-a", "10.244.1.0/24")
    assert _reason(err) == "alreadyExists"


def test_a_slow_answer_is_a_read_timeout_and_reads_are_retried_on_503(
    proxy: FaultProxy, lab: LabGceProject
) -> None:
    gce = Gce(proxy.url)
    gce.insert(lab, "cr-a", "10.244.1.0/24")
    proxy.reset_counts()
    proxy.add(Delay(actions={"routes.get"}, seconds=2.0, times=1))
    with pytest.raises(requests.Timeout):
        gce.routes.get(project=lab.project_id, route="cr-a", timeout=0.3)

    # google-cloud-compute retries a get on 503 by itself; every attempt is a call.
    unavailable = proxy.add(ServerError(actions={"routes.get"}, status=503, times=2))
    assert gce.routes.get(project=lab.project_id, route="cr-a").name == "cr-a"
    assert unavailable.fired == 2
    assert proxy.counts()["routes.get"] == 4


def test_concurrent_inserts_fill_the_quota_exactly(api: FakeComputeApi, lab: LabGceProject) -> None:
    api.set_route_quota(30)
    api.quota_in_operation = False

    def insert(worker: int) -> list[str]:
        gce = Gce(api.url)
        outcomes = []
        for i in range(10):
            try:
                gce.insert(lab, f"cr-{worker}-{i}", f"10.{worker}.{i}.0/24")
                outcomes.append("ok")
            except Forbidden as err:
                outcomes.append(err.reason)
        return outcomes

    with ThreadPoolExecutor(5) as pool:
        outcomes = [o for batch in pool.map(insert, range(5)) for o in batch]
    assert Counter(outcomes) == {"ok": 30, "QUOTA_EXCEEDED": 20}
    assert len(api.routes(lab.project_id)) == 30
    assert api.counts()["routes.insert"] == 50


def test_metadata_refuses_proxied_requests(metadata: FakeMetadataServer) -> None:
    answer = requests.get(
        f"{metadata.url}/computeMetadata/v1/instance/service-accounts/default/token",
        headers={"Metadata-Flavor": "Google", "X-Forwarded-For": "198.18.0.99"},
        timeout=5,
    )
    assert answer.status_code == 403
    assert "access_token" not in answer.text


def test_importing_the_lab_does_not_load_the_google_clients() -> None:
    """The host-gw demo imports the lab too; it must not pay for (or need) the Google SDKs."""
    script = (
        "import sys, cloudroutes.lab.gce; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'google', 'requests'}))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr


# -- a cluster's GCE --------------------------------------------------------------------------------

# What an agent on a VM does: google.auth.default() (credentials and project from the metadata
# server), then the Compute clients on the configured endpoint.
_AGENT = """
import json, sys
import google.auth
from google.api_core.client_options import ClientOptions
from google.cloud import compute_v1

credentials, project = google.auth.default()
options = ClientOptions(api_endpoint=sys.argv[1])
routes = compute_v1.RoutesClient(credentials=credentials, client_options=options)
operations = compute_v1.GlobalOperationsClient(credentials=credentials, client_options=options)
route = compute_v1.Route(name="cr-agent", network=sys.argv[2], dest_range="10.244.7.0/24",
                         next_hop_instance=sys.argv[3])
op = routes.insert_unary(project=project, route_resource=route)
done = operations.wait(project=project, operation=op.name)
listed = routes.list(request=compute_v1.ListRoutesRequest(project=project, filter="name eq cr-.*"))
print(json.dumps({"project": project, "status": done.status.name,
                  "routes": [r.name for r in listed]}))
"""


def _agent_on_node(
    gce_lab: GceLab, i: int, wrap: Sequence[str] = (), host_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``_AGENT`` as node i's agent (its command prefixed by ``wrap``) with the node's
    environment; return what it printed."""
    assert gce_lab.project is not None
    node = gce_lab.project.instances[i]
    env = gce_lab.node_env(i, host_env if host_env is not None else dict(os.environ))
    args = [gce_lab.api_url, gce_lab.project.network_path, node.self_link]
    result = subprocess.run(
        [*wrap, sys.executable, "-c", _AGENT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _check_agent_seen(gce_lab: GceLab, i: int, seen: dict[str, Any]) -> None:
    assert gce_lab.project is not None and gce_lab.proxy is not None
    assert seen == {"project": gce_lab.project.project_id, "status": "DONE", "routes": ["cr-agent"]}
    # The node asked its own metadata server only, and the API only through the proxy.
    assert [bool(m.hits) for m in gce_lab.metadata] == [
        k == i for k in range(len(gce_lab.metadata))
    ]
    assert gce_lab.metadata[i].hits["instance/service-accounts/default/token"] >= 1
    assert dict(gce_lab.proxy.counts().by_action) == {
        "routes.insert": 1,
        "globalOperations.wait": 1,
        "routes.list": 1,
    }
    assert gce_lab.api.counts() == gce_lab.proxy.counts().by_action


def test_gce_lab_gives_each_agent_its_vm_through_the_environment_alone() -> None:
    with GceLab(["198.18.0.10", "198.18.0.11"], can_ip_forward=[True, False]) as gce_lab:
        host_env = {"PATH": os.environ["PATH"], "GOOGLE_CLOUD_PROJECT": "not-this-one"}
        assert "GOOGLE_CLOUD_PROJECT" not in gce_lab.node_env(1, host_env)
        _check_agent_seen(gce_lab, 1, _agent_on_node(gce_lab, 1, host_env=host_env))
        assert gce_lab.api.require_token  # the agent's calls carried the metadata's token


@needs_root
@pytest.mark.root
def test_a_node_namespace_reaches_the_gce_lab_in_a_cloud_namespace(
    cloud_network: CloudNetwork,
) -> None:
    with GceLab([NODE_IP], host=CLOUD_HOST, netns=cloud_network.cloud.name) as gce_lab:
        assert gce_lab.api_url.startswith(f"http://{CLOUD_HOST}:")
        assert gce_lab.metadata[0].host_port.startswith(f"{CLOUD_HOST}:")
        wrap = ["ip", "netns", "exec", cloud_network.node.name]
        seen = _agent_on_node(gce_lab, 0, wrap=wrap)
        _check_agent_seen(gce_lab, 0, seen)

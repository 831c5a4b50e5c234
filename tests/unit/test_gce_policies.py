"""The shipped custom roles grant exactly the permissions the gce code's Compute calls need.

The calls are read from the source (every method called on a Compute client), so a new call
without its permission, or a permission nothing uses any more, fails here and not on a node.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from google.cloud import compute_v1

from providers.gce_api import PERMISSIONS
from tests.policy_scan import POLICIES, PROVIDERS, calls_in, syntax

SOURCES = [PROVIDERS / name for name in ("gce.py", "gce_api.py", "gce_route_table.py")]
NODE = POLICIES / "gce-node.json"
CONTROLLER = POLICIES / "gce-controller.json"
# ComputeClients' fields, the client class behind each, and the API's name for its resource.
CLIENTS = {
    "routes": (compute_v1.RoutesClient, "routes"),
    "operations": (compute_v1.GlobalOperationsClient, "globalOperations"),
    "instances": (compute_v1.InstancesClient, "instances"),
}


def called_methods(path: Path) -> set[str]:
    """``x.routes.insert_unary(...)`` and the like, as API methods (``routes.insert``)."""
    found = set()
    for node in syntax(path):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Attribute) and owner.attr in CLIENTS):
            continue
        client, resource = CLIENTS[owner.attr]
        method = node.func.attr
        assert hasattr(client, method), f"{path.name}: {client.__name__} has no {method}"
        found.add(f"{resource}.{method.removesuffix('_unary')}")
    return found


def needed() -> set[str]:
    calls = calls_in(SOURCES, called_methods)
    missing = calls - PERMISSIONS.keys()
    assert not missing, f"no permission known for {sorted(missing)}"
    return {permission for call in calls for permission in PERMISSIONS[call]}


def granted(path: Path) -> list[str]:
    role = json.loads(path.read_text())
    assert isinstance(role["title"], str) and role["title"]
    permissions = role["includedPermissions"]
    assert all(isinstance(p, str) and "*" not in p for p in permissions), path.name
    return permissions


def test_the_source_calls_the_compute_methods_it_should() -> None:
    calls = calls_in(SOURCES, called_methods)
    assert calls == {
        "routes.list",
        "routes.get",
        "routes.insert",
        "routes.delete",
        "globalOperations.get",
        "globalOperations.wait",
        "instances.get",
    }


def test_each_role_grants_exactly_what_the_code_calls() -> None:
    # Both modes make the same calls: in node mode an agent inserts its own route and the
    # elected one deletes others'; in cluster mode the writer does both, for every node.
    for path in (NODE, CONTROLLER):
        permissions = granted(path)
        assert len(permissions) == len(set(permissions)), f"{path.name} lists one twice"
        assert set(permissions) == needed(), path.name


def test_inserting_a_route_needs_the_network_and_the_next_hop_too() -> None:
    assert set(PERMISSIONS["routes.insert"]) == {
        "compute.routes.create",
        "compute.networks.updatePolicy",
        "compute.instances.use",
    }

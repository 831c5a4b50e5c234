"""The shipped RAM policies grant exactly the VPC actions the ali-vpc code calls.

The calls are read from the source (every aliyunsdkvpc request class it imports), so a new call
without its permission, or a permission nothing uses any more, fails here and not on a node.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from tests.policy_scan import POLICIES, PROVIDERS, allowed_actions, calls_in, syntax

SOURCES = [PROVIDERS / "ali_vpc.py", PROVIDERS / "ali_route_table.py"]
NODE = POLICIES / "ali-vpc-node.json"
CONTROLLER = POLICIES / "ali-vpc-controller.json"
REQUESTS = "aliyunsdkvpc.request.v20160428."


def called_actions(path: Path) -> set[str]:
    """``vpc:<Action>`` for each request class imported from aliyunsdkvpc."""
    found = set()
    for node in syntax(path):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aliyunsdkvpc"):
            assert (node.module or "").startswith(REQUESTS), f"{path.name}: {node.module}"
            for alias in node.names:
                assert alias.name.endswith("Request"), f"{path.name}: {alias.name}"
                module_action = (node.module or "").rsplit(".", 1)[-1].removesuffix("Request")
                action = alias.name.removesuffix("Request")
                assert action == module_action, f"{path.name}: {alias.name} from {node.module}"
                found.add(f"vpc:{action}")
    return found


def test_the_source_calls_the_vpc_actions_it_should() -> None:
    calls = calls_in(SOURCES, called_actions)
    assert calls == {
        "vpc:DescribeRouteEntryList",
        "vpc:CreateRouteEntries",
        "vpc:DeleteRouteEntries",
        "vpc:ModifyRouteEntry",
        "vpc:DescribeVpcs",
        "vpc:DescribeVRouters",
    }


def test_the_request_classes_exist_in_the_sdk() -> None:
    import importlib

    for action in calls_in(SOURCES, called_actions):
        name = action.removeprefix("vpc:") + "Request"
        module = importlib.import_module(REQUESTS + name)
        assert getattr(module, name)().get_action_name() == action.removeprefix("vpc:")


def test_both_policies_grant_exactly_what_the_code_calls() -> None:
    for path in (NODE, CONTROLLER):
        assert json.loads(path.read_text())["Version"] == "1"  # RAM's policy language
    # A controller finds the table as a node does (from its own instance's VPC), and writes
    # every route: both need the same actions.
    calls = calls_in(SOURCES, called_actions)
    assert allowed_actions(NODE) == calls
    assert allowed_actions(CONTROLLER) == calls

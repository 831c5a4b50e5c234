"""The shipped IAM policies grant exactly the EC2 actions the aws-vpc code calls.

The calls are read from the source (every method called on an EC2 client), so a new call
without its permission, or a permission nothing uses any more, fails here and not on a node.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from botocore import xform_name
from botocore.session import get_session

from tests.policy_scan import POLICIES, PROVIDERS, allowed_actions, calls_in, syntax

SOURCES = [PROVIDERS / "aws_vpc.py", PROVIDERS / "aws_route_table.py"]
NODE = POLICIES / "aws-vpc-node.json"
CONTROLLER = POLICIES / "aws-vpc-controller.json"
# Called only by an agent on its own instance, never by a cluster-mode controller.
NODE_ONLY = {"ec2:ModifyNetworkInterfaceAttribute"}


def _operations() -> dict[str, str]:
    model = get_session().get_service_model("ec2")
    return {xform_name(name): name for name in model.operation_names}


def _is_ec2_client(node: ast.expr) -> bool:
    """``self._ec2``, ``ec2``, ``self.ec2()``: how the provider names its EC2 clients."""
    if isinstance(node, ast.Attribute) and node.attr == "_ec2":
        return True
    if isinstance(node, ast.Name) and node.id == "ec2":
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "ec2"
        and not node.args
    )


def called_actions(path: Path) -> set[str]:
    operations = _operations()
    found = set()
    for node in syntax(path):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and _is_ec2_client(node.func.value)
        ):
            method = node.func.attr
            assert method in operations, f"{path.name}: {method} is not an EC2 operation"
            found.add(f"ec2:{operations[method]}")
    return found


def test_the_source_calls_the_ec2_actions_it_should() -> None:
    calls = calls_in(SOURCES, called_actions)
    assert calls == {
        "ec2:DescribeRouteTables",
        "ec2:CreateRoute",
        "ec2:ReplaceRoute",
        "ec2:DeleteRoute",
        "ec2:DescribeNetworkInterfaces",
        "ec2:ModifyNetworkInterfaceAttribute",
    }


def test_node_policy_grants_exactly_what_the_code_calls() -> None:
    calls = calls_in(SOURCES, called_actions)
    assert allowed_actions(NODE) == calls


def test_controller_policy_grants_what_cluster_mode_calls_and_nothing_more() -> None:
    calls = calls_in(SOURCES, called_actions)
    assert allowed_actions(CONTROLLER) == calls - NODE_ONLY
    # Only the agent's prepare() touches an interface attribute.
    assert called_actions(PROVIDERS / "aws_route_table.py").isdisjoint(NODE_ONLY)


def test_route_writes_are_limited_to_route_tables() -> None:
    for path in (NODE, CONTROLLER):
        for statement in json.loads(path.read_text())["Statement"]:
            actions = statement["Action"]
            if any(
                a in ("ec2:CreateRoute", "ec2:ReplaceRoute", "ec2:DeleteRoute") for a in actions
            ):
                assert statement["Resource"] == "arn:aws:ec2:*:*:route-table/*", path.name

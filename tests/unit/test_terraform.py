"""The terraform modules under terraform/, checked offline.

Providers cannot be downloaded here, so a module is checked three ways: ``terraform fmt``, a
parse of every ``.tf`` file with python-hcl2 (what the module asks the cloud for), and a render
of its user-data template by terraform itself (what a node boots with).

The helpers at the top take a module directory and know no cloud, so the GCE and Alibaba
modules reuse them: add a test that calls ``load_module(TERRAFORM / "gce")``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2 import SerializationOptions

from cloudroutes.config import parse_config

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "terraform"
AWS = TERRAFORM / "aws"

# Plain dicts: strings without their quotes, a block is a dict (a list when repeated).
PLAIN = SerializationOptions(strip_string_quotes=True, explicit_blocks=False)
# Quotes kept, so that a value can be written back as HCL: "text" is a string, ${x} is x.
AS_WRITTEN = SerializationOptions(explicit_blocks=False)


# --- helpers for every module ---------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    """The top-level blocks of every .tf file of one directory, merged."""

    path: Path
    blocks: dict[str, list[dict[str, Any]]]

    def resources(self, kind: str) -> dict[str, dict[str, Any]]:
        """Resources of one type by name, e.g. ``resources("aws_instance")["node"]``."""
        found: dict[str, dict[str, Any]] = {}
        for block in self.blocks.get("resource", []):
            for label, named in block.items():
                if _unquoted(label) == kind:
                    found.update({_unquoted(name): body for name, body in named.items()})
        return found

    def named(self, block_type: str) -> dict[str, dict[str, Any]]:
        """Labelled blocks such as variable or output, by label."""
        found: dict[str, dict[str, Any]] = {}
        for block in self.blocks.get(block_type, []):
            found.update({_unquoted(label): body for label, body in block.items()})
        return found

    def locals(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for block in self.blocks.get("locals", []):
            merged.update({k: v for k, v in block.items() if k != "__comments__"})
        return merged


def _unquoted(label: str) -> str:
    # AS_WRITTEN keeps the quotes of block labels too.
    return label.strip('"')


def load_module(path: Path, options: SerializationOptions = PLAIN) -> Module:
    blocks: dict[str, list[dict[str, Any]]] = {}
    files = sorted(path.glob("*.tf"))
    assert files, f"no .tf files in {path}"
    for tf in files:
        with tf.open() as fh:
            parsed = hcl2.load(fh, serialization_options=options)
        for block_type, entries in parsed.items():
            if block_type != "__comments__":
                blocks.setdefault(block_type, []).extend(entries)
    return Module(path, blocks)


# `file("${path.module}/REL")` as python-hcl2 gives it back: one call and nothing else.
_FILE_CALL = re.compile(r'\$\{file\("\$\{path\.module\}/(?P<rel>[^"]+)"\)\}')
_PATH_REFERENCE = re.compile(r'\b(?:file|templatefile)\("\$\{path\.module\}/(?P<rel>[^"]+)"')


def file_reference(value: object) -> str | None:
    """The path REL when ``value`` is exactly ``file("${path.module}/REL")``, else None."""
    match = _FILE_CALL.fullmatch(value) if isinstance(value, str) else None
    return match["rel"] if match else None


def referenced_paths(module: Path) -> set[str]:
    """Every path a module reads with file() or templatefile(), relative to the module."""
    found: set[str] = set()
    for tf in module.glob("*.tf"):
        found.update(m["rel"] for m in _PATH_REFERENCE.finditer(tf.read_text()))
    return found


def _shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def read_policy(module: Path, rel: str) -> dict[str, Any]:
    """The IAM-style policy document a module references, checked to be one."""
    path = (module / rel).resolve()
    shown, reader = _shown(path), _shown(module)
    if not path.is_file():
        pytest.fail(
            f"{shown} is missing: {reader} reads it with file(); "
            "the provider ships it (never copy it into terraform/)"
        )
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        pytest.fail(f"{shown} is not valid JSON: {exc}")
    assert isinstance(document, dict), f"{shown}: a policy document is a JSON object"
    statements = document.get("Statement")
    assert isinstance(statements, list) and statements, f"{shown}: no Statement list"
    for statement in statements:
        assert isinstance(statement, dict), f"{shown}: a statement is a JSON object"
        assert statement.get("Effect") in ("Allow", "Deny"), f"{shown}: bad Effect in {statement}"
        assert statement.get("Action"), f"{shown}: a statement without Action: {statement}"
    return document


_CREDENTIALS = [
    ("an AWS access key id", re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b")),
    ("an Alibaba Cloud AccessKey id", re.compile(r"\bLTAI[0-9A-Za-z]{12,20}\b")),
    ("a private key", re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")),
    (
        "a literal secret attribute",
        re.compile(
            r"""(?ix)\b(access_key|secret_key|secret_access_key|access_key_secret|token
                |session_token|password|credentials)\s*=\s*"(?!\$\{)[^"]+\""""
        ),
    ),
]


def hardcoded_credentials(text: str) -> list[str]:
    """What in ``text`` looks like a credential written into the code (empty: none)."""
    return [
        f"{what}: {match.group(0)[:12]}..."
        for what, pattern in _CREDENTIALS
        for match in pattern.finditer(text)
    ]


def module_texts(root: Path) -> dict[Path, str]:
    return {
        path: path.read_text()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".terraform" not in path.parts
    }


def terraform(tmp_path: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the terraform CLI offline: no update check, an empty CLI config."""
    binary = shutil.which("terraform")
    if binary is None:
        pytest.skip(
            "the terraform binary is not installed (https://developer.hashicorp.com/terraform/install)"
        )
    cli_config = tmp_path / "terraformrc"
    cli_config.touch()
    env = {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",
        "TF_CLI_CONFIG_FILE": str(cli_config),
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
    }
    return subprocess.run(
        [binary, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def as_hcl(value: str) -> str:
    """A value parsed with AS_WRITTEN, back as HCL source: ``${x}`` is the expression x."""
    if value.startswith("${") and value.endswith("}"):
        return value[2:-1]
    return value


# --- every module -----------------------------------------------------------------------------


def test_terraform_files_are_formatted(tmp_path: Path) -> None:
    result = terraform(tmp_path, "fmt", "-check", "-recursive", "-diff", str(TERRAFORM), cwd=REPO)
    assert result.returncode == 0, f"run `terraform fmt -recursive terraform/`:\n{result.stdout}"


def test_no_credentials_are_written_into_terraform_or_localstack() -> None:
    for path, text in {**module_texts(TERRAFORM), **module_texts(REPO / "localstack")}.items():
        assert hardcoded_credentials(text) == [], path.relative_to(REPO)


@pytest.mark.parametrize(
    "text",
    [
        'provider "aws" {\n  access_key = "AKIAIOSFODNN7EXAMPLE"\n}',
        'provider "aws" {\n  secret_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"\n}',
        'provider "alicloud" {\n  access_key = "LTAI5tExampleExample12"\n}',
        'credentials = "-----BEGIN PRIVATE KEY-----"',
    ],
)
def test_credential_check_finds_a_written_credential(text: str) -> None:
    assert hardcoded_credentials(text)


def test_credential_check_accepts_references() -> None:
    assert hardcoded_credentials('access_key = var.access_key\ntoken = "${var.token}"') == []


@pytest.mark.parametrize("module", sorted(p for p in TERRAFORM.iterdir() if p.is_dir()))
def test_every_file_a_module_reads_exists(module: Path) -> None:
    missing = [rel for rel in sorted(referenced_paths(module)) if not (module / rel).is_file()]
    assert missing == [], f"terraform/{module.name} reads files that do not exist"


@pytest.mark.parametrize(
    ("value", "rel"),
    [
        (
            '${file("${path.module}/../../providers/policies/p.json")}',
            "../../providers/policies/p.json",
        ),
        ('${jsonencode({Version = "2012-10-17", Statement = []})}', None),
        ('${file("/etc/p.json")}', None),
        ('${replace(file("${path.module}/p.json"), "a", "b")}', None),
    ],
)
def test_file_reference_accepts_only_a_plain_file_call(value: str, rel: str | None) -> None:
    assert file_reference(value) == rel


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (None, "is missing"),
        ("{not json", "is not valid JSON"),
        ('{"Version": "2012-10-17", "Statement": []}', "no Statement list"),
        ('{"Statement": [{"Effect": "Allow"}]}', "a statement without Action"),
    ],
)
def test_read_policy_refuses_what_is_not_a_policy(
    tmp_path: Path, text: str | None, error: str
) -> None:
    if text is not None:
        (tmp_path / "policy.json").write_text(text)
    with pytest.raises((AssertionError, pytest.fail.Exception), match=error):
        read_policy(tmp_path, "policy.json")


# --- terraform/aws --------------------------------------------------------------------------

NODE_POLICY = "../../providers/policies/aws-vpc-node.json"
CONTROLLER_POLICY = "../../providers/policies/aws-vpc-controller.json"


@pytest.fixture(scope="module")
def aws() -> Module:
    return load_module(AWS)


def test_aws_node_role_policy_is_the_providers_policy_file(aws: Module) -> None:
    policies = aws.resources("aws_iam_role_policy")
    node = policies["node"]
    assert node["role"] == "${aws_iam_role.node.id}"
    # A reference to the file the provider ships, not an inline copy that can drift from it.
    assert file_reference(node["policy"]) == NODE_POLICY, node["policy"]
    read_policy(AWS, NODE_POLICY)


def test_aws_controller_role_policy_is_the_providers_policy_file(aws: Module) -> None:
    controller = aws.resources("aws_iam_role_policy")["controller"]
    assert controller["role"] == "${aws_iam_role.controller[0].id}"
    assert file_reference(controller["policy"]) == CONTROLLER_POLICY, controller["policy"]
    read_policy(AWS, CONTROLLER_POLICY)


def test_aws_every_role_policy_comes_from_providers_policies(aws: Module) -> None:
    for name, policy in aws.resources("aws_iam_role_policy").items():
        rel = file_reference(policy["policy"])
        assert rel is not None and rel.startswith("../../providers/policies/"), (
            f"aws_iam_role_policy.{name} must read providers/policies/*.json with file()"
        )


def test_aws_nodes_run_with_the_node_role_and_forward_for_their_pods(aws: Module) -> None:
    instances = aws.resources("aws_instance")
    assert instances, "no aws_instance in terraform/aws"
    for name, instance in instances.items():
        assert instance["source_dest_check"] is False, f"aws_instance.{name}"
        assert instance["iam_instance_profile"] == "${aws_iam_instance_profile.node.name}"
        assert instance["metadata_options"][0]["http_tokens"] == "required", "IMDSv2 only"
    assert aws.resources("aws_iam_instance_profile")["node"]["role"] == "${aws_iam_role.node.name}"
    assert aws.named("variable")["node_count"]["default"] == 3


def test_aws_route_table_is_associated_and_has_no_inline_routes(aws: Module) -> None:
    table = aws.resources("aws_route_table")["nodes"]
    # Inline route blocks would make terraform delete the routes cloudroutes adds.
    assert "route" not in table
    association = aws.resources("aws_route_table_association")["nodes"]
    assert association["route_table_id"] == "${aws_route_table.nodes.id}"
    assert association["subnet_id"] == "${aws_subnet.nodes.id}"


def test_aws_security_group_admits_etcd_and_pod_traffic(aws: Module) -> None:
    rules = aws.resources("aws_vpc_security_group_ingress_rule")
    etcd = [r for r in rules.values() if r.get("from_port") == 2379 and r.get("to_port") == 2379]
    assert etcd and all(r["cidr_ipv4"] == "${var.vpc_cidr}" for r in etcd)
    pods = [r for r in rules.values() if r.get("cidr_ipv4") == "${var.pod_network}"]
    assert pods and pods[0]["ip_protocol"] == "-1"
    assert aws.named("variable")["pod_network"]["default"] == "10.244.0.0/16"


def test_aws_outputs_name_the_route_table_and_nodes(aws: Module) -> None:
    assert {"route_table_id", "instance_ids", "private_ips"} <= set(aws.named("output"))


# What the user-data render replaces: attributes known only after apply, and the module path.
_RENDER_STANDINS = {
    r"\baws_route_table\.nodes\.id\b": '"rtb-0123456789abcdef0"',
    r"\bcount\.index\b": "i",
}


def aws_harness(tmp_path: Path) -> Path:
    """A provider-free copy of terraform/aws that terraform can apply offline: its variables,
    its locals, and its instances' templatefile() call as outputs (one per node)."""
    module = load_module(AWS, AS_WRITTEN)
    user_data = as_hcl(module.resources("aws_instance")["node"]["user_data"])
    lines = [f"  {name} = {as_hcl(value)}" for name, value in module.locals().items()]
    harness = "locals {\n" + "\n".join(lines) + "\n}\n"
    harness += (
        'output "node_ips" {\n  value = local.node_ips\n}\n'
        'output "user_data" {\n'
        f"  value = [for i in range(var.node_count) : {user_data}]\n}}\n"
    )
    for pattern, standin in _RENDER_STANDINS.items():
        harness = re.sub(pattern, standin, harness)
    harness = harness.replace("${path.module}", str(AWS))
    work = tmp_path / "harness"
    work.mkdir()
    shutil.copy(AWS / "variables.tf", work)
    (work / "harness.tf").write_text(harness)
    result = terraform(tmp_path, "init", "-backend=false", cwd=work)
    assert result.returncode == 0, f"terraform init:\n{result.stderr}\n{harness}"
    return work


def render_aws_user_data(tmp_path: Path, *variables: str) -> tuple[list[str], list[str]]:
    """Every node's private IP and user data, for the module's defaults and ``-var`` values."""
    work = aws_harness(tmp_path)
    args = [f"-var={v}" for v in variables]
    result = terraform(tmp_path, "apply", "-auto-approve", *args, cwd=work)
    assert result.returncode == 0, f"terraform apply:\n{result.stderr}"
    result = terraform(tmp_path, "output", "-json", cwd=work)
    outputs = json.loads(result.stdout)
    return outputs["node_ips"]["value"], outputs["user_data"]["value"]


def heredoc(script: str, marker: str) -> str:
    match = re.search(rf"<<'{marker}'\n(.*?)\n{marker}\n", script, re.S)
    assert match, f"no <<'{marker}' document in the user data"
    return match.group(1)


def test_aws_user_data_runs_etcd_on_the_first_node_and_the_agent_everywhere(
    tmp_path: Path,
) -> None:
    ips, scripts = render_aws_user_data(tmp_path)
    assert len(scripts) == 3
    assert ips == ["10.0.1.10", "10.0.1.11", "10.0.1.12"]
    endpoint = f"http://{ips[0]}:2379"
    for index, script in enumerate(scripts):
        syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert syntax.returncode == 0, f"node {index} user data: {syntax.stderr}"
        assert "pip install -q 'cloudroutes[aws]'" in script
        assert f"cloudroutes agent --etcd-endpoints={endpoint} " in script
        assert "systemctl enable --now cloudroutes.service" in script
        first = index == 0
        assert ("etcd-server" in script) is first, f"node {index}: etcd only on the first node"
        assert ("cloudroutes config set" in script) is first, f"node {index}: config set once"

    config = parse_config(heredoc(scripts[0], "CONF"), source="user data")
    assert config.backend_type == "aws-vpc"
    assert config.backend.get("Mode") == "node"
    assert config.backend.get("RouteTableID") == "rtb-0123456789abcdef0"
    assert str(config.network) == "10.244.0.0/16"
    # The agent's unit is the project's own, not a copy kept in terraform/.
    assert (
        heredoc(scripts[1], "UNIT").strip()
        == (REPO / "deploy/cloudroutes.service").read_text().strip()
    )


def test_aws_one_node_cluster_runs_etcd_and_agent_on_it(tmp_path: Path) -> None:
    ips, scripts = render_aws_user_data(tmp_path, "node_count=1", "mode=cluster")
    assert ips == ["10.0.1.10"]
    (script,) = scripts
    assert "cloudroutes agent --etcd-endpoints=http://10.0.1.10:2379 " in script
    assert parse_config(heredoc(script, "CONF")).backend.get("Mode") == "cluster"


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("mode=nodes", "The mode must be node or cluster."),
        ("node_count=0", "The node_count must be a whole number from 1 to 40"),
        ("first_node_host=2", "AWS reserves the first four addresses"),
        ("cluster_name=Prod_1", "The cluster_name must be 1-31 characters"),
    ],
)
def test_aws_module_refuses_bad_variables_with_a_clear_message(
    tmp_path: Path, variable: str, message: str
) -> None:
    work = aws_harness(tmp_path)
    result = terraform(tmp_path, "plan", "-no-color", f"-var={variable}", cwd=work)
    assert result.returncode != 0
    assert message in " ".join(result.stderr.split())

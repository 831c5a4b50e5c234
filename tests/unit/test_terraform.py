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


# --- terraform/gcp and terraform/alicloud -------------------------------------------------------

GCP = TERRAFORM / "gcp"
ALICLOUD = TERRAFORM / "alicloud"
GCE_NODE_ROLE = "../../providers/policies/gce-node.json"
GCE_CONTROLLER_ROLE = "../../providers/policies/gce-controller.json"
ALI_NODE_POLICY = "../../providers/policies/ali-vpc-node.json"
ALI_CONTROLLER_POLICY = "../../providers/policies/ali-vpc-controller.json"

# `jsondecode(file("${path.module}/REL")).includedPermissions` as python-hcl2 gives it back.
_INCLUDED_PERMISSIONS = re.compile(
    r'\$\{jsondecode\(file\("\$\{path\.module\}/(?P<rel>[^"]+)"\)\)\.includedPermissions\}'
)
_GCE_PERMISSION = re.compile(r"compute\.[A-Za-z]+\.[A-Za-z]+")
_RAM_ACTION = re.compile(r"[a-z][a-z0-9-]*:[A-Za-z0-9*]+")
# Provider arguments that would put a credential (or the path of one) into the module.
_PROVIDER_CREDENTIALS = {
    "credentials",
    "access_token",
    "access_key",
    "secret_key",
    "security_token",
    "credentials_uri",
    "shared_credentials_file",
}


def included_permissions_reference(value: object) -> str | None:
    """The path REL when ``value`` is exactly
    ``jsondecode(file("${path.module}/REL")).includedPermissions``, else None."""
    match = _INCLUDED_PERMISSIONS.fullmatch(value) if isinstance(value, str) else None
    return match["rel"] if match else None


def read_custom_role(module: Path, rel: str) -> list[str]:
    """The permissions of the GCE custom-role definition a module references, checked."""
    path = (module / rel).resolve()
    shown = _shown(path)
    if not path.is_file():
        pytest.fail(
            f"{shown} is missing: {_shown(module)} reads it with file(); "
            "the provider ships it (never copy it into terraform/)"
        )
    try:
        role = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        pytest.fail(f"{shown} is not valid JSON: {exc}")
    assert isinstance(role, dict), f"{shown}: a custom role is a JSON object"
    permissions = role.get("includedPermissions")
    assert isinstance(permissions, list) and permissions, f"{shown}: no includedPermissions list"
    bad = [p for p in permissions if not isinstance(p, str) or not _GCE_PERMISSION.fullmatch(p)]
    assert bad == [], f"{shown}: not compute.<resource>.<verb> permissions: {bad}"
    return permissions


def ram_actions(statement: dict[str, Any]) -> list[Any]:
    """A statement's Action, which a RAM policy may write as one string or a list."""
    action = statement["Action"]
    return action if isinstance(action, list) else [action]


def read_ram_policy(module: Path, rel: str) -> dict[str, Any]:
    """The Alibaba RAM policy document a module references, checked to be one."""
    document = read_policy(module, rel)
    shown = _shown((module / rel).resolve())
    assert document.get("Version") == "1", f'{shown}: a RAM policy document has "Version": "1"'
    actions = [action for statement in document["Statement"] for action in ram_actions(statement)]
    bad = [a for a in actions if not isinstance(a, str) or not _RAM_ACTION.fullmatch(a)]
    assert bad == [], (
        f"{shown}: actions are written service:Action, e.g. vpc:CreateRouteEntry: {bad}"
    )
    assert any(a.startswith("vpc:") for a in actions), f"{shown}: no vpc: action"
    return document


@dataclass(frozen=True)
class NodeBoot:
    """Where a module's nodes get their boot script, and what an offline render stands in for."""

    module: Path
    instance: str  # resource type of the nodes
    script: str  # the attribute holding their boot script
    # (pattern, HCL value): attributes known only after apply, and the loop variable.
    standins: tuple[tuple[str, str], ...]
    variables: tuple[str, ...] = ()  # -var values the module requires


@dataclass(frozen=True)
class RenderedBoot:
    node_ips: list[str]
    scripts: list[str]
    locals: dict[str, Any]


GCP_BOOT = NodeBoot(
    GCP,
    "google_compute_instance",
    "metadata_startup_script",
    standins=((r"\bcount\.index\b", "i"),),
    variables=("project=cloudroutes-test-project",),
)
ALICLOUD_BOOT = NodeBoot(
    ALICLOUD,
    "alicloud_instance",
    "user_data",
    standins=(
        (r"\balicloud_vpc\.cluster\.route_table_id\b", '"vtb-0123456789abcdef0"'),
        (r"\bdata\.alicloud_zones\.available\.zones\[0\]\.id\b", '"eu-central-1a"'),
        (r"\bcount\.index\b", "i"),
    ),
)


def boot_harness(tmp_path: Path, boot: NodeBoot) -> Path:
    """A provider-free copy of a module that terraform applies offline: its variables, its
    locals (each also an output, ``local_<name>``) and its nodes' boot scripts (``scripts``)."""
    module = load_module(boot.module, AS_WRITTEN)
    script = as_hcl(module.resources(boot.instance)["node"][boot.script])
    names = list(module.locals())
    harness = "locals {\n"
    harness += "".join(f"  {name} = {as_hcl(value)}\n" for name, value in module.locals().items())
    harness += "}\n"
    harness += "".join(f'output "local_{name}" {{\n  value = local.{name}\n}}\n' for name in names)
    harness += f'output "scripts" {{\n  value = [for i in range(var.node_count) : {script}]\n}}\n'
    for pattern, standin in boot.standins:
        harness = re.sub(pattern, standin, harness)
    harness = harness.replace("${path.module}", str(boot.module))
    work = tmp_path / f"{boot.module.name}-harness"
    work.mkdir()
    (work / "variables.tf").write_text((boot.module / "variables.tf").read_text())
    (work / "harness.tf").write_text(harness)
    init = terraform(tmp_path, "init", "-backend=false", cwd=work)
    assert init.returncode == 0, f"terraform init:\n{init.stderr}\n{harness}"
    return work


def render_boot(tmp_path: Path, boot: NodeBoot, *variables: str) -> RenderedBoot:
    """Every node's address and boot script, for the module's defaults and ``-var`` values."""
    work = boot_harness(tmp_path, boot)
    args = [f"-var={v}" for v in (*boot.variables, *variables)]
    applied = terraform(tmp_path, "apply", "-auto-approve", *args, cwd=work)
    assert applied.returncode == 0, f"terraform apply:\n{applied.stderr}"
    outputs = json.loads(terraform(tmp_path, "output", "-json", cwd=work).stdout)
    values = {
        name.removeprefix("local_"): output["value"]
        for name, output in outputs.items()
        if name.startswith("local_")
    }
    return RenderedBoot(values["node_ips"], outputs["scripts"]["value"], values)


@pytest.fixture(scope="module")
def gcp() -> Module:
    return load_module(GCP)


@pytest.fixture(scope="module")
def alicloud() -> Module:
    return load_module(ALICLOUD)


@pytest.mark.parametrize("module", [GCP, ALICLOUD], ids=lambda p: p.name)
def test_gcp_and_alicloud_modules_are_formatted(tmp_path: Path, module: Path) -> None:
    result = terraform(tmp_path, "fmt", "-check", "-recursive", "-diff", str(module), cwd=REPO)
    assert result.returncode == 0, f"run `terraform fmt {_shown(module)}`:\n{result.stdout}"


@pytest.mark.parametrize("module", [GCP, ALICLOUD], ids=lambda p: p.name)
def test_gcp_and_alicloud_modules_hold_no_credentials(module: Path) -> None:
    texts = module_texts(module)
    assert any(path.suffix == ".tf" for path in texts), f"no .tf files in {_shown(module)}"
    for path, text in texts.items():
        assert hardcoded_credentials(text) == [], _shown(path)
    for name, provider in load_module(module).named("provider").items():
        written = sorted(set(provider) & _PROVIDER_CREDENTIALS)
        assert written == [], (
            f"provider {name} of {_shown(module)} sets {written}: "
            "credentials come from the user's environment"
        )


@pytest.mark.parametrize(
    ("value", "rel"),
    [
        (
            '${jsondecode(file("${path.module}/../../providers/policies/r.json"))'
            ".includedPermissions}",
            "../../providers/policies/r.json",
        ),
        ('${["compute.routes.list"]}', None),
        ('${jsondecode(file("${path.module}/r.json")).title}', None),
        ('${concat(jsondecode(file("${path.module}/r.json")).includedPermissions, [])}', None),
    ],
)
def test_included_permissions_reference_accepts_only_the_files_permissions(
    value: str, rel: str | None
) -> None:
    assert included_permissions_reference(value) == rel


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (None, "is missing"),
        ("{not json", "is not valid JSON"),
        ('{"title": "t", "includedPermissions": []}', "no includedPermissions list"),
        ('{"includedPermissions": ["compute.routes.list", "iam.roles.get"]}', "iam.roles.get"),
    ],
)
def test_read_custom_role_refuses_what_is_not_a_compute_role(
    tmp_path: Path, text: str | None, error: str
) -> None:
    if text is not None:
        (tmp_path / "role.json").write_text(text)
    with pytest.raises((AssertionError, pytest.fail.Exception), match=error):
        read_custom_role(tmp_path, "role.json")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (None, "is missing"),
        (
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "vpc:X"}]}',
            '"Version": "1"',
        ),
        (
            '{"Version": "1", "Statement": [{"Effect": "Allow", "Action": ["vpc X"]}]}',
            "service:Action",
        ),
        (
            '{"Version": "1", "Statement": [{"Effect": "Allow", "Action": "ecs:DescribeInstances"}]}',
            "no vpc: action",
        ),
    ],
)
def test_read_ram_policy_refuses_what_is_not_a_vpc_policy(
    tmp_path: Path, text: str | None, error: str
) -> None:
    if text is not None:
        (tmp_path / "policy.json").write_text(text)
    with pytest.raises((AssertionError, pytest.fail.Exception), match=error):
        read_ram_policy(tmp_path, "policy.json")


# --- terraform/gcp ------------------------------------------------------------------------------


def test_gcp_node_role_is_the_providers_role_file_bound_to_the_node_account(gcp: Module) -> None:
    role = gcp.resources("google_project_iam_custom_role")["node"]
    # A reference to the file the provider ships, not an inline copy that can drift from it.
    assert included_permissions_reference(role["permissions"]) == GCE_NODE_ROLE, role["permissions"]
    binding = gcp.resources("google_project_iam_member")["node"]
    assert binding["role"] == "${google_project_iam_custom_role.node.name}"
    assert binding["member"] == "serviceAccount:${google_service_account.node.email}"
    assert binding["project"] == "${var.project}"
    read_custom_role(GCP, GCE_NODE_ROLE)


def test_gcp_controller_role_is_the_providers_role_file(gcp: Module) -> None:
    role = gcp.resources("google_project_iam_custom_role")["controller"]
    assert role["count"] == "${var.controller_role ? 1 : 0}"
    assert included_permissions_reference(role["permissions"]) == GCE_CONTROLLER_ROLE
    binding = gcp.resources("google_project_iam_member")["controller"]
    assert binding["role"] == "${google_project_iam_custom_role.controller[0].name}"
    assert binding["member"] == "serviceAccount:${google_service_account.controller[0].email}"
    read_custom_role(GCP, GCE_CONTROLLER_ROLE)


def test_gcp_node_role_holds_what_an_elected_agent_needs_in_cluster_mode() -> None:
    # In Mode cluster every agent is a candidate, and the elected one writes every route.
    node = set(read_custom_role(GCP, GCE_NODE_ROLE))
    missing = set(read_custom_role(GCP, GCE_CONTROLLER_ROLE)) - node
    assert missing == set(), f"gce-node.json lacks what Mode cluster needs: {sorted(missing)}"


def test_gcp_every_custom_role_comes_from_providers_policies(gcp: Module) -> None:
    for name, role in gcp.resources("google_project_iam_custom_role").items():
        rel = included_permissions_reference(role["permissions"])
        assert rel is not None and rel.startswith("../../providers/policies/gce-"), (
            f"google_project_iam_custom_role.{name} must take includedPermissions of "
            "providers/policies/gce-*.json with jsondecode(file())"
        )


def test_gcp_nodes_forward_for_their_pods_as_the_node_account(gcp: Module) -> None:
    instances = gcp.resources("google_compute_instance")
    assert instances, "no google_compute_instance in terraform/gcp"
    for name, instance in instances.items():
        assert instance["can_ip_forward"] is True, f"google_compute_instance.{name}"
        (account,) = instance["service_account"]
        assert account["email"] == "${google_service_account.node.email}"
        assert account["scopes"] == ["cloud-platform"]
        assert instance["tags"] == ["${local.node_tag}"], "the firewall rules target this tag"
    assert gcp.named("variable")["node_count"]["default"] == 3


def test_gcp_firewall_admits_etcd_health_and_pod_traffic_to_the_nodes(gcp: Module) -> None:
    rules = gcp.resources("google_compute_firewall")
    for name, rule in rules.items():
        assert rule["target_tags"] == ["${local.node_tag}"], f"google_compute_firewall.{name}"
        assert rule["network"] == "${google_compute_network.cluster.id}"
    etcd = [r for r in rules.values() if r["allow"] == [{"protocol": "tcp", "ports": ["2379"]}]]
    assert etcd and all(r["source_ranges"] == ["${var.subnet_cidr}"] for r in etcd)
    healthz = [r for r in rules.values() if "${tostring(var.healthz_port)}" in str(r["allow"])]
    assert healthz and all(r["source_ranges"] == ["${var.subnet_cidr}"] for r in healthz)
    pods = [r for r in rules.values() if r.get("source_ranges") == ["${var.pod_network}"]]
    assert pods and pods[0]["allow"] == [{"protocol": "all"}]
    assert gcp.named("variable")["pod_network"]["default"] == "10.244.0.0/16"


def test_gcp_outputs_name_the_network_and_nodes(gcp: Module) -> None:
    outputs = gcp.named("output")
    assert {"network", "instance_names", "internal_ips"} <= set(outputs)
    assert outputs["network"]["value"] == "${google_compute_network.cluster.name}"


# --- terraform/alicloud -------------------------------------------------------------------------


def test_alicloud_node_policy_is_the_providers_policy_file_attached_to_the_node_role(
    alicloud: Module,
) -> None:
    policy = alicloud.resources("alicloud_ram_policy")["node"]
    # A reference to the file the provider ships, not an inline copy that can drift from it.
    assert file_reference(policy["policy_document"]) == ALI_NODE_POLICY, policy["policy_document"]
    attachment = alicloud.resources("alicloud_ram_role_policy_attachment")["node"]
    assert attachment["role_name"] == "${alicloud_ram_role.node.role_name}"
    assert attachment["policy_name"] == "${alicloud_ram_policy.node.policy_name}"
    assert attachment["policy_type"] == "Custom"
    read_ram_policy(ALICLOUD, ALI_NODE_POLICY)


def test_alicloud_controller_policy_is_the_providers_policy_file(alicloud: Module) -> None:
    policy = alicloud.resources("alicloud_ram_policy")["controller"]
    assert policy["count"] == "${var.controller_role ? 1 : 0}"
    assert file_reference(policy["policy_document"]) == ALI_CONTROLLER_POLICY
    attachment = alicloud.resources("alicloud_ram_role_policy_attachment")["controller"]
    assert attachment["role_name"] == "${alicloud_ram_role.controller[0].role_name}"
    assert attachment["policy_name"] == "${alicloud_ram_policy.controller[0].policy_name}"
    read_ram_policy(ALICLOUD, ALI_CONTROLLER_POLICY)


def test_alicloud_node_policy_holds_what_an_elected_agent_needs_in_cluster_mode() -> None:
    # In Mode cluster every agent is a candidate, and the elected one writes every route.
    def actions(rel: str) -> set[str]:
        return {
            action
            for statement in read_ram_policy(ALICLOUD, rel)["Statement"]
            if statement["Effect"] == "Allow"
            for action in ram_actions(statement)
        }

    missing = actions(ALI_CONTROLLER_POLICY) - actions(ALI_NODE_POLICY)
    assert missing == set(), f"ali-vpc-node.json lacks what Mode cluster needs: {sorted(missing)}"


def test_alicloud_every_ram_policy_comes_from_providers_policies(alicloud: Module) -> None:
    for name, policy in alicloud.resources("alicloud_ram_policy").items():
        rel = file_reference(policy["policy_document"])
        assert rel is not None and rel.startswith("../../providers/policies/ali-vpc-"), (
            f"alicloud_ram_policy.{name} must read providers/policies/ali-vpc-*.json with file()"
        )


def test_alicloud_nodes_run_with_the_node_role(alicloud: Module) -> None:
    instances = alicloud.resources("alicloud_instance")
    assert instances, "no alicloud_instance in terraform/alicloud"
    for name, instance in instances.items():
        assert instance["role_name"] == "${alicloud_ram_role.node.role_name}", name
        assert instance["security_groups"] == ["${alicloud_security_group.nodes.id}"]
        assert instance["vswitch_id"] == "${alicloud_vswitch.nodes.id}"
    for role in alicloud.resources("alicloud_ram_role").values():
        assert role["assume_role_policy_document"] == "${local.ecs_assume_role}"
    assert alicloud.named("variable")["node_count"]["default"] == 3


def test_alicloud_security_group_admits_etcd_health_and_pod_traffic(alicloud: Module) -> None:
    rules = alicloud.resources("alicloud_security_group_rule")
    for name, rule in rules.items():
        assert rule["security_group_id"] == "${alicloud_security_group.nodes.id}", name
        assert (rule["type"], rule["policy"]) == ("ingress", "accept"), name
    by_ports = {rule["port_range"]: rule for rule in rules.values()}
    assert by_ports["2379/2379"]["cidr_ip"] == "${var.vpc_cidr}"
    assert by_ports["${var.healthz_port}/${var.healthz_port}"]["cidr_ip"] == "${var.vpc_cidr}"
    pods = [r for r in rules.values() if r["cidr_ip"] == "${var.pod_network}"]
    assert pods and (pods[0]["ip_protocol"], pods[0]["port_range"]) == ("all", "-1/-1")


def test_alicloud_outputs_name_the_route_table_and_nodes(alicloud: Module) -> None:
    outputs = alicloud.named("output")
    assert {"route_table_id", "instance_ids", "private_ips"} <= set(outputs)
    assert outputs["route_table_id"]["value"] == "${alicloud_vpc.cluster.route_table_id}"


def test_alicloud_node_role_is_trusted_by_ecs_only(tmp_path: Path) -> None:
    trust = json.loads(render_boot(tmp_path, ALICLOUD_BOOT).locals["ecs_assume_role"])
    assert trust["Version"] == "1"
    (statement,) = trust["Statement"]
    assert statement["Action"] == "sts:AssumeRole"
    assert statement["Principal"] == {"Service": ["ecs.aliyuncs.com"]}


# --- boot scripts of both -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("boot", "package", "backend"),
    [
        (GCP_BOOT, "cloudroutes[gce]", "gce"),
        (ALICLOUD_BOOT, "cloudroutes[alicloud]", "ali-vpc"),
    ],
    ids=["gcp", "alicloud"],
)
def test_boot_scripts_run_etcd_on_the_first_node_and_the_agent_everywhere(
    tmp_path: Path, boot: NodeBoot, package: str, backend: str
) -> None:
    rendered = render_boot(tmp_path, boot)
    assert rendered.node_ips == ["10.0.1.10", "10.0.1.11", "10.0.1.12"]
    assert len(rendered.scripts) == 3
    agent = "cloudroutes agent --etcd-endpoints=http://10.0.1.10:2379 --ip-masq --healthz-port=8471"
    for index, script in enumerate(rendered.scripts):
        syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert syntax.returncode == 0, f"node {index} boot script: {syntax.stderr}"
        assert f"pip install -q '{package}'" in script
        assert f"ExecStart=/usr/local/bin/{agent}\n" in script
        assert "systemctl enable --now cloudroutes.service" in script
        # GCE runs startup scripts at every boot: the node is set up once, before anything else.
        assert script.index("node-setup.done") < script.index("apt-get")
        first = index == 0
        assert ("etcd-server" in script) is first, f"node {index}: etcd only on the first node"
        assert ("cloudroutes config set" in script) is first, f"node {index}: config set once"

    config = parse_config(heredoc(rendered.scripts[0], "CONF"), source="boot script")
    assert config.backend_type == backend
    assert config.backend.get("Mode") == "node"
    assert config.backend.get("ClusterName") == "cloudroutes-test"
    assert str(config.network) == "10.244.0.0/16"
    # The agent's unit is the project's own, not a copy kept in terraform/.
    assert (
        heredoc(rendered.scripts[1], "UNIT").strip()
        == (REPO / "deploy/cloudroutes.service").read_text().strip()
    )


def test_boot_configs_are_accepted_by_their_backends(tmp_path: Path) -> None:
    # Imported here: the module's other tests need no backend.
    from providers import ali_vpc, gce

    gce_config = parse_config(heredoc(render_boot(tmp_path, GCP_BOOT).scripts[0], "CONF"))
    assert gce.parse_options(gce_config, None).mode == "node"
    ali_config = parse_config(heredoc(render_boot(tmp_path, ALICLOUD_BOOT).scripts[0], "CONF"))
    options = ali_vpc.parse_options(ali_config, None)
    # The table this module outputs, named rather than discovered.
    assert options.route_table_ids == ("vtb-0123456789abcdef0",)
    assert options.access_key_id is None, "credentials come from the instance's RAM role"


@pytest.mark.parametrize("boot", [GCP_BOOT, ALICLOUD_BOOT], ids=["gcp", "alicloud"])
def test_one_node_cluster_mode_runs_etcd_and_agent_on_it(tmp_path: Path, boot: NodeBoot) -> None:
    rendered = render_boot(tmp_path, boot, "node_count=1", "mode=cluster", "cluster_name=lab-2")
    assert rendered.node_ips == ["10.0.1.10"]
    (script,) = rendered.scripts
    assert "cloudroutes agent --etcd-endpoints=http://10.0.1.10:2379 " in script
    backend = parse_config(heredoc(script, "CONF")).backend
    assert (backend.get("Mode"), backend.get("ClusterName")) == ("cluster", "lab-2")


@pytest.mark.parametrize(
    ("boot", "variable", "message"),
    [
        (GCP_BOOT, "mode=nodes", "The mode must be node or cluster."),
        (GCP_BOOT, "node_count=0", "The node_count must be a whole number from 1 to 40"),
        (GCP_BOOT, "first_node_host=1", "Google reserves the first two addresses"),
        (GCP_BOOT, "cluster_name=cloudroutes-test-cluster-26", "must be 1-25 characters"),
        (GCP_BOOT, "cluster_name=test-", "not ending with '-'"),
        (ALICLOUD_BOOT, "mode=nodes", "The mode must be node or cluster."),
        (ALICLOUD_BOOT, "node_count=41", "The node_count must be a whole number from 1 to 40"),
        (ALICLOUD_BOOT, "first_node_host=0", "Alibaba reserves the first address"),
        (ALICLOUD_BOOT, "cluster_name=Prod_1", "The cluster_name must be 1-31 characters"),
    ],
    ids=lambda value: value.module.name if isinstance(value, NodeBoot) else None,
)
def test_gcp_and_alicloud_modules_refuse_bad_variables_with_a_clear_message(
    tmp_path: Path, boot: NodeBoot, variable: str, message: str
) -> None:
    work = boot_harness(tmp_path, boot)
    args = [f"-var={v}" for v in (*boot.variables, variable)]
    result = terraform(tmp_path, "plan", "-no-color", *args, cwd=work)
    assert result.returncode != 0
    assert message in " ".join(result.stderr.split())

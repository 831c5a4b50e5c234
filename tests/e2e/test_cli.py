"""The operator's verbs against a real etcd: config get|set, leases, plan."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from cloudroutes.lab.cluster import LabCluster
from tests.conftest import needs_root

pytestmark = [needs_root]

PREFIX = "/coreos.com/network"
HOST_GW = '{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}'


@pytest.fixture
def lab() -> Iterator[LabCluster]:
    cluster = LabCluster(1).build()
    try:
        yield cluster
    finally:
        cluster.close()


def test_config_set_validates_before_writing(lab: LabCluster) -> None:
    bad = lab.cli_in_etcd_host("config", "set", "-", input='{"Network": "10.5.0.0/29"}')
    assert bad.returncode == 1
    assert bad.stderr == (
        "cloudroutes: error: invalid network config (etcd /coreos.com/network/config): "
        "network is too small. Minimum useful network prefix is /28\n"
    )
    assert lab.etcd.etcdctl("get", f"{PREFIX}/config").strip() == ""
    missing = lab.cli_in_etcd_host("config", "get")
    assert missing.returncode == 1
    assert "no network config in etcd yet" in missing.stderr

    good = lab.cli_in_etcd_host("config", "set", "-", input=HOST_GW)
    assert good.returncode == 0, good.stderr
    assert lab.etcd.etcdctl("get", "--print-value-only", f"{PREFIX}/config").strip() == HOST_GW
    assert lab.cli_in_etcd_host("config", "get").stdout.strip() == HOST_GW


def test_leases_table_shows_expiry_and_reservations(lab: LabCluster) -> None:
    lab.set_config(HOST_GW)
    value = '{"PublicIP":"198.18.0.50","PublicIPv6":null,"BackendType":"host-gw"}'
    lab.etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.50.0-24", value)  # a reservation
    lease_id = lab.etcd.etcdctl("lease", "grant", "7200").split()[1]
    value = '{"PublicIP":"198.18.0.51","PublicIPv6":null,"BackendType":"host-gw"}'
    lab.etcd.etcdctl("put", f"--lease={lease_id}", f"{PREFIX}/subnets/10.5.51.0-24", value)
    out = lab.cli_in_etcd_host("leases").stdout.splitlines()
    assert out[0].split() == ["SUBNET", "IPV6", "SUBNET", "PUBLIC", "IP", "BACKEND", "EXPIRES"]
    assert out[1].split() == [
        "10.5.50.0/24",
        "-",
        "198.18.0.50",
        "host-gw",
        "never",
        "(reservation)",
    ]
    row = out[2].split()
    assert row[:4] == ["10.5.51.0/24", "-", "198.18.0.51", "host-gw"]
    assert re.fullmatch(r"in 1h59m\d\ds", " ".join(row[4:]))


def test_plan_shows_changes_without_making_them(lab: LabCluster) -> None:
    lab.set_config(HOST_GW)
    value = '{"PublicIP":"198.18.0.60","PublicIPv6":null,"BackendType":"host-gw"}'
    lab.etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.60.0-24", value)
    node = lab.nodes[0]
    args = ("plan", f"--etcd-endpoints={lab.endpoints}", "--iface=eth0")
    first = node.ns.run(lab.cli, *args)
    assert first.stdout.splitlines() == [
        "route table kernel: 1 change(s)",
        "  add 10.5.60.0/24 via 198.18.0.60 dev eth0",
    ]
    assert node.ns.ip("route", "show", "10.5.60.0/24") == ""  # plan changed nothing

    lab.start_agent(node)
    lab.wait_ready(node)
    deadline = time.monotonic() + 10
    while node.ns.ip("route", "show", "10.5.60.0/24") == "" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.ns.run(lab.cli, *args).stdout == "route table kernel: nothing to change\n"


def test_unreachable_etcd_is_one_line(lab: LabCluster) -> None:
    result = lab.nodes[0].ns.run(
        lab.cli, "leases", "--etcd-endpoints=http://127.0.0.1:9", check=False
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "cannot reach etcd at http://127.0.0.1:9" in result.stderr
    assert "--etcd-endpoints" in result.stderr


def test_agent_health_port_in_use_is_one_line(lab: LabCluster) -> None:
    lab.set_config(HOST_GW)
    node = lab.nodes[0]
    lab.start_agent(node, "--healthz-port=9302")
    lab.wait_ready(node)
    second = node.ns.run(
        lab.cli, "agent", f"--etcd-endpoints={lab.endpoints}", "--iface=eth0",
        f"--subnet-file={node.run_dir / 'second.env'}", "--healthz-port=9302", check=False,
    )  # fmt: skip
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
        "cloudroutes: error: cannot serve /healthz on 0.0.0.0:9302: Address already in use; "
        "choose another --healthz-ip/--healthz-port"
    )
    assert not (node.run_dir / "second.env").exists()

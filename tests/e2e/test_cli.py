"""The operator's verbs against a real etcd: config get|set, leases, plan."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from cloudroutes.lab.cluster import LabCluster
from tests.conftest import needs_root
from tests.wait import wait_for

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
    assert out[0].split() == [
        "SUBNET", "IPV6", "SUBNET", "PUBLIC", "IP", "BACKEND", "EXPIRES", "REFUSED"
    ]  # fmt: skip
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


def test_leases_are_listed_by_address_and_refused_ones_are_marked(lab: LabCluster) -> None:
    lab.set_config(HOST_GW)
    for key, ip in [
        ("10.5.100.0-24", "198.18.0.100"),
        ("10.5.9.0-24", "198.18.0.9"),
        ("10.5.20.0-24", "198.18.0.20"),
        ("10.6.1.0-24", "198.18.0.61"),  # outside the Network: the agents refuse it
        ("10.5.3.0-24", "127.0.0.1"),  # a loopback next hop: refused too
    ]:
        value = f'{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"host-gw"}}'
        lab.etcd.etcdctl("put", f"{PREFIX}/subnets/{key}", value)
    out = lab.cli_in_etcd_host("leases").stdout.splitlines()
    # By address, not by key text (where 10.5.100.0 sorts before 10.5.20.0 and 10.5.3.0).
    assert [line.lstrip("! ").split()[0] for line in out[1:]] == [
        "10.5.3.0/24", "10.5.9.0/24", "10.5.20.0/24", "10.5.100.0/24", "10.6.1.0/24",
    ]  # fmt: skip
    refused = {line.split()[1]: line for line in out[1:] if line.startswith("!")}
    assert sorted(refused) == ["10.5.3.0/24", "10.6.1.0/24"]
    assert refused["10.6.1.0/24"].endswith(
        "its subnet 10.6.1.0/24 is outside the Network 10.5.0.0/16"
    )
    assert refused["10.5.3.0/24"].endswith("its next hop 127.0.0.1 is a loopback address")


def test_agent_refuses_the_loopback_interface_before_taking_a_lease(lab: LabCluster) -> None:
    lab.set_config(HOST_GW)
    node = lab.nodes[0]
    result = node.ns.run(
        lab.cli, "agent", f"--etcd-endpoints={lab.endpoints}", "--iface=lo",
        f"--subnet-file={node.subnet_file}", check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "cloudroutes: error: failed to find interface to use that matches the interfaces and/or "
        "regexes provided (--iface=lo: lo is the loopback interface, which other nodes cannot "
        "reach); name the external interface with --iface, e.g. --iface=eth0"
    )
    assert lab.etcd.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").strip() == ""
    assert not node.subnet_file.exists()


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
    wait_for(lambda: node.ns.ip("route", "show", "10.5.60.0/24"), 10, "the agent's route")
    assert node.ns.run(lab.cli, *args).stdout == "route table kernel: nothing to change\n"


def test_agent_takes_a_flanneld_daemonset_command_line_and_names_what_it_ignores(
    lab: LabCluster,
) -> None:
    lab.set_config(HOST_GW)
    node = lab.nodes[0]
    lab.start_agent(
        node, "-ip-masq", "-kubeconfig-file=/etc/kubeconfig", "-v=2", "--iface-regex=^198\\.18\\.",
        "--ip-masq-fully-random-disable", "--iptables-resync=10",
    )  # fmt: skip
    lab.wait_ready(node)
    notices = [
        line.split(": ", 1)[1] for line in node.log().splitlines() if " is ignored: " in line
    ]
    assert notices == [
        "--kubeconfig-file is ignored: it is used only with --kube-subnet-mgr, which "
        "cloudroutes does not support yet",
        "--v is ignored: cloudroutes logs at INFO; use `cloudroutes --debug agent` for more",
    ]
    assert "not implemented" not in node.log()
    masq = node.ns.run("iptables-save", "-t", "nat").stdout
    assert "-j MASQUERADE" in masq and "random-fully" not in masq


def test_unreachable_etcd_is_one_line(lab: LabCluster) -> None:
    result = lab.nodes[0].ns.run(
        lab.cli, "leases", "--etcd-endpoints=http://127.0.0.1:9", check=False
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "cannot reach etcd at http://127.0.0.1:9" in result.stderr
    assert "--etcd-endpoints" in result.stderr


# Holds a TCP port in the node's namespace, as some other program would, until killed.
_LISTENER = """
import socket, sys, time
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
time.sleep(3600)
"""


def test_agent_health_port_in_use_is_one_line(lab: LabCluster) -> None:
    lab.set_config(HOST_GW)
    node = lab.nodes[0]
    holder = node.ns.popen([sys.executable, "-c", _LISTENER, "9302"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"listening\n"
        second = node.ns.run(
            lab.cli, "agent", f"--etcd-endpoints={lab.endpoints}", "--iface=eth0",
            f"--subnet-file={node.subnet_file}", "--healthz-port=9302", check=False,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
        "cloudroutes: error: cannot serve /healthz on 0.0.0.0:9302: Address already in use; "
        "choose another --healthz-ip/--healthz-port"
    )
    assert not node.subnet_file.exists()
    assert lab.etcd.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").strip() == ""

"""flanneld's flags and FLANNELD_* environment."""

from __future__ import annotations

import argparse

import pytest

from cloudroutes.errors import ConfigError
from cloudroutes.flags import AGENT_FLAGS, ETCD_FLAGS, add_flags, resolve

FLAGS = ETCD_FLAGS + AGENT_FLAGS


def parse(argv: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    add_flags(parser, FLAGS)
    return resolve(parser.parse_args(argv), FLAGS, env or {})


def test_flanneld_defaults() -> None:
    values = parse([])
    assert values["etcd_endpoints"] == "http://127.0.0.1:4001,http://127.0.0.1:2379"
    assert values["etcd_prefix"] == "/coreos.com/network"
    assert values["subnet_file"] == "/run/flannel/subnet.env"
    assert values["subnet_lease_renew_margin"] == 60
    assert values["iptables_resync"] == 5
    assert values["iptables_forward_rules"] is True
    assert values["ip_masq"] is False
    assert values["iface"] == []


def test_environment_fills_what_flags_do_not_give() -> None:
    env = {
        "FLANNELD_ETCD_ENDPOINTS": "http://127.0.0.1:9",
        "FLANNELD_IP_MASQ": "true",
        "FLANNELD_IFACE": "eth1,198.18.0.7",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30",
        "FLANNELD_IPTABLES_FORWARD_RULES": "false",
    }
    values = parse(["--etcd-endpoints=http://127.0.0.1:10"], env)
    assert values["etcd_endpoints"] == "http://127.0.0.1:10"  # the flag wins
    assert values["ip_masq"] is True
    assert values["iface"] == ["eth1", "198.18.0.7"]
    assert values["subnet_lease_renew_margin"] == 30
    assert values["iptables_forward_rules"] is False


def test_go_style_flags_are_accepted() -> None:
    values = parse(["-ip-masq", "--iface", "eth0", "-iface=eth1", "--iptables-forward-rules=false"])
    assert values["ip_masq"] is True
    assert values["iface"] == ["eth0", "eth1"]
    assert values["iptables_forward_rules"] is False


def test_bad_environment_value_is_one_line_and_hides_secrets() -> None:
    with pytest.raises(ConfigError, match="FLANNELD_IPTABLES_RESYNC='soon' is not valid"):
        parse([], {"FLANNELD_IPTABLES_RESYNC": "soon"})

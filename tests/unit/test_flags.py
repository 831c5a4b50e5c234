"""flanneld's flags and FLANNELD_* environment."""

from __future__ import annotations

import argparse

import pytest

from cloudroutes.errors import ConfigError
from cloudroutes.flags import (
    AGENT_FLAGS,
    ETCD_FLAGS,
    Flag,
    add_flags,
    given,
    ignored_notices,
    resolve,
)

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


# Every flag of flanneld's main.go (v0.27), with a value it accepts, and the value we then hold.
FLANNELD = [
    ("etcd-endpoints", "http://127.0.0.1:2379", "http://127.0.0.1:2379"),
    ("etcd-prefix", "/x/network", "/x/network"),
    ("etcd-keyfile", "/k.pem", "/k.pem"),
    ("etcd-certfile", "/c.pem", "/c.pem"),
    ("etcd-cafile", "/ca.pem", "/ca.pem"),
    ("etcd-username", "flannel", "flannel"),
    ("etcd-password", "secret", "secret"),
    ("iface", "eth1", ["eth1"]),
    ("iface-regex", "^eth", ["^eth"]),
    ("iface-can-reach", "198.18.0.1", "198.18.0.1"),
    ("subnet-file", "/run/x.env", "/run/x.env"),
    ("public-ip", "198.18.0.7", "198.18.0.7"),
    ("public-ipv6", "2001:db8::7", "2001:db8::7"),
    ("subnet-lease-renew-margin", "30", 30),
    ("ip-masq", "true", True),
    ("ip-masq-fully-random-disable", "true", True),
    ("kube-subnet-mgr", "true", True),
    ("kube-api-url", "https://10.0.0.1:6443", "https://10.0.0.1:6443"),
    ("kube-annotation-prefix", "example.com", "example.com"),
    ("kubeconfig-file", "/etc/kubeconfig", "/etc/kubeconfig"),
    ("healthz-ip", "127.0.0.1", "127.0.0.1"),
    ("healthz-port", "8471", 8471),
    ("iptables-resync", "10", 10),
    ("iptables-forward-rules", "false", False),
    ("ip-blackhole-route", "true", True),
    ("net-config-path", "/etc/net-conf.json", "/etc/net-conf.json"),
    ("set-node-network-unavailable", "false", False),
    ("v", "2", 2),
    ("vmodule", "main=3", "main=3"),
    ("log_backtrace_at", "main.go:10", "main.go:10"),
]


@pytest.mark.parametrize(("name", "text", "value"), FLANNELD, ids=[f[0] for f in FLANNELD])
def test_every_flanneld_flag_parses_as_flag_go_style_flag_and_environment(
    name: str, text: str, value: object
) -> None:
    dest = name.replace("-", "_")
    assert parse([f"--{name}={text}"])[dest] == value
    assert parse([f"-{name}", text])[dest] == value
    assert parse([], {"FLANNELD_" + dest.upper(): text})[dest] == value


def test_flanneld_defaults_of_the_new_flags() -> None:
    values = parse([])
    assert values["iface_regex"] == []
    assert values["iface_can_reach"] is None
    assert values["ip_masq_fully_random_disable"] is False
    assert values["ip_blackhole_route"] is False
    assert values["kube_annotation_prefix"] == "flannel.alpha.coreos.com"
    assert values["set_node_network_unavailable"] is True
    assert values["net_config_path"] == "/etc/kube-flannel/net-conf.json"
    assert values["healthz_port"] == 0


def test_iface_regex_repeats_and_a_regex_from_the_environment_keeps_its_commas() -> None:
    assert parse(["--iface-regex=^10\\.", "-iface-regex", "eth[0-9]"])["iface_regex"] == [
        "^10\\.",
        "eth[0-9]",
    ]
    # flanneld sets a repeatable flag once from its variable: the whole value is one regex.
    env = {"FLANNELD_IFACE_REGEX": "^10\\.0\\.[0-9]{1,3}\\."}
    assert parse([], env)["iface_regex"] == ["^10\\.0\\.[0-9]{1,3}\\."]


def test_an_empty_variable_counts_as_unset_as_in_flanneld() -> None:
    values = parse([], {"FLANNELD_HEALTHZ_PORT": "", "FLANNELD_IP_MASQ": ""})
    assert values["healthz_port"] == 0
    assert values["ip_masq"] is False


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["--healthz-port=65536"],
            {},
            "--healthz-port 65536 must be a port number from 0 to 65535 (0: off)",
        ),
        (
            ["--healthz-port=-1"],
            {},
            "--healthz-port -1 must be a port number from 0 to 65535 (0: off)",
        ),
        (
            [],
            {"FLANNELD_HEALTHZ_PORT": "99999"},
            "FLANNELD_HEALTHZ_PORT=99999 (--healthz-port) must be a port number from 0 to 65535 (0: off)",
        ),
        (["--iptables-resync=0"], {}, "--iptables-resync 0 must be at least 1 second"),
        (
            ["--subnet-lease-renew-margin=0"],
            {},
            "--subnet-lease-renew-margin 0 must be 1 to 1439 minutes",
        ),
        (
            ["--subnet-lease-renew-margin=1440"],
            {},
            "--subnet-lease-renew-margin 1440 must be 1 to 1439 minutes",
        ),
        (["--subnet-lease-ttl=0"], {}, "--subnet-lease-ttl 0 must be at least 1 second"),
        (
            ["--public-ip=127.0.0.1"],
            {},
            "--public-ip 127.0.0.1 is a loopback address, which other nodes cannot reach",
        ),
        (
            ["--public-ip=0.0.0.0"],
            {},
            "--public-ip 0.0.0.0 is the unspecified address; give this node's own unicast address",
        ),
        (
            ["--public-ip=224.0.0.5"],
            {},
            "--public-ip 224.0.0.5 is a multicast address; give a unicast address",
        ),
        (
            ["--public-ip=240.0.0.1"],
            {},
            "--public-ip 240.0.0.1 is a reserved address (240.0.0.0/4); give a unicast address",
        ),
        (["--public-ip=2001:db8::1"], {}, "--public-ip 2001:db8::1 is not an IPv4 address"),
        (["--public-ip=node1"], {}, "--public-ip node1 is not an IPv4 address"),
        (
            ["--public-ipv6=::1"],
            {},
            "--public-ipv6 ::1 is a loopback address, which other nodes cannot reach",
        ),
        (["--public-ipv6=198.18.0.1"], {}, "--public-ipv6 198.18.0.1 is not an IPv6 address"),
        (
            ["--iface-regex=eth0", "--iface-regex=("],
            {},
            "--iface-regex ( is not a valid regular expression (missing ), unterminated subpattern at position 0)",
        ),
        (
            ["--iface-can-reach=gateway"],
            {},
            "--iface-can-reach gateway is not an IP address such as 198.18.0.1",
        ),
    ],
)
def test_a_bad_value_is_refused_in_one_line_naming_the_flag(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse(argv, env)
    assert str(err.value) == message


def test_flags_cloudroutes_does_not_act_on_say_so_only_when_set() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, FLAGS)
    assert ignored_notices(given(parser.parse_args([]), FLAGS, {})) == []
    args = parser.parse_args(["--kubeconfig-file=/k", "-v=2", "--ip-masq"])
    assert ignored_notices(given(args, FLAGS, {"FLANNELD_NET_CONFIG_PATH": "/n.json"})) == [
        "--kubeconfig-file is ignored: it is used only with --kube-subnet-mgr, which "
        "cloudroutes does not support yet",
        "--net-config-path is ignored: it is used only with --kube-subnet-mgr, which "
        "cloudroutes does not support yet",
        "--v is ignored: cloudroutes logs at INFO; use `cloudroutes --debug agent` for more",
    ]


def test_secrets_never_appear_in_errors() -> None:
    hidden = Flag("token", "a secret", type=int, secret=True, check=lambda v: "is wrong")
    parser = argparse.ArgumentParser()
    add_flags(parser, [hidden])
    with pytest.raises(ConfigError) as err:
        resolve(parser.parse_args(["--token=12345"]), [hidden], {})
    assert str(err.value) == "--token (hidden) is wrong"
    with pytest.raises(ConfigError) as err:
        resolve(parser.parse_args([]), [hidden], {"FLANNELD_TOKEN": "s3cr3t"})
    assert "s3cr3t" not in str(err.value)

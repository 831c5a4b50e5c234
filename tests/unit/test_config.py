"""flannel's net-conf rules, defaults and error texts."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest

from cloudroutes.config import parse_config
from cloudroutes.errors import ConfigError


def test_defaults_for_a_slash_16() -> None:
    cfg = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}')
    assert cfg.network == IPv4Network("10.5.0.0/16")
    assert cfg.subnet_len == 24
    assert cfg.subnet_min == IPv4Address("10.5.1.0")
    assert cfg.subnet_max == IPv4Address("10.5.255.0")
    assert cfg.enable_ipv4 and not cfg.enable_ipv6 and not cfg.enable_nftables
    assert cfg.backend_type == "host-gw"


def test_keys_match_case_insensitively() -> None:
    cfg = parse_config(
        '{"network": "10.5.0.0/16", "subnetlen": 26, "BACKEND": {"type": "vxlan", "vni": 7}}'
    )
    assert cfg.subnet_len == 26
    assert cfg.backend_type == "vxlan"
    assert cfg.backend.get("VNI") == 7


def test_missing_backend_is_udp_and_options_are_kept() -> None:
    assert parse_config('{"Network": "10.5.0.0/16"}').backend_type == "udp"
    cfg = parse_config(
        '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", "Port": 4789, "X": [1]}}'
    )
    assert cfg.backend.options.raw() == {"Type": "vxlan", "Port": 4789, "X": [1]}


@pytest.mark.parametrize(
    ("network", "subnet_len"),
    [("10.0.0.0/8", 24), ("10.5.0.0/22", 24), ("10.5.0.0/23", 25), ("10.5.0.0/28", 30)],
)
def test_subnet_len_default(network: str, subnet_len: int) -> None:
    assert parse_config(f'{{"Network": "{network}"}}').subnet_len == subnet_len


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{}", "please define a correct Network parameter in the flannel config"),
        ('{"Network": "10.5.0.0/16", "SubnetLen": 31}', "SubnetLen must be less than /31"),
        (
            '{"Network": "10.5.0.0/16", "SubnetLen": 17}',
            "network must be able to accommodate at least four subnets",
        ),
        (
            '{"Network": "10.5.0.0/29"}',
            "network is too small. Minimum useful network prefix is /28",
        ),
        (
            '{"Network": "10.5.0.0/16", "SubnetMin": "10.6.0.0"}',
            "SubnetMin is not in the range of the Network",
        ),
        (
            '{"Network": "10.5.0.0/16", "SubnetMax": "10.6.0.0"}',
            "SubnetMax is not in the range of the Network",
        ),
        (
            '{"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.128"}',
            "SubnetMin is not on a SubnetLen boundary: 10.5.1.128",
        ),
        (
            '{"Network": "10.5.0.0/16", "SubnetMax": "10.5.9.1"}',
            "SubnetMax is not on a SubnetLen boundary: 10.5.9.1",
        ),
        ('{"EnableIPv4": false}', "none defined stack"),
        ('{"Network": "10.5.0.0/16", "Backend": {}}', "unknown backend type: "),
        (
            '{"EnableIPv6": true, "Network": "10.5.0.0/16"}',
            "please define a correct IPv6Network parameter in the flannel config",
        ),
        (
            '{"EnableIPv6": true, "Network": "10.5.0.0/16", "IPv6Network": "fc00::/48", "IPv6SubnetLen": 127}',
            "IPv6SubnetLen must be less than /127",
        ),
        (
            '{"EnableIPv6": true, "Network": "10.5.0.0/16", "IPv6Network": "fc00::/125"}',
            "is too small. Minimum useful network prefix is /124",
        ),
        ('{"Network": "10.5.0.0/33"}', 'Network "10.5.0.0/33" is not a valid CIDR'),
        ('{"Network": "10.5.0.0/16", "SubnetLen": "24"}', "SubnetLen must be a prefix length"),
        ("[1]", "must be a JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_flannel_error_texts(doc: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc, source="etcd /coreos.com/network/config")
    text = str(err.value)
    assert message in text
    assert text.startswith("invalid network config (etcd /coreos.com/network/config): ")
    assert "\n" not in text


def test_dual_stack_defaults() -> None:
    cfg = parse_config('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fc00::/48"}')
    assert cfg.ipv6_subnet_len == 64
    assert cfg.ipv6_subnet_min == IPv6Address("fc00:0:0:1::")
    assert cfg.ipv6_subnet_max == IPv6Address("fc00:0:0:ffff::")


def test_ipv6_only() -> None:
    cfg = parse_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00::/120"}')
    assert cfg.network is None
    assert cfg.ipv6_subnet_len == 122


def test_kube_mode_parses_without_range_checks() -> None:
    cfg = parse_config('{"Network": "10.5.0.0/16", "SubnetLen": 31}', check=False)
    assert cfg.subnet_len == 31

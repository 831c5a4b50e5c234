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


V6 = '"EnableIPv6": true, "Network": "10.5.0.0/16"'
WHERE = "etcd /coreos.com/network/config"


# Each text is flannel's (pkg/subnet/config.go), word for word.
@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{}", "please define a correct Network parameter in the flannel config"),
        (
            '{"Network": "0.0.0.0/0"}',
            "please define a correct Network parameter in the flannel config",
        ),
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
        (f"{{{V6}}}", "please define a correct IPv6Network parameter in the flannel config"),
        (
            f'{{{V6}, "IPv6Network": "::/0"}}',
            "please define a correct IPv6Network parameter in the flannel config",
        ),
        (
            f'{{{V6}, "IPv6Network": "fc00::/48", "IPv6SubnetLen": 127}}',
            "SubnetLen must be less than /127",
        ),
        (
            f'{{{V6}, "IPv6Network": "fc00::/48", "IPv6SubnetLen": 49}}',
            "network must be able to accommodate at least four subnets",
        ),
        (
            f'{{{V6}, "IPv6Network": "fc00::/125"}}',
            "IPv6Network is too small. Minimum useful network prefix is /124",
        ),
        (
            f'{{{V6}, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc01::"}}',
            "IPv6SubnetMin is not in the range of the IPv6Network",
        ),
        (
            f'{{{V6}, "IPv6Network": "fc00::/48", "IPv6SubnetMax": "fc01::"}}',
            "IPv6SubnetMax is not in the range of the IPv6Network",
        ),
        (
            f'{{{V6}, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::1"}}',
            "IPv6SubnetMin is not on a SubnetLen boundary: fc00:0:0:1::1",
        ),
        (
            f'{{{V6}, "IPv6Network": "fc00::/48", "IPv6SubnetMax": "fc00:0:0:9::1"}}',
            "IPv6SubnetMax is not on a SubnetLen boundary: fc00:0:0:9::1",
        ),
    ],
)
def test_flannel_error_texts(doc: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc, source=WHERE)
    assert str(err.value) == f"invalid network config ({WHERE}): {message}"


# Rules of our own, where flannel accepts a config that can never work.
@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            '{"Network": "10.5.0.0/16", "SubnetMin": "10.5.9.0", "SubnetMax": "10.5.2.0"}',
            "SubnetMin 10.5.9.0 is above SubnetMax 10.5.2.0, which leaves no subnet to lease; "
            "swap them or widen the range",
        ),
        (
            f'{{{V6}, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:9::", '
            '"IPv6SubnetMax": "fc00:0:0:2::"}',
            "IPv6SubnetMin fc00:0:0:9:: is above IPv6SubnetMax fc00:0:0:2::, which leaves no "
            "subnet to lease; swap them or widen the range",
        ),
        (
            '{"Network": "127.0.0.0/16"}',
            "Network 127.0.0.0/16 overlaps the loopback range 127.0.0.0/8, which cannot carry "
            "pod traffic between nodes; choose a private range such as 10.244.0.0/16",
        ),
        (
            '{"Network": "0.0.0.0/1"}',
            "Network 0.0.0.0/1 overlaps the 'this network' range 0.0.0.0/8, which cannot carry "
            "pod traffic between nodes; choose a private range such as 10.244.0.0/16",
        ),
        (
            '{"Network": "224.1.0.0/16"}',
            "Network 224.1.0.0/16 overlaps the multicast range 224.0.0.0/4, which cannot carry "
            "pod traffic between nodes; choose a private range such as 10.244.0.0/16",
        ),
        (
            '{"Network": "169.254.0.0/16"}',
            "Network 169.254.0.0/16 overlaps the link-local range 169.254.0.0/16, which cannot "
            "carry pod traffic between nodes; choose a private range such as 10.244.0.0/16",
        ),
        (
            f'{{{V6}, "IPv6Network": "::/96"}}',
            "IPv6Network ::/96 overlaps the unspecified address ::/128, which cannot carry pod "
            "traffic between nodes; choose a private range such as fd00:10:244::/56",
        ),
        (
            f'{{{V6}, "IPv6Network": "fe80::/48"}}',
            "IPv6Network fe80::/48 overlaps the link-local range fe80::/10, which cannot carry "
            "pod traffic between nodes; choose a private range such as fd00:10:244::/56",
        ),
        (
            f'{{{V6}, "IPv6Network": "ff02::/48"}}',
            "IPv6Network ff02::/48 overlaps the multicast range ff00::/8, which cannot carry pod "
            "traffic between nodes; choose a private range such as fd00:10:244::/56",
        ),
        (
            '{"Network": "10.5.0.0/33"}',
            'Network "10.5.0.0/33" is not a valid CIDR; write it like 10.5.0.0/16',
        ),
        (
            '{"Network": "10.5.0.0/16", "SubnetLen": "24"}',
            'SubnetLen must be a prefix length such as 24, got "24"',
        ),
        ('{"Network": "10.5.0.0/16", "SubnetMin": 5}', "SubnetMin 5 is not a valid address"),
    ],
)
def test_configs_that_cannot_work_are_refused(doc: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc, source=WHERE)
    assert str(err.value) == f"invalid network config ({WHERE}): {message}"


def test_a_document_that_is_not_a_json_object_names_where_it_came_from() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("{", source="net-conf.json")
    assert str(err.value) == (
        "net-conf.json: not valid JSON: "
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    )
    with pytest.raises(ConfigError) as err:
        parse_config("[1]", source="net-conf.json")
    assert str(err.value) == (
        'net-conf.json: not a JSON object; write one such as {"Network": "10.5.0.0/16"}'
    )
    with pytest.raises(ConfigError, match=r"^net-conf\.json: not valid JSON: "):
        parse_config(b"\xff{}", source="net-conf.json")


def test_zero_subnet_min_and_max_mean_unset_as_in_flannel() -> None:
    cfg = parse_config('{"Network": "10.5.0.0/16", "SubnetMin": "0.0.0.0", "SubnetMax": "0.0.0.0"}')
    assert (cfg.subnet_min, cfg.subnet_max) == (IPv4Address("10.5.1.0"), IPv4Address("10.5.255.0"))
    cfg = parse_config(
        f'{{{V6}, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "::", "IPv6SubnetMax": "::"}}'
    )
    assert cfg.ipv6_subnet_min == IPv6Address("fc00:0:0:1::")
    assert cfg.ipv6_subnet_max == IPv6Address("fc00:0:0:ffff::")


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

"""ali-vpc options, credentials and what each lease wants: pure logic, no Alibaba."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from cloudroutes.config import parse_config
from cloudroutes.errors import ConfigError, LeaseRefused
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.routes import Route
from providers.ali_vpc import (
    ENDPOINT_ENV,
    Metadata,
    RamRoleCredentials,
    credentials_source,
    lease_routes,
    parse_options,
    vpc_endpoint,
)

PREFIX = "/coreos.com/network"
SECRET = "s3cr3t-value-never-shown"
INSTANCE = "i-bp1a2b3c4d5e6f7g8h9i"


def config(backend: dict[str, Any]) -> Any:
    doc = {"Network": "10.5.0.0/16", "Backend": {"Type": "ali-vpc", **backend}}
    return parse_config(json.dumps(doc))


def test_defaults_and_case_insensitive_keys() -> None:
    options = parse_options(config({}), None)
    assert options.route_table_ids == () and options.mode == "node"
    assert options.common.route_limit is None
    assert options.policy == "providers/policies/ali-vpc-node.json"
    options = parse_options(
        config(
            {
                "routetableids": ["vtb-bp1a2b3c4d5e6f7g8h9i0", "vtb-bp1a2b3c4d5e6f7g8h9i1"],
                "MODE": "cluster",
                "AccessKeyId": "LTAIexample",
                "accesskeysecret": SECRET,
                "RouteLimit": 200,
            }
        ),
        None,
    )
    assert options.route_table_ids == ("vtb-bp1a2b3c4d5e6f7g8h9i0", "vtb-bp1a2b3c4d5e6f7g8h9i1")
    assert options.mode == "cluster" and options.common.route_limit == 200
    assert options.access_key_id == "LTAIexample" and options.access_key_secret == SECRET
    assert SECRET not in repr(options)
    single = parse_options(config({"RouteTableIDs": "vtb-bp1a2b3c4d5e6f7g8h9i0"}), None)
    assert single.route_table_ids == ("vtb-bp1a2b3c4d5e6f7g8h9i0",)


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ({"RouteTableIDs": 7}, "must be a route table id or a list"),
        ({"RouteTableIDs": ["rtb-0a1b2c3d"]}, "is not a route table id"),
        (
            {"RouteTableIDs": ["vtb-bp1a2b3c4d5e6f7g8h9i0", "vtb-bp1a2b3c4d5e6f7g8h9i0"]},
            "twice",
        ),
        ({"AccessKeyID": "LTAIexample"}, "go together"),
        ({"AccessKeySecret": SECRET}, "go together"),
        ({"AccessKeySecret": 5, "AccessKeyID": "x"}, "must be a string"),
        ({"Mode": "both"}, "Backend.Mode"),
    ],
)
def test_bad_options_are_one_line_without_the_secret(backend: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_options(config(backend), None)
    assert "\n" not in str(err.value) and SECRET not in str(err.value)


def test_credentials_come_from_the_config_then_the_environment_then_the_ram_role(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACCESS_KEY_ID", "LTAIfromenv")
    monkeypatch.setenv("ACCESS_KEY_SECRET", "envsecret")
    configured = parse_options(config({"AccessKeyID": "LTAIcfg", "AccessKeySecret": SECRET}), None)
    never = lambda: pytest.fail("the metadata server is not asked")  # noqa: E731
    first = credentials_source(configured, never)()
    assert (first.key_id, first.secret, first.token) == ("LTAIcfg", SECRET, None)
    assert SECRET not in repr(first)
    plain = parse_options(config({}), None)
    second = credentials_source(plain, never)()
    assert second.key_id == "LTAIfromenv" and second.source == "ACCESS_KEY_ID/ACCESS_KEY_SECRET"
    monkeypatch.delenv("ACCESS_KEY_ID")
    role = credentials_source(plain, lambda: Metadata("http://127.0.0.1:9"))
    assert isinstance(role, RamRoleCredentials)


def test_the_vpc_endpoint_is_https_unless_configured(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    assert vpc_endpoint("cn-hangzhou") == "https://vpc.cn-hangzhou.aliyuncs.com"
    monkeypatch.setenv(ENDPOINT_ENV, "http://127.0.0.1:8080")
    with caplog.at_level("WARNING"):
        assert vpc_endpoint("cn-hangzhou") == "http://127.0.0.1:8080"
    assert "plain http" in caplog.text and ENDPOINT_ENV in caplog.text
    monkeypatch.setenv(ENDPOINT_ENV, "ftp://example")
    with pytest.raises(ConfigError, match="not an https://host"):
        vpc_endpoint("cn-hangzhou")


def test_a_lease_routes_to_its_instance_and_old_leases_are_refused() -> None:
    data = {"InstanceID": INSTANCE, "Region": "cn-hangzhou"}
    lease = Lease(
        IPv4Network("10.5.3.0/24"),
        LeaseAttrs(IPv4Address("198.18.0.12"), backend_type="ali-vpc", backend_data=data),
    )
    assert lease_routes(lease, config({})) == [
        Route(IPv4Network("10.5.3.0/24"), INSTANCE, lease_key="10.5.3.0-24")
    ]
    bad = Lease(
        IPv4Network("10.5.4.0/24"),
        LeaseAttrs(backend_type="ali-vpc", backend_data={"InstanceID": "i-../etc"}),
    )
    with pytest.raises(LeaseRefused, match="not an ECS instance id"):
        lease_routes(bad, config({}))
    old = Lease(IPv4Network("10.5.5.0/24"), LeaseAttrs(IPv4Address("198.18.0.13")))
    with pytest.raises(LeaseRefused, match="flanneld's ali-vpc"):
        lease_routes(old, config({}))

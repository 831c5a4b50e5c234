"""aws-vpc options and what each lease wants: pure logic, no AWS."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any

import pytest

from cloudroutes.backend import BackendContext, Coordination, ExternalInterface
from cloudroutes.config import parse_config
from cloudroutes.errors import ConfigError, LeaseRefused
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.routes import Route
from providers.aws_vpc import (
    AwsVpcBackend,
    lease_routes,
    live_routes,
    parse_options,
)

PREFIX = "/coreos.com/network"
IFACE = ExternalInterface("eth0", 2, 9001, IPv4Address("198.18.0.10"), IPv4Address("198.18.0.10"))


def config(backend: dict[str, Any], **extra: Any) -> Any:
    doc = {"Network": "10.5.0.0/16", "Backend": {"Type": "aws-vpc", **backend}, **extra}
    return parse_config(json.dumps(doc))


def coordination() -> Coordination:
    return Coordination(client=None, prefix=PREFIX, member="node-1")  # type: ignore[arg-type]


def test_defaults_and_case_insensitive_keys() -> None:
    options = parse_options(config({}), coordination())
    assert options.route_table_ids == ()
    assert (options.mode, options.cluster_name, options.resync_period) == ("node", PREFIX, 300.0)
    assert options.route_limit is None
    assert options.policy == "providers/policies/aws-vpc-node.json"
    options = parse_options(
        config(
            {
                "routetableid": "rtb-0a1b2c3d4e5f60708",
                "MODE": "Cluster",
                "clustername": "prod-eu1",
                "resyncperiod": 30,
                "RouteLimit": 50,
            }
        ),
        coordination(),
    )
    assert options.route_table_ids == ("rtb-0a1b2c3d4e5f60708",)
    assert (options.mode, options.cluster_name, options.resync_period) == (
        "cluster",
        "prod-eu1",
        30.0,
    )
    assert options.route_limit == 50
    assert options.policy == "providers/policies/aws-vpc-controller.json"
    listed = parse_options(
        config({"RouteTableID": ["rtb-0a1b2c3d", "rtb-0f0e0d0c"]}), coordination()
    )
    assert listed.route_table_ids == ("rtb-0a1b2c3d", "rtb-0f0e0d0c")


@pytest.mark.parametrize(
    ("backend", "named"),
    [
        ({"RouteTableID": "subnet-123"}, "RouteTableID"),
        ({"RouteTableID": 7}, "RouteTableID"),
        ({"RouteTableID": ["rtb-0a1b2c3d", "rtb-0a1b2c3d"]}, "twice"),
        ({"Mode": "global"}, "Mode"),
        ({"Mode": 1}, "Mode"),
        ({"ClusterName": ""}, "ClusterName"),
        ({"ClusterName": "a\nb"}, "ClusterName"),
        ({"ResyncPeriod": 0}, "ResyncPeriod"),
        ({"ResyncPeriod": "5m"}, "ResyncPeriod"),
        ({"ResyncPeriod": True}, "ResyncPeriod"),
        ({"RouteLimit": 0}, "RouteLimit"),
        ({"RouteLimit": 2.5}, "RouteLimit"),
    ],
)
def test_bad_options_are_one_line_naming_the_option(backend: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        AwsVpcBackend(BackendContext(config(backend), IFACE, coordination()))
    text = str(err.value)
    assert named in text and "\n" not in text


def test_the_constructor_needs_etcd_and_the_controller_needs_cluster_mode() -> None:
    with pytest.raises(ConfigError, match="etcd"):
        AwsVpcBackend(BackendContext(config({}), IFACE, None))
    with pytest.raises(ConfigError, match="cluster"):
        AwsVpcBackend(BackendContext(config({}), None, coordination(), controller=True))
    # No side effects: nothing is asked of IMDS or EC2 until prepare() or bind().
    backend = AwsVpcBackend(BackendContext(config({"Mode": "cluster"}), None, coordination(), True))
    assert backend.accepts == frozenset({"aws-vpc", ""})


def lease(n: int, **attrs: Any) -> Lease:
    six = IPv6Network(f"fc00:0:0:{n}::/64") if attrs.pop("six", False) else None
    return Lease(subnet=IPv4Network(f"10.5.{n}.0/24"), attrs=LeaseAttrs(**attrs), ipv6_subnet=six)


def test_an_aws_vpc_lease_routes_to_the_interface_it_names() -> None:
    x = lease(
        3,
        public_ip=IPv4Address("198.18.0.13"),
        backend_type="aws-vpc",
        backend_data={"InstanceID": "i-0abc", "networkinterfaceid": "eni-0123456789abcdef0"},
    )
    assert lease_routes(x, config({})) == [
        Route(IPv4Network("10.5.3.0/24"), "eni-0123456789abcdef0")
    ]


def test_an_old_flanneld_lease_routes_to_its_address_for_the_table_to_resolve() -> None:
    x = lease(4, public_ip=IPv4Address("198.18.0.14"))
    noted: list[str] = []
    assert lease_routes(x, config({}), noted.append) == [
        Route(IPv4Network("10.5.4.0/24"), "198.18.0.14")
    ]
    assert noted == ["198.18.0.14"]


def test_dual_stack_lease_wants_a_route_per_family() -> None:
    cfg = config({}, EnableIPv6=True, IPv6Network="fc00::/48")
    x = lease(
        5,
        public_ip=IPv4Address("198.18.0.15"),
        backend_type="aws-vpc",
        backend_data={"NetworkInterfaceID": "eni-0123456789abcdef0"},
        six=True,
    )
    assert [str(r.destination) for r in lease_routes(x, cfg)] == ["10.5.5.0/24", "fc00:0:0:5::/64"]
    assert {r.next_hop for r in lease_routes(x, cfg)} == {"eni-0123456789abcdef0"}


def test_a_bad_interface_id_refuses_the_lease_but_the_collector_still_keeps_it() -> None:
    x = lease(6, backend_type="aws-vpc", backend_data={"NetworkInterfaceID": "eni-; rm -rf"})
    with pytest.raises(LeaseRefused, match="NetworkInterfaceID"):
        lease_routes(x, config({}))
    assert [str(r.destination) for r in live_routes(x, config({}))] == ["10.5.6.0/24"]

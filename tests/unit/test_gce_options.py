"""gce options, names and what each lease wants: pure logic, no GCE."""

from __future__ import annotations

import json
import socket
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from cloudroutes.backend import BackendContext, Coordination, ExternalInterface
from cloudroutes.config import parse_config
from cloudroutes.errors import ConfigError, LeaseRefused
from cloudroutes.lease import Lease, LeaseAttrs
from cloudroutes.routes import Route
from providers.gce import API_ENDPOINT_VARIABLE, GceBackend, lease_routes, parse_options
from providers.gce_api import (
    NAME_RULE,
    flannel_name,
    instance_parts,
    resource_path,
    route_name,
)
from providers.gce_route_table import ledger_target

PREFIX = "/coreos.com/network"
IFACE = ExternalInterface("eth0", 2, 1460, IPv4Address("198.18.0.10"), IPv4Address("198.18.0.10"))
INSTANCE = "projects/lab-1/zones/us-central1-a/instances/node-1"


def config(backend: dict[str, Any], **extra: Any) -> Any:
    doc = {"Network": "10.5.0.0/16", "Backend": {"Type": "gce", **backend}, **extra}
    return parse_config(json.dumps(doc))


def coordination() -> Coordination:
    return Coordination(client=None, prefix=PREFIX, member="node-1")  # type: ignore[arg-type]


def test_the_common_options_and_their_defaults() -> None:
    options = parse_options(config({}), coordination())
    assert (options.mode, options.cluster_name, options.resync_period) == ("node", PREFIX, 300.0)
    assert options.route_limit is None
    options = parse_options(
        config({"mode": "Cluster", "ClusterName": "prod-eu1", "RouteLimit": 250}), coordination()
    )
    assert (options.mode, options.cluster_name, options.route_limit) == ("cluster", "prod-eu1", 250)


@pytest.mark.parametrize(
    ("backend", "extra", "text"),
    [
        ({"Mode": "both"}, {}, "Backend.Mode"),
        ({"RouteLimit": 0}, {}, "ROUTES quota"),
        ({"ResyncPeriod": "soon"}, {}, "Backend.ResyncPeriod"),
        ({}, {"EnableIPv6": True, "IPv6Network": "fc00::/48"}, "IPv4 subnets only"),
    ],
)
def test_a_bad_option_is_one_line(
    backend: dict[str, Any], extra: dict[str, Any], text: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_options(config(backend, **extra), coordination())
    assert text in str(err.value) and "\n" not in str(err.value)


def test_the_constructor_calls_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config is checked without a metadata server, credentials or the API."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the constructor opened a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv(API_ENDPOINT_VARIABLE, "http://127.0.0.1:9")
    backend = GceBackend(BackendContext(config({"ClusterName": "c"}), IFACE, coordination()))
    assert repr(backend) == "GceBackend(mode='node', cluster='c')"
    monkeypatch.setenv(API_ENDPOINT_VARIABLE, "127.0.0.1:9")
    with pytest.raises(ConfigError, match=API_ENDPOINT_VARIABLE):
        GceBackend(BackendContext(config({}), IFACE, coordination()))


def test_the_controller_serves_cluster_mode_only() -> None:
    with pytest.raises(ConfigError, match='Mode "cluster"'):
        GceBackend(BackendContext(config({}), None, coordination(), controller=True))
    with pytest.raises(ConfigError, match="etcd"):
        GceBackend(BackendContext(config({}), IFACE, None))


def test_route_names_are_unique_per_cluster_and_cidr_and_never_truncate_the_cluster() -> None:
    long_a, long_b = "x" * 150 + "-a", "x" * 150 + "-b"
    names = {
        route_name(cluster, IPv4Network(cidr))
        for cluster in ("prod", "prod2", long_a, long_b)
        for cidr in ("10.5.1.0/24", "10.5.2.0/24")
    }
    assert len(names) == 8
    for name in names:
        assert NAME_RULE.fullmatch(name) and len(name) <= 63 and name.startswith("cloudroutes-")
    assert route_name("prod", IPv4Network("10.5.1.0/24")) == route_name(
        "prod", IPv4Network("10.5.1.0/24")
    )


def test_flanneld_names_and_resource_paths() -> None:
    assert flannel_name(IPv4Network("10.40.5.0/24")) == "flannel-10-40-5-0-24"
    link = "https://www.googleapis.com/compute/v1/" + INSTANCE
    assert resource_path(link) == resource_path(INSTANCE) == INSTANCE
    assert instance_parts(link) == ("lab-1", "us-central1-a", "node-1")
    assert instance_parts("projects/lab-1/global/networks/n") is None
    assert ledger_target(INSTANCE, "cloudroutes-ab", "cloudroutes-ab") == INSTANCE
    assert ledger_target(INSTANCE, "flannel-x", "cloudroutes-ab") == f"{INSTANCE} as flannel-x"


def lease(attrs: LeaseAttrs) -> Lease:
    return Lease(IPv4Network("10.5.3.0/24"), attrs)


def test_a_gce_lease_routes_to_its_instance() -> None:
    data = {"Project": "lab-1", "Zone": "us-central1-a", "Instance": "node-1"}
    mine = lease(LeaseAttrs(IPv4Address("198.18.0.11"), backend_type="gce", backend_data=data))
    assert lease_routes(mine, config({})) == [Route(IPv4Network("10.5.3.0/24"), INSTANCE)]


@pytest.mark.parametrize(
    ("attrs", "text"),
    [
        (LeaseAttrs(IPv4Address("198.18.0.11"), backend_type="gce"), "flanneld's gce backend"),
        (LeaseAttrs(IPv4Address("198.18.0.11")), "198.18.0.11"),
        (
            LeaseAttrs(
                IPv4Address("198.18.0.11"),
                backend_type="gce",
                backend_data={"Project": "p", "Zone": "Z/../x", "Instance": "n"},
            ),
            "does not name an instance",
        ),
    ],
)
def test_a_lease_naming_no_instance_is_refused_with_its_reason(
    attrs: LeaseAttrs, text: str
) -> None:
    with pytest.raises(LeaseRefused) as err:
        lease_routes(lease(attrs), config({}))
    assert text in str(err.value) and "\n" not in str(err.value)


def test_without_the_google_sdk_the_backend_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name.startswith("google.cloud") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError, match=r"pip install 'cloudroutes\[gce\]'"):
        GceBackend(BackendContext(config({}), IFACE, coordination()))

"""Fixtures of the cloud integration tests: a local EC2 (moto), an environment without the
host's cloud settings, an etcd client for reading and seeding route ledgers, and a cloud
namespace that a node namespace reaches."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudroutes.lab.aws import MotoServer
from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.lab.netns import Netns, Underlay
from cloudroutes.subnet.etcd_client import EtcdClient, EtcdSettings
from tests.cloud_harness import CLOUD_HOST, NODE_IP, CloudNetwork


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """One moto server per module (all servers in a process share state); tests reset it."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS_* variable or ~/.aws file from the host may reach botocore in these tests."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


@pytest.fixture
def etcd_client(etcd: EtcdCluster) -> Iterator[EtcdClient]:
    client = EtcdClient(EtcdSettings(endpoints=(etcd.endpoint,), request_timeout=3))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def cloud_network(netns: Callable[[str], Netns], underlay: Underlay) -> CloudNetwork:
    cloud, node = netns("crcloud"), netns("crnode")
    underlay.plug(cloud, "eth0", f"{CLOUD_HOST}/24")
    underlay.plug(node, "eth0", f"{NODE_IP}/24")
    return CloudNetwork(cloud, node)

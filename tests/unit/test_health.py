"""The probe endpoints over real HTTP on loopback: what a kubelet or a load balancer sees."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from cloudroutes.health import HealthServer, Probe
from cloudroutes.metrics import Metrics


class Agent:
    def __init__(self) -> None:
        self.probe = Probe(waiting_for="a network config at etcd /coreos.com/network/config")


@pytest.fixture
def agent_and_url() -> Iterator[tuple[Agent, str]]:
    agent = Agent()
    server = HealthServer("127.0.0.1", 0, Metrics(), lambda: {"lease": None}, lambda: agent.probe)
    server.start()
    try:
        yield agent, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_waiting_agent_is_alive_but_not_ready(agent_and_url: tuple[Agent, str]) -> None:
    _, url = agent_and_url
    waiting = "a network config at etcd /coreos.com/network/config"
    assert get(url + "/healthz") == (200, f"ok, waiting for {waiting}\n")
    assert get(url + "/readyz") == (503, f"not ready: waiting for {waiting}\n")


def test_ready_once_nothing_is_awaited(agent_and_url: tuple[Agent, str]) -> None:
    agent, url = agent_and_url
    agent.probe = Probe()
    assert get(url + "/healthz") == (200, "ok\n")
    assert get(url + "/readyz") == (200, "ok\n")


def test_unreachable_store_makes_a_ready_node_unready_but_alive(
    agent_and_url: tuple[Agent, str],
) -> None:
    agent, url = agent_and_url
    agent.probe = Probe(store_problem="cannot reach etcd at http://198.18.0.254:2379")
    assert get(url + "/healthz") == (200, "ok\n")
    assert get(url + "/readyz") == (
        503,
        "not ready: cannot reach etcd at http://198.18.0.254:2379\n",
    )


def test_status_is_json_and_unknown_paths_are_404(agent_and_url: tuple[Agent, str]) -> None:
    _, url = agent_and_url
    status, body = get(url + "/status")
    assert (status, json.loads(body)) == (200, {"lease": None})
    assert get(url + "/nope") == (404, "not found\n")


def test_without_a_probe_readiness_is_the_ready_event() -> None:
    server = HealthServer("127.0.0.1", 0, Metrics(), dict)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        assert get(url + "/healthz") == (200, "ok, waiting for start-up\n")
        assert get(url + "/readyz") == (503, "not ready: waiting for start-up\n")
        server.ready.set()
        assert get(url + "/readyz") == (200, "ok\n")
    finally:
        server.stop()

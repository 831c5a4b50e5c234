"""The leader election against a real etcd: one leader, fencing under partition, handover."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from cloudroutes.election import (
    FENCE_FRACTION,
    KEEPALIVE_PER_TTL,
    Deposed,
    Election,
    Fence,
    election_key,
)
from cloudroutes.lab.etcd import EtcdCluster
from cloudroutes.ledger import Ledger, LedgerEntry
from cloudroutes.subnet.etcd_client import EtcdClient, EtcdSettings, parse_endpoint
from tests.wait import wait_for

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
KEY = election_key(PREFIX, PREFIX, "cluster")
NET = IPv4Network("10.5.7.0/24")


class TcpProxy:
    """A loopback TCP relay to etcd that the test can cut, as a network partition would."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = True
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if not self._open:
                    downstream.close()
                    continue
                upstream = socket.create_connection(self._upstream)
                self._sockets += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._open = False
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def heal(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        self.cut()
        self._listener.close()


class Candidate:
    """An Election running in its thread, with the moments it gained and lost leadership."""

    def __init__(self, endpoint: str | list[str], name: str, ttl: int) -> None:
        self.name = name
        endpoints = (endpoint,) if isinstance(endpoint, str) else tuple(endpoint)
        self.client = EtcdClient(EtcdSettings(endpoints=endpoints, request_timeout=2))
        self.gained: list[float] = []
        self.lost: list[float] = []
        self.fences: list[Fence] = []
        self.election = Election(self.client, KEY, name, ttl, on_change=self._changed)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"election-{name}")
        self._thread.start()

    def _changed(self, leading: bool) -> None:
        (self.gained if leading else self.lost).append(time.monotonic())
        fence = self.election.fence()
        if leading and fence is not None and fence not in self.fences:
            self.fences.append(fence)

    def _run(self) -> None:
        try:
            self.election.run(self._stop)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), f"candidate {self.name} did not stop"
        self.client.close()
        assert self.error is None, f"candidate {self.name} failed: {self.error!r}"


@pytest.fixture
def candidates(etcd: EtcdCluster) -> Iterator[list[Candidate]]:
    """Append Candidate objects to the list; each is stopped when the test ends."""
    started: list[Candidate] = []
    try:
        yield started
    finally:
        for candidate in started:
            candidate.stop()


def leaders(group: list[Candidate]) -> list[Candidate]:
    return [c for c in group if c.election.is_leader()]


def one_leader(group: list[Candidate]) -> Candidate | None:
    found = leaders(group)
    return found[0] if len(found) == 1 else None


def key_holder(etcd: EtcdCluster) -> str | None:
    out = etcd.etcdctl("get", KEY, "--print-value-only").strip()
    return json.loads(out)["candidate"] if out else None


def test_one_leader_among_three_and_the_others_know_it(
    etcd: EtcdCluster, candidates: list[Candidate]
) -> None:
    candidates += [Candidate(etcd.endpoint, f"node-{i}", ttl=2) for i in range(3)]
    leader = wait_for(lambda: one_leader(candidates), 15, "one leader")
    assert key_holder(etcd) == leader.name
    wait_for(
        lambda: all(c.election.leader() == leader.name for c in candidates),
        10,
        "every candidate to name the leader",
    )
    # Across several TTLs (the leader keeps its lease alive), nobody else ever leads.
    deadline = time.monotonic() + 3 * 2
    while time.monotonic() < deadline:
        assert leaders(candidates) in ([leader], []), "two leaders at once"
        time.sleep(0.05)
    wait_for(lambda: leaders(candidates) == [leader], 5, "the same leader")
    assert all(not c.gained for c in candidates if c is not leader)


def requests_started(etcd: EtcdCluster) -> dict[str, int]:
    """How many requests of each gRPC method etcd has started, from its /metrics."""
    with urllib.request.urlopen(f"{etcd.endpoint}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("grpc_server_started_total{"):
            method = line.split('grpc_method="', 1)[1].split('"', 1)[0]
            counts[method] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def test_leading_and_following_cost_etcd_a_few_requests_per_ttl(
    etcd: EtcdCluster, candidates: list[Candidate]
) -> None:
    ttl = 3
    candidates += [Candidate(etcd.endpoint, f"node-{i}", ttl=ttl) for i in range(2)]
    wait_for(lambda: all(c.election.leader() for c in candidates), 15, "a leader, known to all")
    before = requests_started(etcd)
    start = time.monotonic()

    def since(method: str) -> int:
        return requests_started(etcd).get(method, 0) - before.get(method, 0)

    wait_for(lambda: since("LeaseKeepAlive") >= KEEPALIVE_PER_TTL, 5 * ttl, "a TTL of keepalives")
    elapsed = time.monotonic() - start
    # The leader: a keepalive and a read of its key every ttl / KEEPALIVE_PER_TTL, not back to
    # back; the follower: a read every ttl * FENCE_FRACTION (the watch wakes it sooner).
    assert elapsed >= ttl * (KEEPALIVE_PER_TTL - 1) / KEEPALIVE_PER_TTL
    assert since("Range") <= KEEPALIVE_PER_TTL + elapsed / (ttl * FENCE_FRACTION) + 3


def test_a_partitioned_leader_stops_writing_before_another_is_elected(
    etcd: EtcdCluster, candidates: list[Candidate]
) -> None:
    proxy = TcpProxy(parse_endpoint(etcd.endpoint))
    try:
        old = Candidate(proxy.endpoint, "partitioned", ttl=3)
        candidates.append(old)
        old_fence = wait_for(lambda: old.fences, 15, "the first candidate to lead")[0]
        candidates += [Candidate(etcd.endpoint, f"node-{i}", ttl=3) for i in (1, 2)]
        wait_for(lambda: candidates[1].election.leader() == "partitioned", 10, "followers")

        proxy.cut()
        new = wait_for(
            lambda: next((c for c in candidates[1:] if c.gained), None), 20, "a new leader"
        )
        assert old.lost, "the partitioned leader never noticed it lost its fence"
        # The old leader's fence lapsed, and it saw so, before the new leader started.
        assert old_fence.deadline < new.gained[0]
        assert old.lost[0] < new.gained[0]
        assert not old_fence.valid() and not old.election.is_leader()

        # The deposed leader's ledger write (over a link that still works) is refused.
        direct = EtcdClient(EtcdSettings(endpoints=(etcd.endpoint,), request_timeout=2))
        try:
            ledger = Ledger(direct, PREFIX, PREFIX, "rtb-1")
            route = LedgerEntry(NET, "eni-old")
            with pytest.raises(Deposed):
                ledger.record([route], fence=old_fence)
            assert Ledger(direct, PREFIX, PREFIX, "rtb-1").entries() == {}
            new_fence = new.election.fence()
            assert new_fence is not None
            ledger.record([route], fence=new_fence)
            assert Ledger(direct, PREFIX, PREFIX, "rtb-1").entries() == {route.destination: route}
        finally:
            direct.close()

        # Back on the network, the old leader follows the new one.
        proxy.heal()
        wait_for(lambda: old.election.leader() == new.name, 15, "the old leader to follow")
        assert leaders(candidates) == [new]
    finally:
        for candidate in candidates:
            candidate.stop()
        candidates.clear()
        proxy.close()


def test_resign_hands_over_without_waiting_for_the_lease_to_expire(
    etcd: EtcdCluster, candidates: list[Candidate]
) -> None:
    # A 30 s TTL: a handover within the wait below can only come from the resignation.
    candidates += [Candidate(etcd.endpoint, f"node-{i}", ttl=30) for i in range(3)]
    first = wait_for(lambda: one_leader(candidates), 15, "one leader")
    fence = first.election.fence()
    assert fence is not None
    first.election.resign()
    assert not fence.valid() and first.lost
    ledger = Ledger(first.client, PREFIX, PREFIX, "rtb-1")
    with pytest.raises(Deposed, match="no longer the leader"):
        ledger.record([LedgerEntry(NET, "eni-1")], fence=fence)
    second = wait_for(lambda: one_leader(candidates), 10, "a second leader")
    assert second is not first
    assert first.lost[0] < second.gained[0]
    assert key_holder(etcd) == second.name


def test_leadership_recovers_after_etcd_restarts(
    etcd: EtcdCluster, candidates: list[Candidate]
) -> None:
    candidates += [Candidate(etcd.endpoint, f"node-{i}", ttl=2) for i in range(3)]
    wait_for(lambda: one_leader(candidates), 15, "one leader")
    etcd.stop()
    wait_for(lambda: not leaders(candidates), 10, "no leader while etcd is down")
    etcd.start()
    leader = wait_for(lambda: one_leader(candidates), 20, "a leader after the restart")
    fence = leader.election.fence()
    assert fence is not None
    client = EtcdClient(EtcdSettings(endpoints=(etcd.endpoint,), request_timeout=2))
    try:
        ledger = Ledger(client, PREFIX, PREFIX, "rtb-1")
        ledger.record([LedgerEntry(NET, "eni-1")], fence=fence)
        assert NET in Ledger(client, PREFIX, PREFIX, "rtb-1").entries()
    finally:
        client.close()
    assert key_holder(etcd) == leader.name


def test_the_leader_keeps_leading_when_its_etcd_member_dies() -> None:
    cluster = EtcdCluster(size=3).start()
    group: list[Candidate] = []
    try:
        group += [Candidate(cluster.endpoints, f"node-{i}", ttl=3) for i in range(3)]
        leader = wait_for(lambda: one_leader(group), 15, "one leader")
        used = next(m for m in cluster.members if m.client_url == leader.client.endpoint)
        lapses = len(leader.lost)
        cluster.stop_member(used)
        # Its keepalives move to another member; the lease, and so the key, never expired.
        wait_for(
            lambda: leader.election.is_leader() and leader.client.endpoint != used.client_url,
            15,
            "the leader to keep its lease alive through another member",
        )
        assert all(not c.gained for c in group if c is not leader), "leadership changed hands"
        assert len(leader.lost) - lapses <= 1  # at most one lapse while etcd chose a leader
        cluster.start_member(used)
    finally:
        for candidate in group:
            candidate.stop()
        cluster.close()


def test_an_unreadable_leader_key_is_reported_and_waited_out(
    etcd: EtcdCluster, candidates: list[Candidate], caplog: pytest.LogCaptureFixture
) -> None:
    lease = etcd.etcdctl("lease", "grant", "3").split()[1]
    etcd.etcdctl("put", f"--lease={lease}", KEY, "{not json")
    with caplog.at_level(logging.WARNING, logger="cloudroutes.election"):
        candidates += [Candidate(etcd.endpoint, f"node-{i}", ttl=2) for i in range(2)]
        wait_for(lambda: "unreadable value" in caplog.text, 10, "a warning about the leader key")
        assert not leaders(candidates)
        assert all(c.election.leader() is None for c in candidates)
        leader = wait_for(lambda: one_leader(candidates), 15, "a leader once the lease ended")
    assert key_holder(etcd) == leader.name
    assert caplog.text.count("unreadable value") == len(candidates)  # once per candidate


def test_a_leader_key_without_an_etcd_lease_is_removed(
    etcd: EtcdCluster, candidates: list[Candidate], caplog: pytest.LogCaptureFixture
) -> None:
    etcd.etcdctl("put", KEY, '{"candidate": "someone by hand"}')
    with caplog.at_level(logging.WARNING, logger="cloudroutes.election"):
        candidates.append(Candidate(etcd.endpoint, "node-0", ttl=30))
        wait_for(candidates[0].election.is_leader, 10, "the candidate to lead")
    assert "has no etcd lease" in caplog.text
    assert key_holder(etcd) == "node-0"

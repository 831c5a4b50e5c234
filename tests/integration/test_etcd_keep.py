"""keep(): the node's own lease renewed, repaired when rewritten, re-created when lost, and
given up only when an operator deletes it or another node holds its subnet."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from cloudroutes.errors import LeaseError, LeaseRevoked
from cloudroutes.lab.etcd import EtcdCluster, free_port
from cloudroutes.lease import encode_attrs
from cloudroutes.subnet.etcd import EtcdLeaseSource
from tests.integration.test_etcd_source import (
    CONFIG,
    FAST,
    PREFIX,
    SUBNETS,
    Background,
    background,
    configured,
    etcdctl,
    joined,
    keeping,
    logged,
    make_source,
    node,
    stored,
    wipe,
)
from tests.wait import wait_for

pytestmark = pytest.mark.etcd
__all__ = ["background", "make_source"]  # fixtures, used by name


def test_a_kept_lease_is_renewed_and_an_abandoned_one_expires(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    # TTL 2 s is below the 60 min margin, so renewal happens halfway, every second.
    source, lease = joined(make_source, etcd.endpoint, lease_ttl=2)
    acquired = time.monotonic()
    key = SUBNETS + lease.key
    keeper = background(source.keep, lease)
    wait_for(
        lambda: (held := stored(etcd, key)) and held["lease"] != lease.store_lease_id,
        5,
        "a renewal onto a new etcd lease",
    )
    # Outliving the first etcd lease is the point: wait past its TTL.
    time.sleep(max(0.0, acquired + 2.5 - time.monotonic()))
    assert stored(etcd, key) is not None, "the lease expired although it was kept"
    keeper.join()
    assert keeper.error is None
    wait_for(lambda: stored(etcd, key) is None, timeout=6, what="the abandoned lease to expire")


def test_a_reservation_for_this_node_is_reused_and_stays_a_reservation(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    source = make_source(etcd.endpoint, lease_ttl=1)
    etcdctl(etcd, "put", SUBNETS + "10.5.42.0-24", encode_attrs(node(1)).decode())
    lease = source.acquire(configured(source), node(1, "0a:00:00:00:00:03"))
    assert lease.subnet == IPv4Network("10.5.42.0/24")
    assert lease.expiration is None and lease.is_reservation
    # Kept, it is never given a TTL: past the 1 s one it would have had, it is still there.
    keeper = background(source.keep, lease)
    time.sleep(1.2)
    held = stored(etcd, SUBNETS + "10.5.42.0-24")
    assert held is not None and held["lease"] == 0 and "0a:00:00:00:00:03" in held["value"]
    assert not keeper.done()


def test_keep_raises_lease_revoked_when_the_key_is_deleted(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, lease = joined(make_source, etcd.endpoint)
    keeper = keeping(caplog, background, source, lease)
    etcdctl(etcd, "del", SUBNETS + lease.key)
    wait_for(keeper.done, 10, "keep() to end")
    assert isinstance(keeper.error, LeaseRevoked)
    assert str(keeper.error) == "Lease has been revoked"


# Rewritten by someone else.


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("{broken", "held a value that does not decode (value is not JSON"),
        ('{"PublicIP": 3322019849}', "held a value that does not decode (PublicIP must be"),
        (encode_attrs(node(1, "0a:00:00:00:00:09")).decode(), "held other attributes"),
    ],
    ids=["not-json", "number-ip", "other-attributes"],
)
def test_a_rewritten_own_lease_is_written_back_at_once(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
    value: str,
    found: str,
) -> None:
    # TTL 600 s: the next renewal is minutes away, so only the watch can undo the write.
    source, lease = joined(make_source, etcd.endpoint, lease_ttl=600)
    keeper = keeping(caplog, background, source, lease)
    key = SUBNETS + lease.key
    etcdctl(etcd, "put", key, value)
    ours = encode_attrs(node(1)).decode()
    held = wait_for(
        lambda: (held := stored(etcd, key)) and held["value"] == ours and held, 10, "our value back"
    )
    assert held["lease"] not in (0, lease.store_lease_id)  # a fresh etcd lease, our full TTL
    ttl = etcdctl(etcd, "lease", "timetolive", format(held["lease"], "x"))
    assert "granted with TTL(600s)" in ttl
    assert logged(caplog, found) == 1
    assert keeper.error is None and not keeper.done()


def test_own_subnet_holding_another_nodes_lease_stops_keep_with_the_reason(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, lease = joined(make_source, etcd.endpoint, lease_ttl=600)
    keeper = keeping(caplog, background, source, lease)
    theirs = encode_attrs(node(2)).decode()
    etcdctl(etcd, "put", SUBNETS + lease.key, theirs)
    wait_for(keeper.done, 10, "keep() to end")
    assert isinstance(keeper.error, LeaseError) and not isinstance(keeper.error, LeaseRevoked)
    message = str(keeper.error)
    assert "another node (PublicIP 198.18.0.2)" in message and "restart" in message
    held = stored(etcd, SUBNETS + lease.key)
    assert held is not None and held["value"] == theirs  # not overwritten


# Lost: wiped, expired while unreachable.


def test_the_lease_comes_back_after_etcd_is_wiped(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, lease = joined(make_source, etcd.endpoint, lease_ttl=600)
    keeper = keeping(caplog, background, source, lease)
    assert source.store_problem is None
    etcd.stop()
    problem = wait_for(lambda: source.store_problem, 10, "keep() to notice etcd is gone")
    assert etcd.endpoint in problem and "\n" not in problem
    wipe_started = logged(caplog, "waiting for the config")
    wipe(etcd)
    # The network config went with everything else: keep() waits for it, saying so once.
    wait_for(lambda: logged(caplog, "waiting for the config") > wipe_started, 20, "the wait")
    assert stored(etcd, SUBNETS + lease.key) is None
    etcdctl(etcd, "put", f"{PREFIX}/config", CONFIG)
    held = wait_for(lambda: stored(etcd, SUBNETS + lease.key), 10, "the lease to come back")
    assert held["value"] == encode_attrs(node(1)).decode() and held["lease"] != 0
    assert logged(caplog, "waiting for the config") == wipe_started + 1
    assert logged(caplog, "created it again with the same subnet") == 1
    wait_for(lambda: source.store_problem is None, 10, "the store problem to clear")
    assert keeper.error is None and not keeper.done()


class Proxy:
    """A TCP relay to etcd that the test can cut (new and open connections fail) and restore:
    this node losing etcd while etcd itself goes on, expiring leases."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _drop(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _drop(src)
            _drop(dst)


def _drop(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture
def proxy(etcd: EtcdCluster) -> Iterator[Proxy]:
    relay = Proxy(etcd.members[0].client_port)
    yield relay
    relay.cut()


def test_a_lease_expired_while_etcd_was_unreachable_comes_back(
    etcd: EtcdCluster,
    proxy: Proxy,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, lease = joined(make_source, proxy.url, lease_ttl=2, failed_member_retry=0.1)
    keeper = keeping(caplog, background, source, lease)
    proxy.cut()
    wait_for(lambda: stored(etcd, SUBNETS + lease.key) is None, 10, "the lease to expire")
    proxy.restore()
    held = wait_for(lambda: stored(etcd, SUBNETS + lease.key), 20, "the lease to come back")
    assert held["value"] == encode_attrs(node(1)).decode() and held["lease"] != 0
    assert logged(caplog, "created it again with the same subnet") == 1
    assert keeper.error is None and not keeper.done()


def test_a_subnet_taken_while_etcd_was_unreachable_is_a_lease_error(
    etcd: EtcdCluster,
    proxy: Proxy,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, lease = joined(make_source, proxy.url, lease_ttl=2, failed_member_retry=0.1)
    keeper = keeping(caplog, background, source, lease)
    proxy.cut()
    wait_for(lambda: stored(etcd, SUBNETS + lease.key) is None, 10, "the lease to expire")
    etcdctl(etcd, "put", SUBNETS + lease.key, encode_attrs(node(2)).decode())
    proxy.restore()
    wait_for(keeper.done, 20, "keep() to end")
    assert isinstance(keeper.error, LeaseError)
    assert "another node (PublicIP 198.18.0.2)" in str(keeper.error)


def test_a_failed_renewal_is_retried_within_a_tenth_of_the_ttl(
    etcd: EtcdCluster,
    proxy: Proxy,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # flanneld's one-minute retry would let a 10 s lease expire; a tenth of the TTL does not.
    periods = replace(FAST, renew_retry=60.0)
    source, lease = joined(
        make_source, proxy.url, periods=periods, lease_ttl=10, failed_member_retry=0.1
    )
    keeper = keeping(caplog, background, source, lease)
    assert lease.expiration is not None
    # Unreachable from just before the renewal (halfway, at 5 s) until it failed once.
    renewal = lease.expiration.timestamp() - 5.0
    time.sleep(max(0.0, renewal - 0.5 - time.time()))
    proxy.cut()
    wait_for(lambda: logged(caplog, "Error renewing lease (trying again in 1.0 s)"), 5, "a failure")
    proxy.restore()
    wait_for(lambda: logged(caplog, "Lease renewed"), 4, "the renewal to succeed")
    held = stored(etcd, SUBNETS + lease.key)
    assert held is not None and held["lease"] != lease.store_lease_id
    assert logged(caplog, "created it again") == 0  # never lost
    assert keeper.error is None and not keeper.done()


def restore(cluster: EtcdCluster, snapshot: Path) -> None:
    """Put etcd back to ``snapshot``, as an operator restoring a backup does."""
    cluster.stop()
    member = cluster.members[0]
    shutil.rmtree(member.data_dir)
    subprocess.run(
        ["etcdctl", "snapshot", "restore", str(snapshot), "--data-dir", str(member.data_dir),
         "--name", member.name, "--initial-cluster", f"{member.name}={member.peer_url}",
         "--initial-advertise-peer-urls", member.peer_url],
        env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, check=True,
    )  # fmt: skip
    cluster.start()


def test_an_older_lease_restored_from_a_backup_is_written_back(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    source, _ = joined(make_source, etcd.endpoint, lease_ttl=600)
    backup = tmp_path / "backup.db"
    etcdctl(etcd, "snapshot", "save", str(backup))
    # Since the backup the node restarted with a new VtepMAC, and wrote more.
    lease = source.acquire(configured(source), node(1, "0a:00:00:00:00:0b"))
    for n in range(20):
        etcdctl(etcd, "put", f"{PREFIX}/unrelated", str(n))
    keeper = keeping(caplog, background, source, lease)
    restore(etcd, backup)
    ours = encode_attrs(node(1, "0a:00:00:00:00:0b")).decode()
    wait_for(
        lambda: (held := stored(etcd, SUBNETS + lease.key)) and held["value"] == ours,
        20,
        "this node's value back",
    )
    assert logged(caplog, "etcd's revision went back") == 1
    assert logged(caplog, "held other attributes; wrote this node's lease back") == 1
    assert keeper.error is None and not keeper.done()

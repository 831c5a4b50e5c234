"""The etcd lease source against a real etcd: flannel's keys, leases, renewals and watches."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from cloudroutes.config import NetworkConfig
from cloudroutes.errors import ConfigError, LeaseRevoked, OutOfSubnets, StoreUnavailable
from cloudroutes.lab.etcd import EtcdCluster, EtcdTLS, free_port
from cloudroutes.lease import Lease, LeaseAttrs, encode_attrs
from cloudroutes.lease_table import LeaseTable
from cloudroutes.subnet.etcd import CONFIG_NOT_FOUND, EtcdLeaseSource, EtcdPeriods, EtcdSettings
from cloudroutes.subnet.etcd_client import parse_endpoint

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
SUBNETS = f"{PREFIX}/subnets/"
FLANNEL_VALUE = '{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}'
FAST = EtcdPeriods(
    config_retry=0.1, renew_retry=0.3, backoff_initial=0.05, backoff_max=0.5, poll=0.05
)


def node(n: int, mac: str = "c6:d2:32:6f:8f:44") -> LeaseAttrs:
    return LeaseAttrs(
        public_ip=IPv4Address(f"198.18.0.{n}"),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": mac},
    )


def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Background:
    """Runs a blocking source method in a thread; keeps what it raised."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target, *args, self.stop))
        self._thread.start()

    def _run(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self.stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "did not stop when asked"


@pytest.fixture
def make_source() -> Iterator[Callable[..., EtcdLeaseSource]]:
    made: list[EtcdLeaseSource] = []

    def make(endpoints: str | list[str], **settings: Any) -> EtcdLeaseSource:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        source = EtcdLeaseSource(EtcdSettings(endpoints=endpoints, **settings), FAST)
        made.append(source)
        return source

    yield make
    for source in made:
        source.close()


@pytest.fixture
def background() -> Iterator[Callable[..., Background]]:
    running: list[Background] = []

    def start(target: Callable[..., None], *args: Any) -> Background:
        job = Background(target, *args)
        running.append(job)
        return job

    yield start
    for job in running:
        job.join()


def etcdctl(cluster: EtcdCluster, *args: str, endpoints: list[str] | None = None) -> str:
    if endpoints is None:
        return cluster.etcdctl(*args)
    cmd = ["etcdctl", f"--endpoints={','.join(endpoints)}", *args]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env={"ETCDCTL_API": "3"}, check=True
    )
    return result.stdout


def stored(cluster: EtcdCluster, key: str, **kw: Any) -> dict[str, Any] | None:
    """The key as etcd holds it: value (str) and lease id (int, 0 for none)."""
    out = json.loads(etcdctl(cluster, "get", key, "-w", "json", **kw))
    if not out.get("kvs"):
        return None
    kv = out["kvs"][0]
    return {"value": base64.b64decode(kv["value"]).decode(), "lease": kv.get("lease", 0)}


def configured(source: EtcdLeaseSource, text: str = CONFIG) -> NetworkConfig:
    return source.put_config(text)


def joined(
    make_source: Callable[..., EtcdLeaseSource], endpoints: str | list[str], **settings: Any
) -> tuple[EtcdLeaseSource, Lease]:
    """Node 1's source, after it wrote the network config and took a lease."""
    source = make_source(endpoints, **settings)
    return source, source.acquire(configured(source), node(1))


# The network config.


def test_network_config_waits_until_one_is_written(
    etcd: EtcdCluster, make_source: Callable[..., EtcdLeaseSource], caplog: pytest.LogCaptureFixture
) -> None:
    source = make_source(etcd.endpoint)
    result: list[NetworkConfig] = []
    waiter = threading.Thread(target=lambda: result.append(source.network_config()))
    with caplog.at_level(logging.WARNING):
        waiter.start()
        wait_for(lambda: CONFIG_NOT_FOUND in caplog.text, what="the not-found warning")
        etcdctl(etcd, "put", f"{PREFIX}/config", CONFIG)
        waiter.join(10)
    assert result and result[0].network == IPv4Network("10.5.0.0/16")
    assert result[0].source == f"etcd {PREFIX}/config"


def test_network_config_returns_when_stopped(
    etcd: EtcdCluster, make_source: Callable[..., EtcdLeaseSource]
) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(ConfigError, match="cloudroutes config set"):
        make_source(etcd.endpoint).network_config(stop)


def test_put_config_validates_before_writing(
    etcd: EtcdCluster, make_source: Callable[..., EtcdLeaseSource]
) -> None:
    source = make_source(etcd.endpoint)
    with pytest.raises(ConfigError, match="SubnetLen must be less than /31"):
        source.put_config('{"Network": "10.5.0.0/16", "SubnetLen": 31}')
    assert source.get_config_text() is None
    source.put_config(CONFIG)
    assert etcdctl(etcd, "get", f"{PREFIX}/config", "--print-value-only").strip() == CONFIG


def test_an_unreachable_etcd_is_one_clear_line(make_source: Callable[..., EtcdLeaseSource]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreUnavailable) as err:
        make_source(url).get_config_text()
    message = str(err.value)
    assert url in message and "--etcd-endpoints" in message
    assert "\n" not in message


# Acquiring, renewing, expiring.


def test_acquire_writes_flannels_value_with_an_etcd_lease(
    etcd: EtcdCluster, make_source: Callable[..., EtcdLeaseSource]
) -> None:
    _, lease = joined(make_source, etcd.endpoint, lease_ttl=600)
    assert lease.subnet is not None and lease.subnet.prefixlen == 24
    held = stored(etcd, SUBNETS + lease.key)
    assert held is not None
    assert held["value"].encode() == encode_attrs(node(1))
    assert held["lease"] == lease.store_lease_id != 0
    assert lease.expiration is not None
    left = lease.expiration - dt.datetime.now(dt.UTC)
    assert dt.timedelta(seconds=590) < left <= dt.timedelta(seconds=600)


def test_a_kept_lease_is_renewed_and_an_abandoned_one_expires(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    # TTL 2 s is below the 60 min margin, so renewal happens halfway, every second.
    source, lease = joined(make_source, etcd.endpoint, lease_ttl=2)
    key = SUBNETS + lease.key
    keeper = background(source.keep, lease)
    time.sleep(3.5)  # well past the first TTL
    held = stored(etcd, key)
    assert held is not None, "the lease expired although it was kept"
    assert held["lease"] != lease.store_lease_id  # renewed with a new etcd lease
    keeper.join()
    assert keeper.error is None
    wait_for(lambda: stored(etcd, key) is None, timeout=6, what="the abandoned lease to expire")


def test_racing_nodes_get_distinct_subnets_until_none_is_left(
    etcd: EtcdCluster, make_source: Callable[..., EtcdLeaseSource]
) -> None:
    # Eight subnets, eight nodes spread over two sources (two agents' connections) at once.
    sources = [make_source(etcd.endpoint, lease_ttl=600) for _ in range(2)]
    config = configured(
        sources[0], '{"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.0", "SubnetMax": "10.5.8.0"}'
    )
    start = threading.Barrier(8)
    won: dict[int, Lease] = {}
    failed: list[BaseException] = []

    def join(n: int) -> None:
        start.wait()
        try:
            won[n] = sources[n % 2].acquire(config, node(n))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=join, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failed == []
    assert len({lease.key for lease in won.values()}) == 8
    keys = etcdctl(etcd, "get", SUBNETS, "--prefix", "--keys-only").split()
    assert sorted(keys) == sorted(SUBNETS + lease.key for lease in won.values())
    with pytest.raises(OutOfSubnets, match=r"^out of subnets: all 8 /24 subnets"):
        sources[0].acquire(config, node(9))


def test_a_restarted_node_gets_its_subnet_back_by_public_ip(
    etcd: EtcdCluster, make_source: Callable[..., EtcdLeaseSource]
) -> None:
    first = make_source(etcd.endpoint, lease_ttl=600)
    config = configured(first)
    before = first.acquire(config, node(1))
    first.close()
    # The agent restarts with a new VtepMAC: same subnet, new value.
    after = make_source(etcd.endpoint, lease_ttl=600).acquire(config, node(1, "0a:00:00:00:00:02"))
    assert after.subnet == before.subnet
    held = stored(etcd, SUBNETS + after.key)
    assert held is not None and '"VtepMAC":"0a:00:00:00:00:02"' in held["value"]
    assert held["lease"] == after.store_lease_id
    assert len(etcdctl(etcd, "get", SUBNETS, "--prefix", "--keys-only").split()) == 1


def test_the_previous_subnet_from_subnet_env_is_reused(
    etcd: EtcdCluster, make_source: Callable[..., EtcdLeaseSource]
) -> None:
    source = make_source(etcd.endpoint)
    previous = (IPv4Network("10.5.77.1/24", strict=False), None)
    lease = source.acquire(configured(source), node(1), previous)
    assert lease.subnet == IPv4Network("10.5.77.0/24")


def test_an_incompatible_old_lease_is_replaced(
    etcd: EtcdCluster, make_source: Callable[..., EtcdLeaseSource]
) -> None:
    source = make_source(etcd.endpoint)
    etcdctl(etcd, "put", SUBNETS + "10.9.3.0-24", encode_attrs(node(1)).decode())
    lease = source.acquire(configured(source), node(1))
    keys = etcdctl(etcd, "get", SUBNETS, "--prefix", "--keys-only").split()
    assert keys == [SUBNETS + lease.key]


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
    # Kept, it is never given a TTL, so it cannot expire.
    keeper = background(source.keep, lease)
    time.sleep(1.5)
    held = stored(etcd, SUBNETS + "10.5.42.0-24")
    assert held is not None and held["lease"] == 0 and "0a:00:00:00:00:03" in held["value"]
    assert not keeper.done()


@pytest.mark.parametrize(
    ("config", "public_ip", "key_start"),
    [
        (
            '{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fc00::/48"}',
            "198.18.0.1",
            "10.5.",
        ),
        (
            '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00::/48"}',
            "0.0.0.0",
            "0.0.0.0-0&",
        ),
    ],
    ids=["dual-stack", "ipv6-only"],
)
def test_ipv6_leases_use_flannels_dual_key(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    config: str,
    public_ip: str,
    key_start: str,
) -> None:
    source = make_source(etcd.endpoint)
    attrs = LeaseAttrs(public_ip=IPv4Address(public_ip), public_ipv6=IPv6Address("2001:db8::1"))
    lease = source.acquire(configured(source, config), attrs)
    assert lease.ipv6_subnet is not None and lease.ipv6_subnet.prefixlen == 64
    assert lease.key.startswith(key_start) and "&fc00:" in lease.key
    held = stored(etcd, SUBNETS + lease.key)
    assert held is not None and held["value"] == encode_attrs(attrs).decode()
    assert [found.key for found in source.list_leases()] == [lease.key]
    # Restarted, the node finds it again by its public IP (IPv6 when it has no IPv4).
    assert source.acquire(configured(source, config), attrs).key == lease.key


def test_keep_raises_lease_revoked_when_the_key_is_deleted(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    source, lease = joined(make_source, etcd.endpoint)
    keeper = background(source.keep, lease)
    time.sleep(0.3)
    etcdctl(etcd, "del", SUBNETS + lease.key)
    wait_for(keeper.done, what="keep() to end")
    assert isinstance(keeper.error, LeaseRevoked)
    assert str(keeper.error) == "Lease has been revoked"


# Watching.


def test_flannel_leases_written_by_hand_are_understood(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = make_source(etcd.endpoint)
    etcd_lease = etcdctl(etcd, "lease", "grant", "300").split()[1]
    etcdctl(etcd, "put", f"--lease={etcd_lease}", SUBNETS + "10.5.9.0-24", FLANNEL_VALUE)
    etcdctl(etcd, "put", SUBNETS + "10.5.10.0-24", FLANNEL_VALUE.replace(".9", ".10"))
    etcdctl(etcd, "put", SUBNETS + "not-a-subnet", FLANNEL_VALUE)
    etcdctl(etcd, "put", SUBNETS + "10.5.11.0-24", "{broken")

    table = LeaseTable()
    with caplog.at_level(logging.WARNING):
        background(source.watch, table)
        assert table.wait_synced(10)
    leased, reservation = table.get("10.5.9.0-24"), table.get("10.5.10.0-24")
    assert leased is not None and reservation is not None
    assert len(table) == 2
    assert leased.backend_type == "vxlan"
    assert leased.attrs.backend_data == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
    assert encode_attrs(leased.attrs).decode() == FLANNEL_VALUE  # byte-identical round trip
    assert leased.store_lease_id == int(etcd_lease, 16)
    assert reservation.is_reservation
    # Expiry is looked up when listing for `cloudroutes leases`, not by the watch.
    listed = {lease.key: lease for lease in source.list_leases()}
    expiration = listed["10.5.9.0-24"].expiration
    assert expiration is not None
    assert expiration - dt.datetime.now(dt.UTC) > dt.timedelta(seconds=250)
    assert listed["10.5.10.0-24"].expiration is None
    assert f"{SUBNETS}not-a-subnet" in caplog.text
    assert f"{SUBNETS}10.5.11.0-24" in caplog.text

    # Then changes: a new lease, a deleted one.
    etcdctl(etcd, "put", SUBNETS + "10.5.12.0-24", FLANNEL_VALUE)
    etcdctl(etcd, "del", SUBNETS + "10.5.10.0-24")
    wait_for(lambda: table.get("10.5.12.0-24") and not table.get("10.5.10.0-24"), what="changes")
    assert [lease.key for lease in source.list_leases()] == ["10.5.12.0-24", "10.5.9.0-24"]


def test_the_table_includes_this_nodes_own_lease_and_sees_expiry(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    source, lease = joined(make_source, etcd.endpoint, lease_ttl=2)
    table = LeaseTable()
    background(source.watch, table)
    wait_for(lambda: table.get(lease.key), what="own lease in the table")
    wait_for(lambda: table.get(lease.key) is None, timeout=8, what="the expired lease to go")


def test_the_watch_resumes_after_etcd_restarts(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    source = make_source(etcd.endpoint)
    table = LeaseTable()
    background(source.watch, table)
    assert table.wait_synced(10)
    etcdctl(etcd, "put", SUBNETS + "10.5.1.0-24", FLANNEL_VALUE)
    wait_for(lambda: table.get("10.5.1.0-24"), what="the first lease")
    etcd.restart()
    etcdctl(etcd, "put", SUBNETS + "10.5.2.0-24", FLANNEL_VALUE)
    etcdctl(etcd, "del", SUBNETS + "10.5.1.0-24")
    wait_for(
        lambda: table.get("10.5.2.0-24") and not table.get("10.5.1.0-24"),
        timeout=20,
        what="changes made after the restart",
    )


class GatedTable(LeaseTable):
    """Holds the watch after its first snapshot until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.listed = threading.Event()
        self.gate = threading.Event()
        self.snapshots = 0

    def replace_all(self, leases: Any, revision: int) -> None:
        super().replace_all(leases, revision)
        self.snapshots += 1
        self.listed.set()
        self.gate.wait(10)


def test_the_watch_lists_again_after_compaction(
    etcd: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    source = make_source(etcd.endpoint)
    etcdctl(etcd, "put", SUBNETS + "10.5.1.0-24", FLANNEL_VALUE)
    table = GatedTable()
    background(source.watch, table)
    assert table.listed.wait(10)
    # While the watch is held after its list, the history it would resume from is compacted.
    etcdctl(etcd, "del", SUBNETS + "10.5.1.0-24")
    etcdctl(etcd, "put", SUBNETS + "10.5.2.0-24", FLANNEL_VALUE)
    revision = json.loads(etcdctl(etcd, "get", "x", "-w", "json"))["header"]["revision"]
    etcdctl(etcd, "compact", str(revision))
    table.gate.set()
    wait_for(
        lambda: table.get("10.5.2.0-24") and not table.get("10.5.1.0-24"),
        what="the table to converge after compaction",
    )
    assert table.snapshots >= 2


# TLS, auth, several members.


def make_certs(directory: Path) -> tuple[EtcdTLS, Path, Path]:
    """A CA, a server certificate for 127.0.0.1 (also used by etcdctl) and a client one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def write_key(key: ec.EllipticCurvePrivateKey, name: str) -> Path:
        path = directory / name
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def issue(
        name: str, key: Any, issuer_key: Any, issuer: x509.Name | None, **kw: Any
    ) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if kw.get("ca"):
            builder = builder.add_extension(
                x509.BasicConstraints(ca=True, path_length=None), critical=True
            )
        else:
            usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
            if kw.get("server"):
                usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
                builder = builder.add_extension(
                    x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]),
                    critical=False,
                )
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write_cert(cert: x509.Certificate, name: str) -> Path:
        path = directory / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("test-ca", ca_key, ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    tls = EtcdTLS(
        ca=write_cert(ca, "ca.pem"),
        cert=write_cert(issue("etcd", server_key, ca_key, ca.subject, server=True), "server.pem"),
        key=write_key(server_key, "server-key.pem"),
    )
    client_cert = write_cert(issue("node", client_key, ca_key, ca.subject), "client.pem")
    return tls, client_cert, write_key(client_key, "client-key.pem")


def test_tls_with_client_certificates(
    tmp_path: Path, make_source: Callable[..., EtcdLeaseSource]
) -> None:
    tls, cert, key = make_certs(tmp_path)
    cluster = EtcdCluster(tls=tls).start()
    try:
        assert cluster.endpoint.startswith("https://")
        source, lease = joined(
            make_source, cluster.endpoint, certfile=str(cert), keyfile=str(key), cafile=str(tls.ca)
        )
        assert cluster.etcdctl("get", SUBNETS + lease.key, "--print-value-only").strip() == (
            encode_attrs(node(1)).decode()
        )
        assert [found.key for found in source.list_leases()] == [lease.key]

        # Without a client certificate etcd refuses us: the error says where to look.
        with pytest.raises(StoreUnavailable) as err:
            make_source(cluster.endpoint, cafile=str(tls.ca)).get_config_text()
        assert cluster.endpoint in str(err.value) and "--etcd-certfile" in str(err.value)
    finally:
        cluster.close()


def test_username_and_password(
    etcd: EtcdCluster, make_source: Callable[..., EtcdLeaseSource]
) -> None:
    etcdctl(etcd, "user", "add", "root:s3cret-pw")
    etcdctl(etcd, "auth", "enable")
    source, lease = joined(make_source, etcd.endpoint, username="root", password="s3cret-pw")
    assert [found.key for found in source.list_leases()] == [lease.key]

    wrong = make_source(etcd.endpoint, username="root", password="not-the-pw-123")
    with pytest.raises(ConfigError) as err:
        wrong.get_config_text()
    message = str(err.value)
    assert "refused to log in user 'root'" in message and "--etcd-password" in message
    assert "not-the-pw-123" not in message and "s3cret-pw" not in message
    assert "not-the-pw-123" not in repr(wrong._settings)


@pytest.fixture
def three_members() -> Iterator[EtcdCluster]:
    # A fixture rather than a with-block: background jobs, set up later, stop before it closes.
    cluster = EtcdCluster(size=3).start()
    try:
        yield cluster
    finally:
        cluster.close()


def test_the_source_fails_over_while_each_member_in_turn_is_down(
    three_members: EtcdCluster,
    make_source: Callable[..., EtcdLeaseSource],
    background: Callable[..., Background],
) -> None:
    # Whichever member each of the source's connections uses, one of these stops is its own.
    cluster = three_members
    source, lease = joined(make_source, cluster.endpoints, lease_ttl=2)
    acquired = time.monotonic()
    table = LeaseTable()
    background(source.watch, table)
    keeper = background(source.keep, lease)
    assert table.wait_synced(10)

    for n, member in enumerate(cluster.members):
        cluster.stop_member(member)
        survivors = [url for url in cluster.endpoints if url != member.client_url]
        # Another node's lease, written through a surviving member, reaches the table.
        key = f"10.5.{200 + n}.0-24"
        etcdctl(cluster, "put", SUBNETS + key, FLANNEL_VALUE, endpoints=survivors)
        wait_for(lambda key=key: table.get(key), timeout=20, what=f"{key} with a member down")
        assert stored(cluster, SUBNETS + lease.key, endpoints=survivors) is not None
        cluster.start_member(member)

    # Our own lease, TTL 2 s, outlives the rolling restart and more by being renewed.
    time.sleep(max(0.0, acquired + 4.5 - time.monotonic()))
    held = stored(cluster, SUBNETS + lease.key, endpoints=cluster.endpoints[:1])
    assert held is not None and held["lease"] != lease.store_lease_id
    assert keeper.error is None and not keeper.done()
    keys = {found.key for found in source.list_leases()}
    assert keys == {lease.key, "10.5.200.0-24", "10.5.201.0-24", "10.5.202.0-24"}


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="--etcd-endpoints"):
        EtcdSettings(endpoints=["127.0.0.1:2379"])
    with pytest.raises(ConfigError, match="given together"):
        EtcdSettings(keyfile="/k.pem")
    with pytest.raises(ConfigError, match="1 to 1439"):
        EtcdSettings(renew_margin=1440)
    assert EtcdSettings(prefix="/x/y/").prefix == "/x/y"
    assert parse_endpoint("https://[::1]:2379") == ("[::1]", 2379)
    assert parse_endpoint("http://etcd.example") == ("etcd.example", 2379)
    assert "hunter2" not in repr(EtcdSettings(username="u", password="hunter2"))

"""The etcd lease source against a real etcd: config, acquiring, TLS, auth, failover.

The helpers and fixtures here are shared by the other test_etcd_*.py files: keeping a lease
(test_etcd_keep.py), watching (test_etcd_watch.py), and untrusted keys and values
(test_etcd_untrusted.py). Each test starts its own etcd, so none depends on another's data.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from cloudroutes.config import NetworkConfig
from cloudroutes.errors import ConfigError, OutOfSubnets, StoreUnavailable
from cloudroutes.lab.etcd import EtcdCluster, EtcdTLS, free_port
from cloudroutes.lease import Lease, LeaseAttrs, encode_attrs
from cloudroutes.lease_table import LeaseTable
from cloudroutes.subnet.etcd import CONFIG_NOT_FOUND, EtcdLeaseSource, EtcdPeriods, EtcdSettings
from cloudroutes.subnet.etcd_client import EtcdClient, parse_endpoint
from tests.wait import wait_for

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
SUBNETS = f"{PREFIX}/subnets/"
FLANNEL_VALUE = '{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}'
FAST = EtcdPeriods(
    config_retry=0.1, renew_retry=0.3, backoff_initial=0.05, backoff_max=0.5, poll=0.05
)
ETCD_LOG = "cloudroutes.subnet.etcd"


def node(n: int, mac: str = "c6:d2:32:6f:8f:44") -> LeaseAttrs:
    return LeaseAttrs(
        public_ip=IPv4Address(f"198.18.0.{n}"),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": mac},
    )


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

    def make(
        endpoints: str | list[str], periods: EtcdPeriods = FAST, **settings: Any
    ) -> EtcdLeaseSource:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        source = EtcdLeaseSource(EtcdSettings(endpoints=endpoints, **settings), periods)
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


@pytest.fixture
def raw(etcd: EtcdCluster) -> Iterator[EtcdClient]:
    """A plain client of the test's etcd, to write any bytes at all."""
    client = EtcdClient(EtcdSettings(endpoints=[etcd.endpoint]))
    yield client
    client.close()


def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    """How many records so far contain ``text`` (from any thread)."""
    return sum(text in record.getMessage() for record in caplog.records)


def keeping(
    caplog: pytest.LogCaptureFixture,
    background: Callable[..., Background],
    source: EtcdLeaseSource,
    lease: Lease,
) -> Background:
    """keep() in the background, once it watches its key (a delete is then seen live)."""
    caplog.set_level(logging.DEBUG, logger=ETCD_LOG)
    before = logged(caplog, "watching own lease")
    keeper = background(source.keep, lease)
    wait_for(lambda: logged(caplog, "watching own lease") > before, 10, "keep() to watch its key")
    return keeper


def wipe(cluster: EtcdCluster) -> None:
    """Lose everything: stop etcd, delete its data, start it empty (a new cluster)."""
    cluster.stop()
    for member in cluster.members:
        shutil.rmtree(member.data_dir)
    cluster.start()


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

"""The Alibaba VPC route table against the lab's fake VPC API, through the real aliyun SDK and
the fault proxy (Alibaba dialect), with its ledger in a real etcd: what it reports as ours,
what it writes (in batches), and how every API failure comes back.

The fixtures here (the fake API, the proxy, an environment without the host's Alibaba
settings) are also used by the backend's tests in test_ali_vpc.py.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from cloudroutes.errors import (
    QuotaExceeded,
    Rejected,
    RouteConflict,
    RouteNotFound,
    Throttled,
    Transient,
)
from cloudroutes.lab.alibaba import AlibabaVpcApi, LabAlibabaVpc, ManualClock, make_alibaba_vpc
from cloudroutes.lab.fault_proxy import (
    ALIBABA,
    Call,
    CannedError,
    DropAfterForward,
    Fault,
    FaultProxy,
    Proceed,
    Reply,
    ServerError,
    Throttle,
)
from cloudroutes.ledger import Ledger, LedgerEntry
from cloudroutes.reconciler import Gate
from cloudroutes.routes import UNKNOWN, Action, Change, EntryState, Plan, Route
from cloudroutes.subnet.etcd_client import EtcdClient
from providers.ali_route_table import (
    AliRouteTable,
    Credentials,
    Markers,
    NoAnswer,
    VpcClient,
)

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CLUSTER = "prod"
NETWORK = IPv4Network("10.5.0.0/16")
POLICY = "providers/policies/ali-vpc-node.json"


# -- fixtures shared with test_ali_vpc.py ---------------------------------------------------


@pytest.fixture
def clean_ali_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Alibaba setting of the host (credentials, endpoints) may reach the code under test."""
    for name in list(os.environ):
        if name.startswith(("ALIBABA_", "ALICLOUD_", "ALIYUN_", "ACCESS_KEY_", "CLOUDROUTES_ALI")):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def api() -> Iterator[AlibabaVpcApi]:
    with AlibabaVpcApi() as server:
        yield server


@pytest.fixture
def proxy(api: AlibabaVpcApi, clean_ali_env: None) -> Iterator[FaultProxy]:
    api.reset()
    with FaultProxy(api.url, dialect=ALIBABA) as server:
        yield server


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def vpc(api: AlibabaVpcApi, proxy: FaultProxy) -> LabAlibabaVpc:
    return make_alibaba_vpc(api, nodes=3, tables=2)


def vpc_client(proxy: FaultProxy, vpc: LabAlibabaVpc, secret: str | None = None) -> VpcClient:
    key = vpc.credentials
    credentials = Credentials(key.key_id, secret or key.secret)
    return VpcClient(proxy.url, vpc.region, lambda: credentials)


def make_table(
    proxy: FaultProxy, vpc: LabAlibabaVpc, etcd_client: EtcdClient, **kw: object
) -> AliRouteTable:
    table_id = str(kw.pop("table_id", vpc.route_table_id))
    client = kw.pop("client", None) or vpc_client(proxy, vpc)
    return AliRouteTable(
        client,  # type: ignore[arg-type]
        table_id,
        ledger=Ledger(etcd_client, PREFIX, CLUSTER, table_id),
        networks=(NETWORK,),
        member="node-0",
        policy=POLICY,
        gate=Gate(),
        vpc_lock=threading.Lock(),
        markers=Markers(CLUSTER),
        **kw,  # type: ignore[arg-type]
    )


def net(i: int) -> IPv4Network:
    return IPv4Network(f"10.5.{i}.0/24")


def route(i: int, hop: str) -> Route:
    return Route(net(i), hop, lease_key=f"10.5.{i}.0-24")


def plan(action: Action, *routes: Route) -> Plan:
    current = action is not Action.ADD
    return Plan(tuple(Change(action, r, current=r if current else None) for r in routes))


def entries(api: AlibabaVpcApi, vpc: LabAlibabaVpc) -> dict[str, tuple[str, str]]:
    """The table's custom entries as the API holds them: destination -> (next hop, status)."""
    return {e.destination: (e.next_hop_id, e.status) for e in api.entries(vpc.route_table_id)}


def hop(vpc: LabAlibabaVpc, i: int) -> str:
    return vpc.instances[i].instance_id


# -- tests ----------------------------------------------------------------------------------


def test_create_observe_delete_with_markers_and_ledger(
    api: AlibabaVpcApi, proxy: FaultProxy, vpc: LabAlibabaVpc, etcd_client: EtcdClient
) -> None:
    table = make_table(proxy, vpc, etcd_client)
    wanted = [route(1, hop(vpc, 0)), route(2, hop(vpc, 1))]
    outcomes = table.apply(plan(Action.ADD, *wanted))
    # Alibaba applies creates asynchronously: accepted, read again after the settle time.
    assert [(o.ok, o.pending) for o in outcomes] == [(True, True), (True, True)]
    assert proxy.counts().by_action == {"CreateRouteEntries": 1}
    listed = api.entries(vpc.route_table_id)
    assert {(e.destination, e.next_hop_id) for e in listed} == {
        ("10.5.1.0/24", hop(vpc, 0)),
        ("10.5.2.0/24", hop(vpc, 1)),
    }
    markers = Markers(CLUSTER)
    assert {e.name for e in listed} == {markers.name}
    assert {e.description for e in listed} == {
        f"cloudroutes cluster={markers.tag} lease=10.5.1.0-24",
        f"cloudroutes cluster={markers.tag} lease=10.5.2.0-24",
    }
    assert set(Ledger(etcd_client, PREFIX, CLUSTER, vpc.route_table_id).entries()) == {
        net(1),
        net(2),
    }

    proxy.reset_counts()
    seen = table.observe()
    assert seen.entries() == set(wanted)
    assert {o.state for o in seen.owned.values()} == {EntryState.ACTIVE}
    # The system entries (vSwitch, service range) are never listed, let alone reported.
    assert not seen.foreign
    assert proxy.counts().by_action == {"DescribeRouteEntryList": 1}

    outcomes = table.apply(plan(Action.DELETE, wanted[0]))
    assert [o.ok for o in outcomes] == [True]
    assert entries(api, vpc) == {"10.5.2.0/24": (hop(vpc, 1), "Available")}
    assert set(Ledger(etcd_client, PREFIX, CLUSTER, vpc.route_table_id).entries()) == {net(2)}


def test_an_entry_is_pending_until_alibaba_makes_it_available(
    api: AlibabaVpcApi, proxy: FaultProxy, vpc: LabAlibabaVpc, etcd_client: EtcdClient
) -> None:
    clock = ManualClock()
    api.clock = clock
    api.pending_seconds = 30
    table = make_table(proxy, vpc, etcd_client)
    assert table.limits.settle == 5.0 and table.limits.max_changes == 50
    table.apply(plan(Action.ADD, route(1, hop(vpc, 0))))
    assert entries(api, vpc) == {"10.5.1.0/24": (hop(vpc, 0), "Pending")}
    seen = table.observe()
    assert seen.owned[net(1)].state is EntryState.PENDING  # pending, not missing
    clock.advance(31)
    assert table.observe().owned[net(1)].state is EntryState.ACTIVE


def test_changes_refused_while_an_entry_is_pending_are_retried(
    api: AlibabaVpcApi, proxy: FaultProxy, vpc: LabAlibabaVpc, etcd_client: EtcdClient
) -> None:
    table = make_table(proxy, vpc, etcd_client)
    first = route(1, hop(vpc, 0))
    table.apply(plan(Action.ADD, first))
    table.observe()
    # A task in flight in the VPC: every write is refused with TaskConflict (HTTP 400).
    api.hold_task(vpc.vpc_id)
    [outcome] = table.apply(plan(Action.ADD, route(2, hop(vpc, 1))))
    assert isinstance(outcome.error, Transient) and "TaskConflict" in str(outcome.error)
    assert outcome.present is None  # refused as a whole: nothing was made
    api.hold_task(vpc.vpc_id, "OperationConflict")
    [outcome] = table.apply(plan(Action.DELETE, first))
    assert isinstance(outcome.error, Transient) and "OperationConflict" in str(outcome.error)
    api.release_task(vpc.vpc_id)
    # The entry itself is not Available yet: IncorrectRouteEntryStatus, also a 400.
    proxy.add(
        CannedError(
            actions={"DeleteRouteEntries"},
            code="IncorrectRouteEntryStatus",
            message="Specified routeEntry status error.",
            times=1,
        )
    )
    [outcome] = table.apply(plan(Action.DELETE, first))
    assert isinstance(outcome.error, Transient)
    assert entries(api, vpc) == {"10.5.1.0/24": (hop(vpc, 0), "Available")}
    [outcome] = table.apply(plan(Action.DELETE, first))  # the retry
    assert outcome.ok and entries(api, vpc) == {}


def test_a_duplicate_is_done_when_it_is_ours_and_a_conflict_when_it_is_not(
    api: AlibabaVpcApi, proxy: FaultProxy, vpc: LabAlibabaVpc, etcd_client: EtcdClient
) -> None:
    table = make_table(proxy, vpc, etcd_client)
    # Our create went through but its answer was lost: the retry finds it, same instance.
    proxy.add(DropAfterForward(actions={"CreateRouteEntries"}, times=1))
    [lost] = table.apply(plan(Action.ADD, route(1, hop(vpc, 0))))
    assert isinstance(lost.error, NoAnswer)
    [again] = table.apply(plan(Action.ADD, route(1, hop(vpc, 0))))
    assert again.ok
    assert entries(api, vpc) == {"10.5.1.0/24": (hop(vpc, 0), "Available")}

    # Somebody else's entry at a destination we want: left alone, reported with its id.
    foreign_id = api.put_entry(vpc.route_table_id, "10.5.2.0/24", hop(vpc, 2), name="ops")
    [conflict] = table.apply(plan(Action.ADD, route(2, hop(vpc, 1))))
    assert isinstance(conflict.error, RouteConflict)
    assert foreign_id in str(conflict.error) and hop(vpc, 2) in str(conflict.error)
    assert entries(api, vpc)["10.5.2.0/24"] == (hop(vpc, 2), "Available")
    assert net(2) not in Ledger(etcd_client, PREFIX, CLUSTER, vpc.route_table_id).entries()

    # Ours (the ledger says so) but to another instance: retargeted in place.
    ledger = Ledger(etcd_client, PREFIX, CLUSTER, vpc.route_table_id)
    ledger.record([LedgerEntry(net(3), hop(vpc, 0), "10.5.3.0-24", "node-0")])
    entry_id = api.put_entry(vpc.route_table_id, "10.5.3.0/24", hop(vpc, 0))
    table.observe()  # the table knows the ledger as of its last read
    [stale] = table.apply(plan(Action.ADD, route(3, hop(vpc, 1))))
    assert isinstance(stale.error, Transient)
    assert stale.present == Route(net(3), hop(vpc, 0))
    proxy.reset_counts()
    change = Change(Action.REPLACE, route(3, hop(vpc, 1)), current=Route(net(3), hop(vpc, 0)))
    [replaced] = table.apply(Plan((change,)))
    assert replaced.ok and replaced.pending
    assert proxy.counts().by_action == {"ModifyRouteEntry": 1}  # no delete, no gap
    [after] = [e for e in api.entries(vpc.route_table_id) if e.destination == "10.5.3.0/24"]
    assert (after.entry_id, after.next_hop_id) == (entry_id, hop(vpc, 1))
    assert after.name == Markers(CLUSTER).name
    assert table.observe().owned[net(3)].entry == Route(net(3), hop(vpc, 1))
    assert ledger.entries()[net(3)].previous_target is None


def test_a_plan_of_120_creates_is_three_batches(
    api: AlibabaVpcApi, proxy: FaultProxy, vpc: LabAlibabaVpc, etcd_client: EtcdClient
) -> None:
    table = make_table(proxy, vpc, etcd_client)
    wanted = [route(i, hop(vpc, i % 3)) for i in range(1, 121)]
    outcomes = table.apply(plan(Action.ADD, *wanted))
    assert len(outcomes) == 120 and all(o.ok for o in outcomes)
    assert proxy.counts().by_action == {"CreateRouteEntries": 3}
    proxy.reset_counts()
    assert table.observe().entries() == set(wanted)
    # Every page of the list is read (the API gives at most 100 a page).
    assert proxy.counts().by_action == {"DescribeRouteEntryList": 2}
    outcomes = table.apply(plan(Action.DELETE, *wanted))
    assert all(o.ok for o in outcomes) and entries(api, vpc) == {}
    assert proxy.counts()["DeleteRouteEntries"] == 3


def test_flanneld_entries_are_adopted_and_foreign_ones_survive(
    api: AlibabaVpcApi, proxy: FaultProxy, vpc: LabAlibabaVpc, etcd_client: EtcdClient
) -> None:
    api.put_entry(vpc.route_table_id, "10.5.1.0/24", hop(vpc, 0))  # flanneld's: no name
    api.put_entry(vpc.route_table_id, "10.5.2.0/24", hop(vpc, 1), name="k8s-route")
    api.put_entry(vpc.route_table_id, "192.168.9.0/24", hop(vpc, 1))  # outside the Network
    api.put_entry(vpc.route_table_id, "0.0.0.0/0", hop(vpc, 2))  # the default route
    table = make_table(proxy, vpc, etcd_client, collect=True)
    seen = table.observe()
    assert not seen.owned
    assert set(seen.foreign) == {net(1), net(2)}
    assert seen.foreign[net(1)].adoptable and not seen.foreign[net(2)].adoptable
    assert "aliyun vpc DeleteRouteEntry" in seen.foreign[net(2)].advice

    proxy.reset_counts()
    adopt = Change(Action.ADOPT, route(1, hop(vpc, 0)), current=Route(net(1), hop(vpc, 0)))
    [outcome] = table.apply(Plan((adopt,)))
    assert outcome.ok and proxy.counts().writes == 0  # taken over in place
    assert table.observe().entries() == {Route(net(1), hop(vpc, 0))}

    # A delete of an entry that is not ours is refused by the ledger, never sent.
    [refused] = table.apply(plan(Action.DELETE, Route(net(2), hop(vpc, 1))))
    assert isinstance(refused.error, RouteNotFound)
    assert proxy.counts().writes == 0
    assert set(entries(api, vpc)) == {"10.5.1.0/24", "10.5.2.0/24", "192.168.9.0/24", "0.0.0.0/0"}


def test_throttling_quota_and_server_errors_are_classified(
    api: AlibabaVpcApi, proxy: FaultProxy, vpc: LabAlibabaVpc, etcd_client: EtcdClient
) -> None:
    table = make_table(proxy, vpc, etcd_client)
    throttle = proxy.add(Throttle(actions={"CreateRouteEntries"}, times=1))
    outcomes = table.apply(plan(Action.ADD, route(1, hop(vpc, 0)), route(2, hop(vpc, 1))))
    assert all(isinstance(o.error, Throttled) for o in outcomes)
    assert "Throttling.User" in str(outcomes[0].error) and throttle.fired == 1
    assert entries(api, vpc) == {}
    assert not Ledger(etcd_client, PREFIX, CLUSTER, vpc.route_table_id).entries()

    api.set_route_quota(2, vpc.route_table_id)
    wanted = [route(i, hop(vpc, 0)) for i in (1, 2, 3)]
    outcomes = table.apply(plan(Action.ADD, *wanted))
    assert [o.ok for o in outcomes] == [True, True, False]
    assert isinstance(outcomes[2].error, QuotaExceeded) and outcomes[2].present is None
    assert net(3) not in Ledger(etcd_client, PREFIX, CLUSTER, vpc.route_table_id).entries()

    proxy.add(ServerError(actions={"DescribeRouteEntryList"}, status=503, times=1))
    with pytest.raises(Transient):
        table.observe()
    assert len(table.observe().owned) == 2


def test_a_missing_permission_names_the_ram_action_and_the_policy(
    api: AlibabaVpcApi, proxy: FaultProxy, vpc: LabAlibabaVpc, etcd_client: EtcdClient
) -> None:
    api.forbid("CreateRouteEntries")
    table = make_table(proxy, vpc, etcd_client)
    [outcome] = table.apply(plan(Action.ADD, route(1, hop(vpc, 0))))
    assert isinstance(outcome.error, Rejected)
    text = str(outcome.error)
    assert "vpc:CreateRouteEntries" in text and POLICY in text and "Forbidden.RAM" in text
    api.forbid("DescribeRouteEntryList")
    with pytest.raises(Rejected, match="vpc:DescribeRouteEntryList"):
        table.observe()


def test_a_wrong_secret_is_one_clear_line_without_the_secret(
    api: AlibabaVpcApi,
    proxy: FaultProxy,
    vpc: LabAlibabaVpc,
    etcd_client: EtcdClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "not-the-secret-" + "x" * 20
    table = make_table(proxy, vpc, etcd_client, client=vpc_client(proxy, vpc, wrong))
    with caplog.at_level(logging.DEBUG), pytest.raises(Rejected) as caught:
        table.observe()
    text = str(caught.value)
    assert "\n" not in text
    assert "AccessKeyID/AccessKeySecret" in text and "RAM role" in text
    assert "SignatureDoesNotMatch" in text or "InvalidAccessKeySecret" in text
    for secret in (wrong, vpc.credentials.secret):
        assert secret not in text and secret not in caplog.text
    # An unknown key id is a credential error too.
    unknown = Credentials("LTAI-nobody", "whatever")
    client = VpcClient(proxy.url, vpc.region, lambda: unknown)
    with pytest.raises(Rejected, match="InvalidAccessKeyId"):
        make_table(proxy, vpc, etcd_client, client=client).observe()
    assert "whatever" not in repr(unknown) and vpc.credentials.secret not in repr(table)


def test_a_batch_answer_that_hides_which_entries_failed_is_read_again(
    api: AlibabaVpcApi, proxy: FaultProxy, vpc: LabAlibabaVpc, etcd_client: EtcdClient
) -> None:
    class Vague(Fault):
        """The batch is applied; its answer names a failure but not the entry."""

        def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
            reply = proceed()
            document = json.loads(reply.body)
            document["FailedCount"] = 1
            document["FailedRouteEntries"] = [{"FailedCode": "InternalError"}]
            return Reply(reply.status, reply.headers, json.dumps(document).encode())

    proxy.add(Vague(actions={"CreateRouteEntries"}, times=1))
    table = make_table(proxy, vpc, etcd_client)
    wanted = [route(1, hop(vpc, 0)), route(2, hop(vpc, 1))]
    outcomes = table.apply(plan(Action.ADD, *wanted))
    assert all(isinstance(o.error, NoAnswer) and o.present is UNKNOWN for o in outcomes)
    # Nothing is taken back from the ledger: the next read decides.
    assert set(Ledger(etcd_client, PREFIX, CLUSTER, vpc.route_table_id).entries()) == {
        net(1),
        net(2),
    }
    assert table.observe().entries() == set(wanted)

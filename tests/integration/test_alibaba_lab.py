"""The local Alibaba Cloud lab: the fake VPC API, the ECS metadata server, the scenario.

The ali-vpc backend's tests trust this lab, so it is checked with the real clients:
aliyun-python-sdk-core signs and sends every request, aliyun-python-sdk-vpc builds them, and
the SDK parses every answer and error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cloudroutes.lab.alibaba import (
    TOKEN_HEADER,
    TTL_HEADER,
    AccessKey,
    AcsClient,
    AlibabaLab,
    AlibabaVpcApi,
    EcsMetadata,
    LabAlibabaVpc,
    ManualClock,
    alibaba_client,
    at,
    make_alibaba_vpc,
    sign,
    string_to_sign,
)
from cloudroutes.lab.fault_proxy import ALIBABA, FaultProxy, Throttle
from tests.cloud_harness import CLOUD_HOST, NODE_IP, CloudNetwork
from tests.conftest import needs_root
from tests.wait import wait_for

_exceptions = pytest.importorskip("aliyunsdkcore.acs_exception.exceptions")
ServerException = _exceptions.ServerException
ClientException = _exceptions.ClientException


@pytest.fixture(scope="module")
def api() -> Iterator[AlibabaVpcApi]:
    with AlibabaVpcApi() as server:
        yield server


@pytest.fixture
def lab(api: AlibabaVpcApi) -> LabAlibabaVpc:
    api.reset()
    return make_alibaba_vpc(api, nodes=3, tables=2)


@pytest.fixture
def client(api: AlibabaVpcApi, lab: LabAlibabaVpc) -> AcsClient:
    return alibaba_client(api.url, lab.credentials, lab.region)


# -- calls through the real SDK ---------------------------------------------------------------


def _call(client: AcsClient, url: str, request: Any, region: str) -> dict[str, Any]:
    return json.loads(client.do_action_with_exception(at(request, url, region)))


def _error(client: AcsClient, url: str, request: Any, region: str) -> Any:
    with pytest.raises(ServerException) as caught:
        client.do_action_with_exception(at(request, url, region))
    return caught.value


def create_request(table: str, destination: str, hop: str, name: str = "cr") -> Any:
    from aliyunsdkvpc.request.v20160428.CreateRouteEntryRequest import CreateRouteEntryRequest

    request = CreateRouteEntryRequest()
    request.set_RouteTableId(table)
    request.set_DestinationCidrBlock(destination)
    request.set_NextHopType("Instance")
    request.set_NextHopId(hop)
    request.set_RouteEntryName(name)
    request.set_Description("cloudroutes: pod subnet of node")
    return request


def delete_request(entry_id: str = "", table: str = "", destination: str = "") -> Any:
    from aliyunsdkvpc.request.v20160428.DeleteRouteEntryRequest import DeleteRouteEntryRequest

    request = DeleteRouteEntryRequest()
    if entry_id:
        request.set_RouteEntryId(entry_id)
    if table:
        request.set_RouteTableId(table)
    if destination:
        request.set_DestinationCidrBlock(destination)
    return request


def list_request(table: str, max_result: int | None = None, token: str = "", **filters: str) -> Any:
    from aliyunsdkvpc.request.v20160428.DescribeRouteEntryListRequest import (
        DescribeRouteEntryListRequest,
    )

    request = DescribeRouteEntryListRequest()
    request.set_RouteTableId(table)
    if max_result is not None:
        request.set_MaxResult(max_result)
    if token:
        request.set_NextToken(token)
    for key, value in filters.items():
        getattr(request, f"set_{key}")(value)
    return request


def batch_create_request(entries: list[dict[str, str]]) -> Any:
    from aliyunsdkvpc.request.v20160428.CreateRouteEntriesRequest import (
        CreateRouteEntriesRequest,
    )

    request = CreateRouteEntriesRequest()
    request.set_RouteEntriess(entries)
    return request


def batch_delete_request(entries: list[dict[str, str]]) -> Any:
    from aliyunsdkvpc.request.v20160428.DeleteRouteEntriesRequest import (
        DeleteRouteEntriesRequest,
    )

    request = DeleteRouteEntriesRequest()
    request.set_RouteEntriess(entries)
    return request


def listed(client: AcsClient, url: str, lab: LabAlibabaVpc, table: str, page: int = 100) -> list:
    """Every custom entry of ``table``, following NextToken to the end."""
    entries: list[dict[str, Any]] = []
    token = ""
    while True:
        request = list_request(table, page, token, RouteEntryType="Custom")
        answer = _call(client, url, request, lab.region)
        entries += answer["RouteEntrys"]["RouteEntry"]
        token = answer["NextToken"]
        if not token:
            return entries


def signed(key: AccessKey, params: dict[str, str], nonce: str = "") -> dict[str, str]:
    """A request's parameters signed here rather than by the SDK: for what it will not send."""
    query = {
        "Format": "JSON",
        "Version": "2016-04-28",
        "AccessKeyId": key.key_id,
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "SignatureNonce": nonce or str(uuid.uuid4()),
        "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **params,
    }
    query["Signature"] = sign(string_to_sign("POST", query), key.secret)
    return query


def raw_call(
    api: AlibabaVpcApi, key: AccessKey, params: dict[str, str], nonce: str = ""
) -> tuple[int, dict]:
    url = f"{api.url}/?{urllib.parse.urlencode(signed(key, params, nonce))}"
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


# -- the scenario ----------------------------------------------------------------------------


def test_make_alibaba_vpc_builds_what_it_returns(api, lab, client) -> None:
    from aliyunsdkvpc.request.v20160428.DescribeRouteTableListRequest import (
        DescribeRouteTableListRequest,
    )
    from aliyunsdkvpc.request.v20160428.DescribeVpcsRequest import DescribeVpcsRequest
    from aliyunsdkvpc.request.v20160428.DescribeVRoutersRequest import DescribeVRoutersRequest

    vpcs = DescribeVpcsRequest()
    vpcs.set_VpcId(lab.vpc_id)
    vpc = _call(client, api.url, vpcs, lab.region)["Vpcs"]["Vpc"]
    assert [v["VRouterId"] for v in vpc] == [lab.vrouter_id]
    assert vpc[0]["CidrBlock"] == "198.18.0.0/16"
    assert vpc[0]["VSwitchIds"]["VSwitchId"] == [lab.vswitch_id]

    routers = DescribeVRoutersRequest()
    routers.set_VRouterId(lab.vrouter_id)
    router = _call(client, api.url, routers, lab.region)["VRouters"]["VRouter"]
    assert router[0]["RouteTableIds"]["RouteTableId"] == list(lab.route_table_ids)
    assert len(lab.route_table_ids) == 2

    tables = DescribeRouteTableListRequest()
    tables.set_VpcId(lab.vpc_id)
    listed_tables = _call(client, api.url, tables, lab.region)["RouterTableList"]
    kinds = {t["RouteTableId"]: t["RouteTableType"] for t in listed_tables["RouterTableListType"]}
    assert kinds == {lab.route_table_ids[0]: "System", lab.route_table_ids[1]: "Custom"}

    ips = [i.private_ip for i in lab.instances]
    assert ips == ["198.18.0.10", "198.18.0.11", "198.18.0.12"]
    assert len({i.instance_id for i in lab.instances}) == 3
    # A VPC in another region is not there for a client of this one.
    other = alibaba_client(api.url, lab.credentials, "eu-central-1")
    assert _call(other, api.url, DescribeVpcsRequest(), "eu-central-1")["Vpcs"]["Vpc"] == []


def test_a_table_starts_with_system_entries_only(api, lab, client) -> None:
    answer = _call(client, api.url, list_request(lab.route_table_id), lab.region)
    entries = answer["RouteEntrys"]["RouteEntry"]
    assert {e["Type"] for e in entries} == {"System"}
    assert {e["DestinationCidrBlock"] for e in entries} == {lab.vswitch_cidr, "100.64.0.0/10"}
    assert api.entries(lab.route_table_id) == ()


# -- authentication --------------------------------------------------------------------------


def test_a_wrong_secret_is_a_credential_error_not_a_crash(api, lab) -> None:
    wrong = alibaba_client(api.url, AccessKey(lab.credentials.key_id, "not-the-secret"))
    error = _error(wrong, api.url, list_request(lab.route_table_id), lab.region)
    # The SDK turns SignatureDoesNotMatch into InvalidAccessKeySecret when it signed the same
    # string as the server, which is the case here: only the secret differs.
    assert error.get_error_code() in {"InvalidAccessKeySecret", "SignatureDoesNotMatch"}
    assert error.get_http_status() == 400


def test_a_tampered_request_gets_signature_does_not_match(api, lab) -> None:
    params = {"Action": "DescribeRouteEntryList", "RegionId": lab.region}
    params["RouteTableId"] = lab.route_table_id
    good = AccessKey(lab.credentials.key_id, lab.credentials.secret)
    assert raw_call(api, good, params)[0] == 200
    # Signed with another secret: the server's string to sign is in the message, as the SDK
    # expects (it splits the message on ':' to compare).
    status, body = raw_call(api, AccessKey(good.key_id, "other"), params)
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")
    assert "server string to sign is:POST&%2F&" in body["Message"]
    assert {"RequestId", "HostId", "Code", "Message", "Recommend"} <= body.keys()


def test_an_unknown_access_key_is_not_found(api, lab) -> None:
    stranger = alibaba_client(api.url, AccessKey("LTAInobody", "secret"))
    error = _error(stranger, api.url, list_request(lab.route_table_id), lab.region)
    assert error.get_error_code() == "InvalidAccessKeyId.NotFound"


def test_region_id_is_required(api, lab) -> None:
    # The SDK fills RegionId in from the client's region, so this request is signed here.
    params = {"Action": "DescribeRouteEntryList", "RouteTableId": lab.route_table_id}
    status, body = raw_call(api, lab.credentials, params)
    assert (status, body["Code"]) == (400, "MissingRegionId")
    status, body = raw_call(api, lab.credentials, {**params, "RegionId": "eu-central-1"})
    assert (status, body["Code"]) == (404, "InvalidRouteTableId.NotFound")


def test_a_replayed_nonce_is_refused(api, lab) -> None:
    params = {"Action": "DescribeVpcs", "RegionId": lab.region}
    assert raw_call(api, lab.credentials, params, nonce="same-nonce")[0] == 200
    status, body = raw_call(api, lab.credentials, params, nonce="same-nonce")
    assert (status, body["Code"]) == (400, "SignatureNonceUsed")


def test_a_garbled_signature_is_a_mismatch_not_a_crash(api, lab) -> None:
    query = signed(lab.credentials, {"Action": "DescribeVpcs", "RegionId": lab.region})
    query["Signature"] = "s\u00e9\u2603"
    status, body = api.answer("POST", query)
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")


def test_secrets_stay_out_of_repr(lab) -> None:
    assert lab.credentials.secret not in repr(lab)


# -- route entries, one at a time ------------------------------------------------------------


def test_create_describe_delete(api, lab, client) -> None:
    node = lab.instances[1]
    created = _call(
        client,
        api.url,
        create_request(lab.route_table_id, "10.244.1.0/24", node.instance_id, "cr-node1"),
        lab.region,
    )
    assert created["RouteEntryId"].startswith("rte-")

    [entry] = listed(client, api.url, lab, lab.route_table_id)
    assert entry["RouteEntryId"] == created["RouteEntryId"]
    assert entry["DestinationCidrBlock"] == "10.244.1.0/24"
    assert entry["Type"] == "Custom"
    assert entry["Status"] == "Available"
    assert entry["RouteEntryName"] == "cr-node1"
    assert entry["NextHops"]["NextHop"] == [
        {"NextHopType": "Instance", "NextHopId": node.instance_id, "Enabled": 1}
    ]
    # The other table of the VPC is untouched.
    assert listed(client, api.url, lab, lab.route_table_ids[1]) == []

    filtered = _call(
        client,
        api.url,
        list_request(lab.route_table_id, DestinationCidrBlock="10.244.1.0/24"),
        lab.region,
    )
    assert filtered["TotalCount"] == 1

    _call(client, api.url, delete_request(created["RouteEntryId"]), lab.region)
    assert listed(client, api.url, lab, lab.route_table_id) == []
    again = _error(client, api.url, delete_request(created["RouteEntryId"]), lab.region)
    assert (again.get_error_code(), again.get_http_status()) == ("InvalidRouteEntry.NotFound", 400)


def test_delete_by_destination(api, lab, client) -> None:
    hop = lab.instances[0].instance_id
    _call(client, api.url, create_request(lab.route_table_id, "10.244.2.0/24", hop), lab.region)
    request = delete_request(table=lab.route_table_id, destination="10.244.2.0/24")
    _call(client, api.url, request, lab.region)
    assert api.entries(lab.route_table_id) == ()


def test_system_entries_cannot_be_deleted(api, lab, client) -> None:
    system = api.entries(lab.route_table_id, kind="System")[0]
    error = _error(client, api.url, delete_request(system.entry_id), lab.region)
    assert error.get_error_code() == "OperationDenied"


def test_a_duplicate_destination_is_refused(api, lab, client) -> None:
    first, second = lab.instances[0].instance_id, lab.instances[1].instance_id
    _call(client, api.url, create_request(lab.route_table_id, "10.244.3.0/24", first), lab.region)
    request = create_request(lab.route_table_id, "10.244.3.0/24", second)
    error = _error(client, api.url, request, lab.region)
    assert (error.get_error_code(), error.get_http_status()) == ("InvalidCIDRBlock.Duplicate", 400)
    assert [e.next_hop_id for e in api.entries(lab.route_table_id)] == [first]


def test_bad_targets_are_refused(api, lab, client) -> None:
    table, hop = lab.route_table_id, lab.instances[0].instance_id
    cases = {
        ("10.244.4.0/24", "i-nosuchinstance0000"): "InvalidNextHopId.NotFound",
        ("10.244.4.0/33", hop): "InvalidCidrBlock.Malformed",
        ("198.18.1.0/24", hop): "InvalidCidrBlock",  # inside the vSwitch
    }
    for (destination, target), code in cases.items():
        error = _error(client, api.url, create_request(table, destination, target), lab.region)
        assert error.get_error_code() == code, destination
    missing = create_request("vtb-nosuchtable", "10.244.4.0/24", hop)
    error = _error(client, api.url, missing, lab.region)
    assert (error.get_error_code(), error.get_http_status()) == (
        "InvalidRouteTableId.NotFound",
        404,
    )
    assert api.entries(table) == ()


def test_a_client_token_makes_a_create_idempotent(api, lab, client) -> None:
    hop = lab.instances[0].instance_id
    request = create_request(lab.route_table_id, "10.244.5.0/24", hop)
    request.set_ClientToken("token-1")
    first = _call(client, api.url, request, lab.region)
    retry = create_request(lab.route_table_id, "10.244.5.0/24", hop)
    retry.set_ClientToken("token-1")
    assert _call(client, api.url, retry, lab.region)["RouteEntryId"] == first["RouteEntryId"]
    assert len(api.entries(lab.route_table_id)) == 1


# -- batches and paging ----------------------------------------------------------------------


def _batch(lab: LabAlibabaVpc, first: int, count: int) -> list[dict[str, str]]:
    return [
        {
            "RouteTableId": lab.route_table_id,
            "DstCidrBlock": f"10.{i // 256}.{i % 256}.0/24",
            "NextHop": lab.instances[i % 3].instance_id,
            "NextHopType": "Instance",
            "Name": f"cr-{i}",
            "Description": "cloudroutes",
        }
        for i in range(first, first + count)
    ]


def test_120_creates_take_three_batches_and_list_across_pages(api, lab, client) -> None:
    api.reset_counts()
    for first, count in ((0, 50), (50, 50), (100, 20)):
        answer = _call(client, api.url, batch_create_request(_batch(lab, first, count)), lab.region)
        assert (answer["SuccessCount"], answer["FailedCount"]) == (count, 0)
        assert len(answer["RouteEntryIds"]) == count
    assert api.counts()["CreateRouteEntries"] == 3

    pages = 0
    token = ""
    seen: list[str] = []
    while True:
        request = list_request(lab.route_table_id, 50, token, RouteEntryType="Custom")
        answer = _call(client, api.url, request, lab.region)
        pages += 1
        assert answer["TotalCount"] == 120
        seen += [e["DestinationCidrBlock"] for e in answer["RouteEntrys"]["RouteEntry"]]
        token = answer["NextToken"]
        if not token:
            break
    assert pages == 3
    assert seen == [e["DstCidrBlock"] for e in _batch(lab, 0, 120)]


def test_a_batch_holds_at_most_50(api, lab, client) -> None:
    error = _error(client, api.url, batch_create_request(_batch(lab, 0, 51)), lab.region)
    assert error.get_http_status() == 400
    assert api.entries(lab.route_table_id) == ()


def test_a_batch_reports_each_failure(api, lab, client) -> None:
    _call(client, api.url, batch_create_request(_batch(lab, 0, 2)), lab.region)
    entries = _batch(lab, 1, 3)  # the first one is there already
    entries[2]["NextHop"] = "i-nosuchinstance0000"
    answer = _call(client, api.url, batch_create_request(entries), lab.region)
    assert (answer["SuccessCount"], answer["FailedCount"]) == (1, 2)
    failed = {f["DstCidrBlock"]: f["FailedCode"] for f in answer["FailedRouteEntries"]}
    assert failed == {
        entries[0]["DstCidrBlock"]: "VPC_ROUTE_ENTRY_CIDR_BLOCK_DUPLICATE",
        entries[2]["DstCidrBlock"]: "InvalidNextHopId.NotFound",
    }
    assert len(api.entries(lab.route_table_id)) == 3


def test_batch_delete(api, lab, client) -> None:
    created = _call(client, api.url, batch_create_request(_batch(lab, 0, 3)), lab.region)
    ids = created["RouteEntryIds"]
    gone = [{"RouteTableId": lab.route_table_id, "RouteEntryId": i} for i in ids[:2]]
    gone.append({"RouteTableId": lab.route_table_id, "RouteEntryId": "rte-nosuchentry"})
    answer = _call(client, api.url, batch_delete_request(gone), lab.region)
    assert (answer["SuccessCount"], answer["FailedCount"]) == (2, 1)
    assert answer["FailedRouteEntries"][0]["FailedCode"] == "VPC_ROUTER_ENTRY_NOT_EXIST"
    by_destination = [
        {
            "RouteTableId": lab.route_table_id,
            "DstCidrBlock": _batch(lab, 2, 1)[0]["DstCidrBlock"],
            "NextHop": _batch(lab, 2, 1)[0]["NextHop"],
        }
    ]
    answer = _call(client, api.url, batch_delete_request(by_destination), lab.region)
    assert answer["SuccessCount"] == 1
    assert api.entries(lab.route_table_id) == ()


def test_a_bad_next_token_is_refused(api, lab, client) -> None:
    request = list_request(lab.route_table_id, 10, "not-a-token")
    assert _error(client, api.url, request, lab.region).get_error_code() == "InvalidNextToken"


# -- asynchronous entries and conflicts ------------------------------------------------------


def test_pending_then_available_with_a_manual_clock(api, lab, client) -> None:
    clock = ManualClock()
    api.clock = clock
    api.pending_seconds = 30
    hop = lab.instances[0].instance_id
    created = _call(
        client, api.url, create_request(lab.route_table_id, "10.244.6.0/24", hop), lab.region
    )
    [entry] = listed(client, api.url, lab, lab.route_table_id)
    assert entry["Status"] == "Pending"

    delete = delete_request(created["RouteEntryId"])
    error = _error(client, api.url, delete, lab.region)
    assert (error.get_error_code(), error.get_http_status()) == (
        "IncorrectRouteEntryStatus",
        400,
    )
    # A route task runs in the VPC: any other write into it conflicts, in any table.
    other = create_request(lab.route_table_ids[1], "10.244.7.0/24", hop)
    assert _error(client, api.url, other, lab.region).get_error_code() == "TaskConflict"

    clock.advance(29)
    assert listed(client, api.url, lab, lab.route_table_id)[0]["Status"] == "Pending"
    clock.advance(1)
    assert listed(client, api.url, lab, lab.route_table_id)[0]["Status"] == "Available"
    _call(client, api.url, other, lab.region)
    clock.advance(30)
    _call(client, api.url, delete_request(created["RouteEntryId"]), lab.region)


def test_pending_then_available_in_real_time(api, lab, client) -> None:
    api.pending_seconds = 0.3
    hop = lab.instances[0].instance_id
    _call(client, api.url, create_request(lab.route_table_id, "10.244.8.0/24", hop), lab.region)
    assert api.entries(lab.route_table_id)[0].status == "Pending"
    wait_for(
        lambda: listed(client, api.url, lab, lab.route_table_id)[0]["Status"] == "Available",
        5,
        "the entry to become Available",
    )


def test_deleting_entries_are_listed_until_gone(api, lab, client) -> None:
    clock = ManualClock()
    api.clock = clock
    api.delete_seconds = 10
    hop = lab.instances[0].instance_id
    created = _call(
        client, api.url, create_request(lab.route_table_id, "10.244.9.0/24", hop), lab.region
    )
    _call(client, api.url, delete_request(created["RouteEntryId"]), lab.region)
    assert listed(client, api.url, lab, lab.route_table_id)[0]["Status"] == "Deleting"
    clock.advance(10)
    assert listed(client, api.url, lab, lab.route_table_id) == []


def test_a_held_task_conflicts_every_write(api, lab, client) -> None:
    hop = lab.instances[0].instance_id
    api.hold_task(lab.vpc_id, "OperationConflict")
    request = create_request(lab.route_table_id, "10.244.10.0/24", hop)
    assert _error(client, api.url, request, lab.region).get_error_code() == "OperationConflict"
    batch = batch_create_request(_batch(lab, 0, 2))
    assert _error(client, api.url, batch, lab.region).get_error_code() == "OperationConflict"
    # Reads go on.
    assert listed(client, api.url, lab, lab.route_table_id) == []
    api.release_task(lab.vpc_id)
    _call(client, api.url, create_request(lab.route_table_id, "10.244.10.0/24", hop), lab.region)


def test_the_route_quota_is_per_table_and_adjustable(api, lab, client) -> None:
    api.set_route_quota(3, lab.route_table_id)
    _call(client, api.url, batch_create_request(_batch(lab, 0, 3)), lab.region)
    fourth = create_request(lab.route_table_id, "10.250.0.0/24", lab.instances[0].instance_id)
    error = _error(client, api.url, fourth, lab.region)
    assert (error.get_error_code(), error.get_http_status()) == ("QuotaExceeded", 400)
    # A batch past the quota fails per entry, with the same code.
    answer = _call(client, api.url, batch_create_request(_batch(lab, 10, 2)), lab.region)
    assert {f["FailedCode"] for f in answer["FailedRouteEntries"]} == {"QuotaExceeded"}
    # The other table keeps the default quota.
    other = create_request(lab.route_table_ids[1], "10.250.0.0/24", lab.instances[0].instance_id)
    _call(client, api.url, other, lab.region)
    # A raised quota takes effect at once.
    api.set_route_quota(4, lab.route_table_id)
    _call(client, api.url, fourth, lab.region)
    assert len(api.entries(lab.route_table_id)) == 4


def test_a_forbidden_action_answers_forbidden_ram(api, lab, client) -> None:
    api.forbid("DeleteRouteEntry")
    error = _error(client, api.url, delete_request("rte-any"), lab.region)
    assert (error.get_error_code(), error.get_http_status()) == ("Forbidden.RAM", 403)
    assert listed(client, api.url, lab, lab.route_table_id) == []  # other actions still work
    api.allow("DeleteRouteEntry")
    error = _error(client, api.url, delete_request("rte-any"), lab.region)
    assert error.get_error_code() == "InvalidRouteEntry.NotFound"


def test_counts_are_per_action_and_include_errors(api, lab, client) -> None:
    api.reset_counts()
    listed(client, api.url, lab, lab.route_table_id)
    _error(client, api.url, delete_request("rte-any"), lab.region)
    assert api.counts() == {"DescribeRouteEntryList": 1, "DeleteRouteEntry": 1}


# -- the metadata server and RAM-role credentials --------------------------------------------


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, ""


def test_metadata_tells_the_instance_who_it_is(api, lab) -> None:
    node = lab.instances[2]
    with EcsMetadata(node, api, vswitch_cidr=lab.vswitch_cidr) as metadata:
        base = f"{metadata.url}/latest/meta-data/"
        assert _get(base + "region-id") == (200, lab.region)
        assert _get(base + "instance-id") == (200, node.instance_id)
        assert _get(base + "vpc-id") == (200, lab.vpc_id)
        assert _get(base + "vswitch-id") == (200, lab.vswitch_id)
        assert _get(base + "private-ipv4") == (200, "198.18.0.12")
        assert _get(base + "no-such-thing")[0] == 404
        assert metadata.hits["latest/meta-data/instance-id"] == 1


def test_ram_role_credentials_from_metadata_work_with_their_token(api, lab) -> None:
    with EcsMetadata(lab.instances[0], api, role="cloudroutes-node") as metadata:
        base = f"{metadata.url}/latest/meta-data/ram/security-credentials/"
        status, role = _get(base)
        assert (status, role) == (200, "cloudroutes-node")
        document = json.loads(_get(base + role)[1])
        assert document["Code"] == "Success"
        assert document["AccessKeyId"].startswith("STS.")
        expiration = datetime.strptime(document["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
        assert expiration.replace(tzinfo=UTC) > datetime.now(UTC)
        key = AccessKey(
            document["AccessKeyId"], document["AccessKeySecret"], document["SecurityToken"]
        )
        sts = alibaba_client(api.url, key, lab.region)
        assert listed(sts, api.url, lab, lab.route_table_id) == []

        forged = AccessKey(key.key_id, key.secret, "not-the-token")
        error = _error(
            alibaba_client(api.url, forged), api.url, list_request(lab.route_table_id), lab.region
        )
        assert error.get_error_code() == "InvalidSecurityToken.MismatchWithAccessKey"
        without = AccessKey(key.key_id, key.secret)
        error = _error(
            alibaba_client(api.url, without), api.url, list_request(lab.route_table_id), lab.region
        )
        assert error.get_error_code() == "MissingSecurityToken"


def test_expired_role_credentials_are_refused(api, lab) -> None:
    with EcsMetadata(lab.instances[0], api, credential_lifetime=timedelta(seconds=-1)) as md:
        assert md.credentials is not None
        client = alibaba_client(api.url, md.credentials, lab.region)
        error = _error(client, api.url, list_request(lab.route_table_id), lab.region)
        assert error.get_error_code() == "InvalidSecurityToken.Expired"
        # Rotated credentials (as the metadata server issues before expiry) work at once.
        md.credential_lifetime = timedelta(hours=1)
        fresh = md.rotate_credentials()
        served = json.loads(
            _get(f"{md.url}/latest/meta-data/ram/security-credentials/cloudroutes-node")[1]
        )
        assert served["AccessKeyId"] == fresh.key_id
        client = alibaba_client(api.url, fresh, lab.region)
        assert listed(client, api.url, lab, lab.route_table_id) == []


def test_hardened_metadata_needs_a_token(api, lab) -> None:
    with EcsMetadata(lab.instances[0], api, require_token=True) as metadata:
        url = f"{metadata.url}/latest/meta-data/instance-id"
        assert _get(url)[0] == 403
        put = urllib.request.Request(
            f"{metadata.url}/latest/api/token", method="PUT", headers={TTL_HEADER: "60"}
        )
        with urllib.request.urlopen(put, timeout=5) as answer:
            token = answer.read().decode()
        assert _get(url, {TOKEN_HEADER: token}) == (200, lab.instances[0].instance_id)


# -- through the fault proxy -----------------------------------------------------------------


def test_throttling_through_the_fault_proxy(api, lab) -> None:
    with FaultProxy(api.url, dialect=ALIBABA) as proxy:
        client = alibaba_client(proxy.url, lab.credentials, lab.region)
        hop = lab.instances[0].instance_id
        throttle = proxy.add(Throttle(actions={"CreateRouteEntry"}, times=2))
        request = create_request(lab.route_table_id, "10.244.11.0/24", hop)
        for _ in range(2):
            error = _error(client, proxy.url, request, lab.region)
            assert (error.get_error_code(), error.get_http_status()) == ("Throttling.User", 400)
        assert api.entries(lab.route_table_id) == ()  # a throttled call is not applied
        _call(
            client, proxy.url, create_request(lab.route_table_id, "10.244.11.0/24", hop), lab.region
        )
        listed(client, proxy.url, lab, lab.route_table_id)

        counts = proxy.counts()
        assert counts.by_action == {"CreateRouteEntry": 3, "DescribeRouteEntryList": 1}
        assert (counts.reads, counts.writes) == (1, 3)
        assert throttle.fired == 2
        assert proxy.history() == ["CreateRouteEntry"] * 3 + ["DescribeRouteEntryList"]


def test_server_errors_through_the_fault_proxy(api, lab) -> None:
    from cloudroutes.lab.fault_proxy import CannedError, ServerError

    with FaultProxy(api.url, dialect=ALIBABA) as proxy:
        client = alibaba_client(proxy.url, lab.credentials, lab.region)
        proxy.add(ServerError(status=503, times=1))
        error = _error(client, proxy.url, list_request(lab.route_table_id), lab.region)
        assert (error.get_error_code(), error.get_http_status()) == ("ServiceUnavailable", 503)
        proxy.add(CannedError(code="Forbidden.RAM", message="no", status=403, times=1))
        error = _error(client, proxy.url, list_request(lab.route_table_id), lab.region)
        assert error.get_error_code() == "Forbidden.RAM"
        assert listed(client, proxy.url, lab, lab.route_table_id) == []


def test_a_write_whose_answer_is_lost_is_safe_to_retry_with_its_client_token(api, lab) -> None:
    from cloudroutes.lab.fault_proxy import DropAfterForward

    with FaultProxy(api.url, dialect=ALIBABA) as proxy:
        client = alibaba_client(proxy.url, lab.credentials, lab.region, timeout=5)
        hop = lab.instances[0].instance_id
        proxy.add(DropAfterForward(actions={"CreateRouteEntry"}, times=1))
        request = create_request(lab.route_table_id, "10.244.12.0/24", hop)
        request.set_ClientToken("lost-answer")
        with pytest.raises(ClientException):
            client.do_action_with_exception(at(request, proxy.url, lab.region))
        [entry] = api.entries(lab.route_table_id)  # applied, though the client cannot know
        retry = create_request(lab.route_table_id, "10.244.12.0/24", hop)
        retry.set_ClientToken("lost-answer")
        assert _call(client, proxy.url, retry, lab.region)["RouteEntryId"] == entry.entry_id
        assert proxy.counts()["CreateRouteEntry"] == 2


# -- concurrency -----------------------------------------------------------------------------


def test_concurrent_writes_into_one_vpc_conflict(api, lab) -> None:
    """Eight agents create at once while entries stay Pending: one wins, the others get
    TaskConflict, and the table holds exactly the winner's entry."""
    api.pending_seconds = 60
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def create(i: int) -> None:
        client = alibaba_client(api.url, lab.credentials, lab.region)
        request = create_request(
            lab.route_table_id, f"10.244.{20 + i}.0/24", lab.instances[0].instance_id
        )
        start.wait()
        try:
            client.do_action_with_exception(at(request, api.url, lab.region))
            outcome = "ok"
        except ServerException as err:
            outcome = err.get_error_code()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes) == ["TaskConflict"] * 7 + ["ok"]
    assert len(api.entries(lab.route_table_id)) == 1


# -- the whole lab ---------------------------------------------------------------------------


def test_alibaba_lab_serves_each_node_its_metadata_and_the_api_through_the_proxy() -> None:
    with AlibabaLab(["198.18.0.21", "198.18.0.22"], tables=2) as whole:
        assert whole.vpc is not None and whole.proxy is not None
        assert [i.private_ip for i in whole.vpc.instances] == ["198.18.0.21", "198.18.0.22"]
        node = whole.node(1)
        base = f"{node.metadata_url}/latest/meta-data/"
        assert _get(base + "private-ipv4") == (200, "198.18.0.22")
        role = _get(base + "ram/security-credentials/")[1]
        document = json.loads(_get(base + "ram/security-credentials/" + role)[1])
        key = AccessKey(
            document["AccessKeyId"], document["AccessKeySecret"], document["SecurityToken"]
        )
        agent = alibaba_client(node.api_url, key, node.region)
        table = whole.vpc.route_table_ids[1]
        hop = whole.vpc.instances[1].instance_id
        _call(agent, node.api_url, create_request(table, "10.244.1.0/24", hop), node.region)
        assert [e.destination for e in whole.api.entries(table)] == ["10.244.1.0/24"]
        assert whole.proxy.counts().by_action == {"CreateRouteEntry": 1}
        admin = whole.admin()
        request = list_request(table, RouteEntryType="Custom")
        answer = _call(admin, whole.api.url, request, whole.region)
        assert answer["TotalCount"] == 1
        assert whole.proxy.counts().total == 1  # the admin client goes around the proxy


def test_importing_the_lab_loads_no_aliyun_sdk() -> None:
    script = (
        "import sys, cloudroutes.lab.alibaba; "
        "print(sorted(m for m in sys.modules if m.startswith('aliyunsdk')))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- retargeting, foreign entries, released instances ----------------------------------------


def modify_request(entry_id: str, new_hop: str = "", name: str = "") -> Any:
    from aliyunsdkvpc.request.v20160428.ModifyRouteEntryRequest import ModifyRouteEntryRequest

    request = ModifyRouteEntryRequest()
    request.set_RouteEntryId(entry_id)
    if new_hop:
        request.set_NewNextHopId(new_hop)
        request.set_NewNextHopType("Instance")
    if name:
        request.set_RouteEntryName(name)
    return request


def test_modify_retargets_an_entry_in_place(api, lab, client) -> None:
    clock = ManualClock()
    api.clock = clock
    api.pending_seconds = 5
    first, second = lab.instances[0].instance_id, lab.instances[1].instance_id
    created = _call(
        client, api.url, create_request(lab.route_table_id, "10.244.13.0/24", first), lab.region
    )
    entry_id = created["RouteEntryId"]
    error = _error(client, api.url, modify_request(entry_id, second), lab.region)
    assert error.get_error_code() == "IncorrectRouteEntryStatus"  # still Pending
    clock.advance(5)

    _call(client, api.url, modify_request(entry_id, second, "cr-moved"), lab.region)
    [entry] = listed(client, api.url, lab, lab.route_table_id)
    assert (entry["RouteEntryId"], entry["Status"]) == (entry_id, "Modifying")
    assert entry["NextHops"]["NextHop"][0]["NextHopId"] == second
    assert entry["RouteEntryName"] == "cr-moved"
    clock.advance(5)
    assert listed(client, api.url, lab, lab.route_table_id)[0]["Status"] == "Available"

    missing = _error(client, api.url, modify_request(entry_id, "i-nosuchinstance0000"), lab.region)
    assert missing.get_error_code() == "InvalidNextHopId.NotFound"
    gone = _error(client, api.url, modify_request("rte-nosuchentry", second), lab.region)
    assert gone.get_error_code() == "InvalidRouteEntry.NotFound"


def test_entries_made_outside_the_api_are_listed(api, lab, client) -> None:
    api.put_entry(
        lab.route_table_id,
        "172.16.0.0/16",
        lab.instances[2].instance_id,
        name="vpn",
        description="made by hand",
    )
    [entry] = listed(client, api.url, lab, lab.route_table_id)
    assert (entry["DestinationCidrBlock"], entry["RouteEntryName"]) == ("172.16.0.0/16", "vpn")
    assert api.counts() == {"DescribeRouteEntryList": 1}


def test_a_released_instance_is_no_next_hop(api, lab, client) -> None:
    gone = lab.instances[2].instance_id
    api.remove_instance(gone)
    request = create_request(lab.route_table_id, "10.244.14.0/24", gone)
    assert _error(client, api.url, request, lab.region).get_error_code() == (
        "InvalidNextHopId.NotFound"
    )


def test_the_metadata_index_lists_what_it_serves(api, lab) -> None:
    with EcsMetadata(lab.instances[0], api) as metadata:
        status, index = _get(f"{metadata.url}/latest/meta-data/")
        assert status == 200
        names = index.split("\n")
        assert {"region-id", "instance-id", "vpc-id", "private-ipv4", "ram/"} <= set(names)


def test_malformed_input_gets_an_api_error(api, lab) -> None:
    batch = {"Action": "CreateRouteEntries", "RegionId": lab.region, "RouteEntries.x.Dst": "1"}
    status, body = raw_call(api, lab.credentials, batch)
    assert (status, body["Code"]) == (400, "InvalidParameter.RouteEntries")
    listing = {
        "Action": "DescribeRouteEntryList",
        "RegionId": lab.region,
        "RouteTableId": lab.route_table_id,
        "MaxResult": "many",
    }
    status, body = raw_call(api, lab.credentials, listing)
    assert (status, body["Code"]) == (400, "InvalidParameter.MaxResult")
    status, body = raw_call(api, lab.credentials, {"Action": "NoSuchAction"})
    assert (status, body["Code"]) == (404, "InvalidAction.NotFound")


def test_writes_too_close_together_conflict(api, lab, client) -> None:
    clock = ManualClock()
    api.clock = clock
    api.write_interval = 5
    hop = lab.instances[0].instance_id
    _call(client, api.url, create_request(lab.route_table_id, "10.244.15.0/24", hop), lab.region)
    clock.advance(4)
    second = create_request(lab.route_table_id, "10.244.16.0/24", hop)
    assert _error(client, api.url, second, lab.region).get_error_code() == "TaskConflict"
    clock.advance(1)
    _call(client, api.url, second, lab.region)
    assert len(api.entries(lab.route_table_id)) == 2


def test_a_dry_run_checks_permission_and_changes_nothing(api, lab, client) -> None:
    request = create_request(lab.route_table_id, "10.244.17.0/24", lab.instances[0].instance_id)
    request.set_DryRun(True)
    error = _error(client, api.url, request, lab.region)
    assert (error.get_error_code(), error.get_http_status()) == ("DryRunOperation", 400)
    api.forbid("CreateRouteEntry")
    assert _error(client, api.url, request, lab.region).get_error_code() == "Forbidden.RAM"
    assert api.entries(lab.route_table_id) == ()


def test_a_token_bucket_throttles_writes_as_alibaba_does(api, lab) -> None:
    from cloudroutes.lab.fault_proxy import TokenBucket

    with FaultProxy(api.url, dialect=ALIBABA) as proxy:
        client = alibaba_client(proxy.url, lab.credentials, lab.region)
        bucket = proxy.add(TokenBucket(capacity=2, rate=0, kind="write"))
        hop = lab.instances[0].instance_id
        codes = []
        for i in range(3):
            request = create_request(lab.route_table_id, f"10.244.{30 + i}.0/24", hop)
            try:
                _call(client, proxy.url, request, lab.region)
                codes.append("ok")
            except ServerException as err:
                codes.append(err.get_error_code())
        assert codes == ["ok", "ok", "Throttling.User"]
        assert listed(client, proxy.url, lab, lab.route_table_id)  # reads are not limited
        assert bucket.fired == 1
        assert proxy.counts().by_action == {"CreateRouteEntry": 3, "DescribeRouteEntryList": 1}
        assert api.counts()["CreateRouteEntry"] == 2  # the throttled call never arrived


def test_a_listing_can_ask_for_some_destinations_only(api, lab, client) -> None:
    _call(client, api.url, batch_create_request(_batch(lab, 0, 5)), lab.region)
    wanted = [e["DstCidrBlock"] for e in _batch(lab, 0, 5)][1:3]
    request = list_request(lab.route_table_id, DestCidrBlockLists=wanted)
    answer = _call(client, api.url, request, lab.region)
    assert [e["DestinationCidrBlock"] for e in answer["RouteEntrys"]["RouteEntry"]] == wanted
    ipv6 = _call(client, api.url, list_request(lab.route_table_id, IpVersion="ipv6"), lab.region)
    assert ipv6["RouteEntrys"]["RouteEntry"] == []


def test_a_revoked_key_is_not_found(api, lab, client) -> None:
    api.revoke(lab.credentials.key_id)
    error = _error(client, api.url, list_request(lab.route_table_id), lab.region)
    assert error.get_error_code() == "InvalidAccessKeyId.NotFound"


_NODE_AGENT = """
import json, sys, urllib.request
from aliyunsdkvpc.request.v20160428.CreateRouteEntryRequest import CreateRouteEntryRequest
from cloudroutes.lab.alibaba import AccessKey, alibaba_client, at

api_url, metadata_url, table, destination = sys.argv[1:5]
def get(path):
    with urllib.request.urlopen(metadata_url + "/latest/meta-data/" + path, timeout=5) as a:
        return a.read().decode()
role = get("ram/security-credentials/")
doc = json.loads(get("ram/security-credentials/" + role))
key = AccessKey(doc["AccessKeyId"], doc["AccessKeySecret"], doc["SecurityToken"])
region = get("region-id")
request = CreateRouteEntryRequest()
request.set_RouteTableId(table)
request.set_DestinationCidrBlock(destination)
request.set_NextHopType("Instance")
request.set_NextHopId(get("instance-id"))
client = alibaba_client(api_url, key, region)
print(json.loads(client.do_action_with_exception(at(request, api_url, region)))["RouteEntryId"])
"""


@needs_root
@pytest.mark.root
def test_a_node_namespace_reaches_the_alibaba_lab_in_a_cloud_namespace(
    cloud_network: CloudNetwork,
) -> None:
    node = cloud_network.node
    with AlibabaLab([NODE_IP], host=CLOUD_HOST, netns=cloud_network.cloud.name) as whole:
        assert whole.vpc is not None and whole.proxy is not None
        endpoints = whole.node(0)
        assert endpoints.api_url.startswith(f"http://{CLOUD_HOST}:")
        table = whole.vpc.route_table_id
        agent = [sys.executable, "-c", _NODE_AGENT, endpoints.api_url, endpoints.metadata_url]
        result = subprocess.run(
            ["ip", "netns", "exec", node.name, *agent, table, "10.244.0.0/24"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        [entry] = whole.api.entries(table)
        assert entry.entry_id == result.stdout.strip()
        assert entry.next_hop_id == whole.vpc.instances[0].instance_id
        assert whole.proxy.counts().by_action == {"CreateRouteEntry": 1}


def test_the_conflict_code_for_a_running_task_is_selectable(api, lab, client) -> None:
    api.pending_seconds = 60
    api.conflict_code = "IncorrectRouteEntryStatus"
    hop = lab.instances[0].instance_id
    _call(client, api.url, create_request(lab.route_table_id, "10.244.40.0/24", hop), lab.region)
    second = create_request(lab.route_table_id, "10.244.41.0/24", hop)
    error = _error(client, api.url, second, lab.region)
    assert (error.get_error_code(), error.get_http_status()) == ("IncorrectRouteEntryStatus", 400)

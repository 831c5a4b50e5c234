"""Alibaba VPC failures become the route errors the reconciler acts on, by their error code
(not the HTTP status), in one line, with no secrets."""

from __future__ import annotations

import pytest
from aliyunsdkcore.acs_exception.exceptions import ClientException, ServerException

from cloudroutes.errors import (
    QuotaExceeded,
    Rejected,
    RouteError,
    RouteNotFound,
    Throttled,
    Transient,
)
from providers.ali_route_table import Markers, NoAnswer, entry_state, parse_entries, vpc_error

POLICY = "providers/policies/ali-vpc-node.json"


def classify(code: str, message: str = "m", status: int = 400) -> RouteError:
    exc = ServerException(code, message, http_status=status, request_id="R")
    return vpc_error(exc, "CreateRouteEntries", "vtb-1 (10.5.1.0/24)", POLICY, "the RAM role r")


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("Throttling", 400, Throttled),
        ("Throttling.User", 400, Throttled),
        ("Throttling.Api", 503, Throttled),
        ("QuotaExceeded", 400, QuotaExceeded),
        ("QuotaExceeded.RouteEntry", 400, QuotaExceeded),
        ("IncorrectRouteEntryStatus", 400, Transient),
        ("TaskConflict", 400, Transient),
        ("OperationConflict", 400, Transient),
        ("InternalError", 500, Transient),
        ("SomethingNew", 503, Transient),
        ("InvalidRouteEntry.NotFound", 404, RouteNotFound),
        ("Forbidden.RAM", 403, Rejected),
        ("InvalidNextHopId.NotFound", 404, Rejected),
    ],
)
def test_codes_decide_the_class(code: str, status: int, kind: type[RouteError]) -> None:
    error = classify(code, status=status)
    assert type(error) is kind
    assert "\n" not in str(error)


def test_a_denial_names_the_ram_action_and_the_policy() -> None:
    text = str(classify("Forbidden.RAM", status=403))
    assert "vpc:CreateRouteEntries" in text and POLICY in text


@pytest.mark.parametrize(
    "code",
    [
        "SignatureDoesNotMatch",
        "InvalidAccessKeySecret",
        "InvalidAccessKeyId.NotFound",
        "InvalidAccessKeyId.Inactive",
        "InvalidSecurityToken.Expired",
    ],
)
def test_credential_errors_name_where_the_key_came_from_never_what_was_signed(code: str) -> None:
    signed = "POST&%2F&AccessKeyId%3DSTS.x%26SecurityToken%3Dtoken-value"
    error = classify(code, f"Specified signature is not matched. server string to sign is:{signed}")
    text = str(error)
    assert isinstance(error, Rejected) and "\n" not in text
    assert "AccessKeyID/AccessKeySecret" in text and "RAM role" in text and "the RAM role r" in text
    assert "token-value" not in text and "server string" not in text


def test_no_answer_is_transient_and_may_have_been_applied() -> None:
    error = vpc_error(ClientException("SDK.HttpError", "timed out"), "X", "vtb-1", POLICY)
    assert isinstance(error, NoAnswer) and isinstance(error, Transient)


def test_parse_entries_skips_what_is_not_a_single_hop_custom_entry() -> None:
    hop = {"NextHop": [{"NextHopType": "Instance", "NextHopId": "i-abcdefgh12"}]}
    two = {"NextHop": [hop["NextHop"][0], {"NextHopType": "Instance", "NextHopId": "i-x"}]}
    listing = [
        {
            "DestinationCidrBlock": "10.5.1.0/24",
            "Type": "Custom",
            "Status": "Pending",
            "NextHops": hop,
        },
        {"DestinationCidrBlock": "198.18.0.0/20", "Type": "System", "NextHops": {}},
        {"DestinationCidrBlock": "not-a-cidr", "Type": "Custom"},
        {"DestinationCidrBlock": "10.5.2.0/24", "Type": "Custom", "NextHops": two},
        "garbage",
    ]
    first, ecmp = parse_entries(listing)
    assert (str(first.destination), first.hop_type, first.hop_id) == (
        "10.5.1.0/24",
        "Instance",
        "i-abcdefgh12",
    )
    assert ecmp.hop_type == ""  # several next hops: never ours
    assert entry_state("Pending") is not None and entry_state("Deleting") is None


def test_markers_are_stable_and_short() -> None:
    markers = Markers("/coreos.com/network")
    assert markers.name == Markers("/coreos.com/network").name != Markers("other").name
    assert markers.name.startswith("cloudroutes-") and len(markers.name) <= 128
    assert markers.description("10.5.1.0-24").endswith("lease=10.5.1.0-24")

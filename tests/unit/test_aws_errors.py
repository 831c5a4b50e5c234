"""EC2 failures become the route errors the reconciler acts on, in one line, with no secrets."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from cloudroutes.errors import (
    QuotaExceeded,
    Rejected,
    RouteError,
    RouteNotFound,
    Throttled,
    Transient,
)
from providers.aws_route_table import ec2_error

POLICY = "providers/policies/aws-vpc-node.json"


def client_error(code: str, message: str = "m", status: int = 400, **headers: str) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers},
    }
    return ClientError(response, "CreateRoute")


def classify(exc: Exception) -> RouteError:
    return ec2_error(exc, "CreateRoute", "rtb-0a1b2c3d (10.5.1.0/24)", POLICY)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (client_error("RequestLimitExceeded", status=503), Throttled),
        (client_error("Throttling"), Throttled),
        (client_error("RouteLimitExceeded"), QuotaExceeded),
        (client_error("InvalidRoute.NotFound"), RouteNotFound),
        (client_error("UnauthorizedOperation", status=403), Rejected),
        (client_error("AuthFailure", status=401), Rejected),
        (client_error("InvalidParameterValue"), Rejected),
        (client_error("InternalError", status=500), Transient),
        (client_error("SomethingNew", status=503), Transient),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), Transient),
        (ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), Transient),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), Transient),
        (NoCredentialsError(), Rejected),
    ],
)
def test_each_failure_has_its_class(exc: Exception, kind: type[RouteError]) -> None:
    error = classify(exc)
    assert type(error) is kind
    assert "\n" not in str(error)


def test_throttling_keeps_the_apis_advice() -> None:
    assert classify(client_error("RequestLimitExceeded", **{"retry-after": "7"})).retry_after == 7
    assert (
        classify(client_error("RequestLimitExceeded", **{"retry-after": "soon"})).retry_after
        is None
    )


def test_a_denial_names_the_permission_and_the_policy_but_not_the_encoded_message() -> None:
    error = classify(
        client_error(
            "UnauthorizedOperation",
            "You are not authorized to perform this operation. Encoded authorization failure "
            "message: 4Ghz-Y0ur-acc0unt-detai1s",
            status=403,
        )
    )
    text = str(error)
    assert "ec2:CreateRoute" in text and POLICY in text and "rtb-0a1b2c3d" in text
    assert "4Ghz" not in text and "Encoded" not in text


def test_a_refusal_carries_the_aws_message_on_one_line() -> None:
    error = classify(client_error("InvalidNetworkInterfaceID.NotFound", "no such\n  eni-1"))
    assert str(error).endswith("InvalidNetworkInterfaceID.NotFound: no such eni-1")

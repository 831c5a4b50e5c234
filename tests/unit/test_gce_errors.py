"""Compute failures become the route errors the reconciler acts on, in one line."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from google.api_core import exceptions as api
from google.auth import exceptions as auth
from google.cloud import compute_v1

from cloudroutes.errors import (
    QuotaExceeded,
    Rejected,
    RouteError,
    RouteNotFound,
    Throttled,
    Transient,
)
from providers.gce_api import AlreadyExists, BadCredentials, gce_error, operation_error

POLICY = "providers/policies/gce-node.json"
WHERE = "projects/lab/global/networks/net (10.5.1.0/24)"


def http(status: int, reason: str = "", message: str = "m", **extra: Any) -> Exception:
    errors = [{"reason": reason, "message": message}] if reason else []
    return api.from_http_status(status, message, errors=errors, **extra)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (http(403, "rateLimitExceeded"), Throttled),
        (http(403, "userRateLimitExceeded"), Throttled),
        (http(429, "rateLimitExceeded"), Throttled),
        (http(429), Throttled),
        (http(403, "QUOTA_EXCEEDED", "Quota 'ROUTES' exceeded."), QuotaExceeded),
        (http(403, "quotaExceeded"), QuotaExceeded),
        (http(409, "alreadyExists"), AlreadyExists),
        (http(404, "notFound"), Rejected),  # an insert's instance or network is missing
        (http(403, "forbidden"), Rejected),
        (http(401, "authError"), BadCredentials),
        (http(400, "resourceNotReady"), Transient),
        (http(400, "invalid"), Rejected),
        (http(500, "internalError"), Transient),
        (http(503, "backendError"), Transient),
        (requests.ConnectionError("reset"), Transient),
        (requests.ReadTimeout("slow"), Transient),
        (auth.DefaultCredentialsError("none"), Rejected),
        (auth.RefreshError("revoked"), Rejected),
        (auth.TransportError("down"), Transient),
    ],
)
def test_each_failure_has_its_class(exc: Exception, kind: type[RouteError]) -> None:
    error = gce_error(exc, "routes.insert", WHERE, POLICY)
    assert type(error) is kind
    assert "\n" not in str(error)


def test_not_found_on_delete_is_done() -> None:
    assert type(gce_error(http(404, "notFound"), "routes.delete", WHERE, POLICY)) is RouteNotFound


def test_a_denial_names_the_permissions_and_the_role_file() -> None:
    text = str(gce_error(http(403, "forbidden"), "routes.insert", WHERE, POLICY))
    assert "compute.routes.create" in text and "compute.networks.updatePolicy" in text
    assert POLICY in text and WHERE in text


def test_a_refusal_carries_the_apis_message_on_one_line() -> None:
    error = gce_error(http(400, "invalid", "Invalid value\n  for field"), "routes.insert", "w", "p")
    assert str(error).endswith("Invalid value for field")


def operation(code: str, message: str = "m", status: int = 0) -> compute_v1.Operation:
    return compute_v1.Operation(
        name="operation-1",
        status="DONE",
        http_error_status_code=status,
        error=compute_v1.Error(errors=[compute_v1.Errors(code=code, message=message)]),
    )


@pytest.mark.parametrize(
    ("op", "method", "kind"),
    [
        (operation("QUOTA_EXCEEDED", status=403), "routes.insert", QuotaExceeded),
        (operation("RATE_LIMIT_EXCEEDED", status=429), "routes.insert", Throttled),
        (operation("RESOURCE_ALREADY_EXISTS", status=409), "routes.insert", AlreadyExists),
        (operation("RESOURCE_NOT_FOUND", status=404), "routes.delete", RouteNotFound),
        (operation("INTERNAL_ERROR", status=500), "routes.insert", Transient),
        (operation("PERMISSION_DENIED", status=403), "routes.insert", Rejected),
        (operation("INVALID_FIELD_VALUE", status=400), "routes.insert", Rejected),
    ],
)
def test_an_operation_that_ended_in_error_is_classified_like_a_direct_one(
    op: compute_v1.Operation, method: str, kind: type[RouteError]
) -> None:
    error = operation_error(op, method, WHERE, POLICY)
    assert type(error) is kind


def test_an_operation_without_error_is_none() -> None:
    assert operation_error(compute_v1.Operation(status="DONE"), "routes.insert", "w", "p") is None

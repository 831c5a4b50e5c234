"""A fault-injecting, call-counting HTTP proxy to put in front of any cloud fake.

The fakes (moto for EC2, the GCE and Alibaba fakes) answer every call correctly and at once,
which is the one thing a real cloud does not. The proxy sits between the SDK and the fake on
127.0.0.1 and makes the cloud misbehave the way the reconciler must survive: throttling, quota
errors, 5xx, slowness, a write applied upstream whose answer never arrives, routes turned
blackhole. It also counts every call per action, so tests and benchmarks can assert API budgets
("one DescribeRouteTables per table per cycle") exactly.

What differs between clouds (how to name a call, what an error looks like) is a ``Dialect``;
``EC2`` and plain ``HTTP`` (IMDS, metadata servers) are provided, and a fake for another cloud
brings its own. Faults are rules added and removed at run time, from any thread; the ones
that fire by chance draw from a seeded ``random.Random``, so a failing run can be replayed.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import socket
import struct
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler
from typing import ClassVar, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

from cloudroutes.lab.http_service import LOOPBACK, HttpService, LabHandler

# Per-connection headers: they describe the hop, not the request, so the proxy sets its own.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


@dataclass(frozen=True)
class Call:
    """One request as the client sent it, with the action its dialect named."""

    method: str
    path: str  # with the query string
    headers: tuple[tuple[str, str], ...]
    body: bytes
    action: str = ""

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def params(self) -> dict[str, str]:
        """Query and form fields (the first value of each): where query APIs put everything."""
        fields = parse_qs(urlsplit(self.path).query)
        content_type = self.header("Content-Type") or ""
        if "x-www-form-urlencoded" in content_type:
            fields.update(parse_qs(self.body.decode("utf-8", "replace")))
        return {k: v[0] for k, v in fields.items()}


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, from the upstream or made up by a fault."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class Dialect:
    """How one cloud names a call and says no.

    ``action`` names a call (EC2: the Action field); ``is_read`` tells reads from writes for
    the counts; ``error`` builds the error answer the cloud's SDK parses into its own
    exception; ``throttle`` is the (code, message, status) of the cloud's throttling error.
    """

    name: str
    action: Callable[[Call], str]
    is_read: Callable[[str], bool]
    error: Callable[[str, str, int], Reply]
    throttle: tuple[str, str, int]
    server_error: Mapping[int, tuple[str, str]]

    def server_error_reply(self, status: int) -> Reply:
        code, message = self.server_error.get(status, ("InternalError", "Internal error."))
        return self.error(code, message, status)


# -- EC2 ------------------------------------------------------------------------------------


def ec2_action(call: Call) -> str:
    return call.params().get("Action", "")


def ec2_error(code: str, message: str, status: int) -> Reply:
    """EC2's error document: botocore's EC2 parser reads Errors/Error/{Code,Message}."""
    root = ET.Element("Response")
    error = ET.SubElement(ET.SubElement(root, "Errors"), "Error")
    ET.SubElement(error, "Code").text = code
    ET.SubElement(error, "Message").text = message
    ET.SubElement(root, "RequestID").text = str(uuid.uuid4())
    body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return Reply(status, (("Content-Type", "text/xml;charset=UTF-8"),), body)


EC2 = Dialect(
    name="ec2",
    action=ec2_action,
    is_read=lambda action: action.startswith(("Describe", "Get", "List")),
    error=ec2_error,
    throttle=("RequestLimitExceeded", "Request limit exceeded.", 503),
    server_error={
        500: ("InternalError", "An internal error has occurred."),
        503: ("Unavailable", "The server is overloaded and can't handle the request."),
    },
)


# -- Alibaba Cloud (RPC APIs: VPC 2016-04-28) -------------------------------------------------


def alibaba_error(code: str, message: str, status: int) -> Reply:
    """Alibaba's JSON error document; aliyunsdkcore raises it as ServerException(Code)."""
    request_id = str(uuid.uuid4()).upper()
    body = {
        "RequestId": request_id,
        "HostId": "vpc.aliyuncs.com",
        "Code": code,
        "Message": message,
        "Recommend": f"https://api.aliyun.com/troubleshoot?q={code}&product=Vpc",
    }
    headers = (("Content-Type", "application/json;charset=utf-8"), ("x-acs-request-id", request_id))
    return Reply(status, headers, json.dumps(body).encode())


ALIBABA = Dialect(
    name="alibaba",
    # An RPC call names its action as an EC2 query call does: the Action parameter.
    action=ec2_action,
    is_read=lambda action: action.startswith(("Describe", "Get", "List")),
    error=alibaba_error,
    throttle=("Throttling.User", "Request was denied due to user flow control.", 400),
    server_error={
        500: ("InternalError", "The request processing has failed due to some unknown error."),
        503: (
            "ServiceUnavailable",
            "The request has failed due to a temporary failure of the server.",
        ),
    },
)


# -- GCE (Compute Engine API v1) ------------------------------------------------------------

# (method, path under /compute/v1/projects/{p}/) -> the API method's name, as Google names it.
_GCE_ACTIONS: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (method, re.compile(rf"^/compute/v1/projects/[^/]+/{pattern}$"), action)
    for method, pattern, action in (
        ("POST", "global/routes", "routes.insert"),
        ("GET", "global/routes", "routes.list"),
        ("GET", "global/routes/[^/]+", "routes.get"),
        ("DELETE", "global/routes/[^/]+", "routes.delete"),
        ("GET", "global/operations/[^/]+", "globalOperations.get"),
        ("POST", "global/operations/[^/]+/wait", "globalOperations.wait"),
        ("GET", "global/networks/[^/]+", "networks.get"),
        ("GET", "zones/[^/]+/instances/[^/]+", "instances.get"),
    )
)

# The status names Google's newer error answers carry next to the HTTP code.
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_USAGE_LIMITS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded"})


def gce_action(call: Call) -> str:
    """The Compute method (``routes.insert``); other paths (metadata) as plain HTTP names them."""
    path = urlsplit(call.path).path
    for method, pattern, action in _GCE_ACTIONS:
        if call.method == method and pattern.match(path):
            return action
    return http_action(call)


def gce_error(code: str, message: str, status: int) -> Reply:
    """Compute's JSON error, which google-api-core raises as the exception for ``status``.

    A camelCase ``code`` (``alreadyExists``, ``rateLimitExceeded``) is the legacy
    ``errors[].reason`` every Compute error carries. An UPPER_SNAKE one (``QUOTA_EXCEEDED``,
    ``RATE_LIMIT_EXCEEDED``) is the newer answer: the same legacy reason in camelCase, plus a
    ``google.rpc.ErrorInfo`` with the code, which the client shows as ``exception.reason``.
    """
    error: dict[str, object] = {"code": status, "message": message}
    if code.isupper():
        words = code.lower().split("_")
        reason = words[0] + "".join(w.title() for w in words[1:])
        error["status"] = _GOOGLE_STATUS.get(status, "UNKNOWN")
        domain = "googleapis.com" if code == "RATE_LIMIT_EXCEEDED" else "compute.googleapis.com"
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": code,
                "domain": domain,
                "metadata": {"service": "compute.googleapis.com"},
            }
        ]
    else:
        reason = code
    domain = "usageLimits" if reason in _USAGE_LIMITS else "global"
    error["errors"] = [{"message": message, "domain": domain, "reason": reason}]
    body = json.dumps({"error": error}, indent=1).encode()
    return Reply(status, (("Content-Type", "application/json; charset=UTF-8"),), body)


def _gce_is_read(action: str) -> bool:
    return action.endswith((".get", ".list", ".wait")) or action.startswith(("GET ", "HEAD "))


GCE = Dialect(
    name="gce",
    action=gce_action,
    is_read=_gce_is_read,
    error=gce_error,
    # Compute's classic per-project rate limit answer.
    throttle=("rateLimitExceeded", "Rate Limit Exceeded", 403),
    server_error={
        500: ("internalError", "Internal error. Please try again or contact Google Support."),
        503: ("backendError", "Backend Error"),
    },
)

# The same limit as newer front ends answer it: 429 RESOURCE_EXHAUSTED with an ErrorInfo.
GCE_429 = replace(
    GCE,
    name="gce-429",
    throttle=(
        "RATE_LIMIT_EXCEEDED",
        "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service "
        "'compute.googleapis.com'.",
        429,
    ),
)


# -- plain HTTP (IMDS, metadata servers, anything without an API error format) ---------------


def http_action(call: Call) -> str:
    return f"{call.method} {urlsplit(call.path).path}"


def http_error(code: str, message: str, status: int) -> Reply:
    return Reply(status, (("Content-Type", "text/plain"),), f"{code}: {message}".encode())


HTTP = Dialect(
    name="http",
    action=http_action,
    is_read=lambda action: action.startswith(("GET ", "HEAD ")),
    error=http_error,
    throttle=("TooManyRequests", "Too many requests.", 429),
    server_error={},
)


# -- counting -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallCounts:
    """Calls the client made, per action: every call counts, whether a fault answered or not,
    as every call counts against a real cloud's rate limit."""

    by_action: Mapping[str, int]
    reads: int
    writes: int

    def __getitem__(self, action: str) -> int:
        return self.by_action.get(action, 0)

    @property
    def total(self) -> int:
        return self.reads + self.writes


# -- faults ---------------------------------------------------------------------------------

Proceed = Callable[[], Reply]


class DropConnection(Exception):
    """Raised by a fault to reset the client's connection instead of answering."""


@dataclass(eq=False, kw_only=True)
class Fault:
    """A rule: which calls it applies to (``actions``; None is every call) and how often.

    It fires with ``probability`` and at most ``times`` times (None: no limit); ``fired``
    counts how often it did. A fired fault wraps the call: ``apply`` may answer in place of
    the upstream, or call ``proceed()`` to go on to the next fault and then the upstream.
    """

    actions: Collection[str] | None = None
    probability: float = 1.0
    times: int | None = None
    fired: int = field(default=0, init=False)
    # A fault that only sometimes acts once applied (RouteLimit) counts ``fired`` itself.
    counts_own_firing: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.actions, str):
            self.actions = frozenset({self.actions})
        elif self.actions is not None:
            self.actions = frozenset(self.actions)
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"fault probability {self.probability} is not within 0..1")

    def applies_to(self, call: Call) -> bool:
        return self.actions is None or call.action in self.actions

    def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
        raise NotImplementedError


@dataclass(eq=False, kw_only=True)
class Throttle(Fault):
    """The cloud's rate-limit error (EC2: 503 RequestLimitExceeded). Nothing is applied."""

    def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
        return proxy.dialect.error(*proxy.dialect.throttle)


@dataclass(eq=False, kw_only=True)
class ServerError(Fault):
    """An HTTP 5xx in the cloud's error format. Nothing is applied."""

    status: int = 500

    def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
        return proxy.dialect.server_error_reply(self.status)


@dataclass(eq=False, kw_only=True)
class CannedError(Fault):
    """Any error the cloud can give, e.g. 403 UnauthorizedOperation on CreateRoute."""

    code: str
    message: str
    status: int = 400

    def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
        return proxy.dialect.error(self.code, self.message, self.status)


@dataclass(eq=False, kw_only=True)
class Delay(Fault):
    """A slow answer: wait ``seconds`` before passing the call on."""

    seconds: float

    def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
        time.sleep(self.seconds)
        return proceed()


@dataclass(eq=False, kw_only=True)
class DropAfterForward(Fault):
    """The upstream applies the call, then the client's connection is reset: the write
    happened, but the client cannot know it (the case that makes retries see
    "already exists")."""

    def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
        proceed()
        raise DropConnection


@dataclass(eq=False, kw_only=True)
class TokenBucket(Fault):
    """A cloud's request-rate limit, as AWS models it: a bucket of ``capacity`` tokens refilled
    at ``rate`` per second; a call that finds it empty gets the throttling error. ``kind``
    ("read" or "write") limits the bucket to reads or writes, as EC2 keeps separate buckets.
    ``fired`` counts the throttled calls.
    """

    capacity: float
    rate: float
    kind: str | None = None
    counts_own_firing: ClassVar[bool] = True
    _tokens: float | None = field(default=None, init=False, repr=False)
    _stamp: float = field(default=0.0, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in (None, "read", "write") or self.capacity < 1 or self.rate < 0:
            raise ValueError("TokenBucket: kind read|write|None, capacity >= 1, rate >= 0")

    def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
        if self.kind is not None and proxy.dialect.is_read(call.action) != (self.kind == "read"):
            return proceed()
        with self._lock:
            now = time.monotonic()
            tokens = self.capacity if self._tokens is None else self._tokens
            tokens = min(self.capacity, tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            allowed = tokens >= 1
            self._tokens = tokens - 1 if allowed else tokens
            if not allowed:
                self.fired += 1
        if not allowed:
            return proxy.dialect.error(*proxy.dialect.throttle)
        return proceed()


# -- EC2 route faults -----------------------------------------------------------------------


def _tag(name: str) -> str:
    # Any namespace: AWS's ends in "/", moto's does not.
    return "{*}" + name


def _xml(reply: Reply) -> ET.Element | None:
    """The document of a successful EC2 answer; None for errors and anything unparsable
    (then the fault leaves the call alone rather than break it)."""
    if reply.status != 200:
        return None
    try:
        return ET.fromstring(reply.body)
    except ET.ParseError:
        return None


def _routes(root: ET.Element) -> list[ET.Element]:
    return root.findall(f".//{_tag('routeSet')}/{_tag('item')}")


@dataclass(eq=False, kw_only=True)
class RouteLimit(Fault):
    """AWS's routes-per-table quota, which moto lacks: CreateRoute into a table that already
    holds ``limit`` routes of that address family (the local route aside) gets 400
    RouteLimitExceeded. Change ``limit`` at any time to emulate a raised quota.

    Routes are counted by asking the upstream (DescribeRouteTables, not counted as a client
    call), and creates into one proxy are serialized so that concurrent creates cannot
    overshoot the limit, as they cannot on AWS. ``fired`` counts the refusals.
    """

    limit: int = 50
    actions: Collection[str] | None = frozenset({"CreateRoute"})
    counts_own_firing: ClassVar[bool] = True
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
        params = call.params()
        table = params.get("RouteTableId", "")
        v6 = "DestinationIpv6CidrBlock" in params
        key = "destinationIpv6CidrBlock" if v6 else "destinationCidrBlock"
        wanted = params.get("DestinationIpv6CidrBlock" if v6 else "DestinationCidrBlock")
        with self._lock:
            query = {"Action": "DescribeRouteTables", "Version": "2016-11-15"}
            body = urlencode({**query, "RouteTableId.1": table}).encode()
            listing = proxy.upstream(Call("POST", "/", _signature_headers(call), body))
            root = _xml(listing)
            if root is not None:
                destinations = [
                    r.findtext(_tag(key))
                    for r in _routes(root)
                    if r.findtext(_tag("origin")) != "CreateRouteTable"
                    and r.find(_tag(key)) is not None
                ]
                # A duplicate is AWS's RouteAlreadyExists, which the upstream will say.
                if wanted not in destinations and len(destinations) >= self.limit:
                    self.fired += 1
                    return proxy.dialect.error(
                        "RouteLimitExceeded",
                        f"The maximum number of routes has been reached for {table}.",
                        400,
                    )
            return proceed()


def _signature_headers(call: Call) -> tuple[tuple[str, str], ...]:
    # moto takes the region (and account) from the Authorization header's credential scope.
    keep = {"authorization", "x-amz-date", "x-amz-security-token"}
    return (
        *((k, v) for k, v in call.headers if k.lower() in keep),
        ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
    )


@dataclass(eq=False, kw_only=True)
class Blackhole(Fault):
    """DescribeRouteTables shows every route to one of ``targets`` (instance or ENI ids) as
    ``blackhole``, as AWS does once the instance is terminated or the ENI deleted (moto does
    not)."""

    targets: Collection[str]
    actions: Collection[str] | None = frozenset({"DescribeRouteTables"})

    def apply(self, call: Call, proceed: Proceed, proxy: FaultProxy) -> Reply:
        reply = proceed()
        root = _xml(reply)
        if root is None:
            return reply
        for route in _routes(root):
            target = route.findtext(_tag("instanceId")) or route.findtext(
                _tag("networkInterfaceId")
            )
            state = route.find(_tag("state"))
            if target in self.targets and state is not None:
                state.text = "blackhole"
        namespace = root.tag[1 : root.tag.index("}")] if root.tag.startswith("{") else None
        body = ET.tostring(
            root, encoding="utf-8", xml_declaration=True, default_namespace=namespace
        )
        return Reply(reply.status, reply.headers, body)


# -- the proxy ------------------------------------------------------------------------------

F = TypeVar("F", bound=Fault)


class FaultProxy(HttpService):
    """A reverse proxy in front of ``upstream_url``; point the SDK at ``url``.

    It listens on 127.0.0.1 unless ``host`` (and ``netns``) say otherwise.
    """

    def __init__(
        self,
        upstream_url: str,
        dialect: Dialect = EC2,
        seed: int = 0,
        host: str = LOOPBACK,
        netns: str | None = None,
    ) -> None:
        super().__init__(host, netns)
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"fault proxy upstream {upstream_url!r} is not http://host:port")
        self.upstream_url = upstream_url
        self.dialect = dialect
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._counts: Counter[str] = Counter()
        # The order of calls, for tests of ordering (replace before delete); bounded so a
        # long benchmark does not grow it without end.
        self._history: deque[str] = deque(maxlen=100_000)

    # -- faults and counts (any thread) ---------------------------------------------------

    def add(self, fault: F) -> F:
        """Add a rule; rules apply in the order added. Returns it, to remove or inspect."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def counts(self) -> CallCounts:
        with self._lock:
            by_action = dict(self._counts)
        reads = sum(n for a, n in by_action.items() if self.dialect.is_read(a))
        return CallCounts(by_action, reads, sum(by_action.values()) - reads)

    def history(self) -> list[str]:
        """The actions of the calls since the last ``reset_counts()``, oldest first."""
        with self._lock:
            return list(self._history)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._history.clear()

    # -- one call -------------------------------------------------------------------------

    def handle(self, call: Call) -> Reply:
        """Count the call, then run it through the faults that fire, then the upstream."""
        with self._lock:
            self._counts[call.action] += 1
            self._history.append(call.action)
            chosen = [f for f in self._faults if self._fires(f, call)]

        def run(i: int) -> Reply:
            if i == len(chosen):
                return self.upstream(call)
            return chosen[i].apply(call, lambda: run(i + 1), self)

        return run(0)

    def _fires(self, fault: Fault, call: Call) -> bool:
        # Called with the lock held: ``times`` and the random sequence are shared state.
        if not fault.applies_to(call) or (fault.times is not None and fault.fired >= fault.times):
            return False
        # Draw only for chancy faults, so adding a certain one does not shift the sequence.
        if fault.probability < 1.0 and self._random.random() >= fault.probability:
            return False
        if not fault.counts_own_firing:
            fault.fired += 1
        return True

    def upstream(self, call: Call) -> Reply:
        """Send ``call`` to the upstream and return its answer (a 502 if it cannot be reached)."""
        conn = http.client.HTTPConnection(self._host, self._port, timeout=60)
        try:
            conn.putrequest(
                call.method, self._prefix + call.path, skip_host=True, skip_accept_encoding=True
            )
            for key, value in call.headers:
                if key.lower() not in _HOP_BY_HOP:
                    conn.putheader(key, value)
            conn.putheader("Content-Length", str(len(call.body)))
            conn.endheaders(call.body)
            answer = conn.getresponse()
            body = answer.read()
            headers = tuple((k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP)
            return Reply(answer.status, headers, body)
        except OSError as err:
            # In the cloud's error format, so the SDK reports it as an API error.
            text = f"fault proxy: upstream {self.upstream_url} unreachable: {err}"
            return self.dialect.error("BadGateway", text, 502)
        finally:
            conn.close()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _proxy_handler(self)


def _proxy_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(LabHandler):
        def _relay(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if self.headers.get("Transfer-Encoding") or length < 0:
                # The body's end is unknown: answer and close rather than misread the stream.
                self.close_connection = True
                self._send(proxy.dialect.error("BadRequest", "fault proxy: no usable length", 400))
                return
            call = Call(
                self.command, self.path, tuple(self.headers.items()), self.rfile.read(length)
            )
            call = replace(call, action=proxy.dialect.action(call))
            try:
                reply = proxy.handle(call)
            except DropConnection:
                self._reset()
                return
            except Exception as exc:
                # A broken fault must show in the test as an error, not as a hung connection.
                text = f"fault proxy: {type(exc).__name__}: {exc}"
                reply = proxy.dialect.error("FaultProxyError", text, 500)
            self._send(reply)

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            for key, value in reply.headers:
                if key.lower() not in _HOP_BY_HOP and key.lower() not in {"server", "date"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        def _reset(self) -> None:
            # Linger 0 makes close() send RST: the client sees a reset, not a clean EOF.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _relay

    return Handler

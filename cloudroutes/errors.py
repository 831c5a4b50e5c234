"""One error hierarchy for cloudroutes.

The class of an error tells the caller what it can do about it:

- ``ConfigError``: the operator must fix input (flags, net-conf, a lease value). Never retried.
- ``LeaseError``: the lease source cannot give this node a lease (out of subnets, revoked).
- ``StoreUnavailable``: the lease store (etcd, kube API) cannot be reached now; retry later.
- ``RouteError`` and its subclasses: a route table refused or failed one change. The reconciler
  maps each subclass to an outcome (retry, throttled, quota-blocked, failed).

Messages are one line: what went wrong, where, and how to fix it. They never carry secrets.
"""

from __future__ import annotations


class CloudroutesError(Exception):
    """Base of every error cloudroutes raises on purpose."""


class ConfigError(CloudroutesError):
    """Input from the operator is invalid. Fix the input; retrying will not help."""


class LeaseError(CloudroutesError):
    """This node cannot hold a subnet lease."""


class OutOfSubnets(LeaseError):
    """Every subnet of the network is leased."""


class LeaseRevoked(LeaseError):
    """This node's own lease was deleted from the store: the node must stop."""


class StoreUnavailable(CloudroutesError):
    """The lease store could not be reached; retrying later may succeed."""


class LeaseRefused(CloudroutesError):
    """A lease read from the store is not one this node will route (outside the Network, a
    bad next hop, another backend): the lease is reported, the rest keeps converging."""


class RouteError(CloudroutesError):
    """A route table failed one change. Subclasses say what the reconciler should do next.

    ``retry_after`` carries the API's own advice, in seconds, when it gave one.
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Transient(RouteError):
    """A temporary failure (5xx, timeout, a conflicting concurrent change): retry soon."""


class Throttled(RouteError):
    """The API asked us to slow down: every call to that table backs off together."""


class QuotaExceeded(RouteError):
    """The table is full: creates stop until space is freed; the lease is reported blocked."""


class RouteNotFound(RouteError):
    """The route to change or delete is not there. Deleting it is then already done."""


class RouteConflict(RouteError):
    """A route for that destination exists with another target and is not ours to replace."""


class Rejected(RouteError):
    """The table refused the route for good (bad next hop, not on-link, permission denied)."""

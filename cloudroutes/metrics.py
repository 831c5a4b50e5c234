"""Prometheus series of the agent. One registry per agent, so tests can run several."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.leases = Gauge("cloudroutes_leases", "Subnet leases in the lease table.", registry=r)
        self.routes_desired = Gauge(
            "cloudroutes_routes_desired", "Routes the leases ask for.", ["table"], registry=r
        )
        self.routes_programmed = Gauge(
            "cloudroutes_routes_programmed",
            "Desired routes that are in the route table.",
            ["table"],
            registry=r,
        )
        self.routes_failed = Gauge(
            "cloudroutes_routes_failed",
            "Desired routes not in the table, by reason class.",
            ["table", "state"],
            registry=r,
        )
        self.route_changes = Counter(
            "cloudroutes_route_changes",
            "Route changes attempted, by action and result.",
            ["table", "action", "result"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "cloudroutes_reconcile_duration_seconds",
            "Time of one reconcile pass (observe, diff, apply).",
            ["table"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lease_to_route_latency = Histogram(
            "cloudroutes_lease_event_to_route_seconds",
            "Time from a lease change arriving to its routes being in the table.",
            ["table"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.leases_refused = Gauge(
            "cloudroutes_leases_refused",
            "Leases a route table does not serve (bad subnet, next hop or backend type).",
            ["table"],
            registry=r,
        )
        self.lease_refusals = Counter(
            "cloudroutes_lease_refusals",
            "Times a lease was refused (each lease counts once per new reason).",
            ["table"],
            registry=r,
        )
        self.ready = Gauge(
            "cloudroutes_ready",
            "1 while /readyz answers 200: subnet.env written and the lease store answering.",
            registry=r,
        )
        self.config_differs = Gauge(
            "cloudroutes_config_differs",
            "1 while the network config in the store differs from the one the agent runs "
            "with (changed, deleted or invalid): a restart would apply it.",
            registry=r,
        )
        self.route_table_up = Gauge(
            "cloudroutes_route_table_up",
            "1 while the route table can be read and written, 0 while whole passes fail.",
            ["table"],
            registry=r,
        )

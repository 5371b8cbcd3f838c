"""Prometheus metrics of one proxy, in its own CollectorRegistry (several proxies may live in
one process, as they do in the tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pdxfer_proxy_requests",
            "Client requests answered, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "pdxfer_proxy_errors", "Failed client requests, by error type", ["type"], registry=r
        )
        self.ttft = Histogram(
            "pdxfer_proxy_ttft_seconds",
            "Request arrival to the first streamed event sent to the client",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "pdxfer_proxy_request_duration_seconds",
            "Request arrival to the last byte of the answer (end-to-end)",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.leg_latency = Histogram(
            "pdxfer_proxy_leg_duration_seconds",
            "Duration of one upstream leg (prefill: whole call; decode: to the first event)",
            ["role"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("pdxfer_proxy_in_flight", "Client requests being served", registry=r)
        self.backend_in_flight = Gauge(
            "pdxfer_proxy_backend_in_flight",
            "Requests in flight per worker",
            ["role", "backend"],
            registry=r,
        )
        self.backend_tokens = Gauge(
            "pdxfer_proxy_backend_outstanding_tokens",
            "Estimated tokens of work in flight per worker",
            ["role", "backend"],
            registry=r,
        )
        self.backend_up = Gauge(
            "pdxfer_proxy_backend_up", "1 when the worker is routable", ["role", "backend"], registry=r
        )
        self.retries = Counter(
            "pdxfer_proxy_retries", "Legs retried on another worker", ["role"], registry=r
        )
        self.health_transitions = Counter(
            "pdxfer_proxy_health_transitions",
            "Worker health changes",
            ["role", "backend", "to"],
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

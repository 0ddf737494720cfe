"""The router's Prometheus metrics, on a per-app ``CollectorRegistry`` (several routers may share a process).

Labels are bounded: ``model`` is a model some backend serves (else ``"other"``), ``backend`` a pool member's URL
(series of removed backends are dropped), ``policy`` a configured policy, ``status`` an HTTP status code.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["RouterMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)  # fmt: skip
_SCRAPE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class RouterMetrics:
    """The metric families, plus per-request helpers that cache labelled children (``.labels()`` takes a lock and
    builds tuples: too slow to repeat per request). Caches are bounded like the labels themselves."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kvscale_router_requests", "Requests answered, by model, backend, policy and HTTP status",
            ["model", "backend", "policy", "status"], registry=r,
        )
        self.ttft = Histogram(
            "kvscale_router_ttft_seconds", "Router-observed time to first byte of the response body",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "kvscale_router_itl_seconds", "Router-observed time between streamed chunks",
            ["model"], buckets=_ITL_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            "kvscale_router_request_duration_seconds", "Router-observed request duration",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.retries = Counter(
            "kvscale_router_retries", "Attempts retried on another backend, by reason", ["reason"], registry=r
        )
        self.failures = Counter(
            "kvscale_router_failures", "Failed attempts and streams, by reason (connect, timeout, first_byte_timeout, "
            "backend_down, 5xx, empty, client_fault, stream, stream_idle_timeout)", ["reason"], registry=r,
        )
        self.ejections = Counter(
            "kvscale_router_ejections", "Passive outlier ejections, by backend", ["backend"], registry=r
        )
        self.rejected = Counter(
            "kvscale_router_rejected", "Requests refused for overload (429 queue full, 503 queue timeout)",
            ["reason"], registry=r,
        )
        self.auth_failures = Counter(
            "kvscale_router_auth_failures", "Requests refused for a missing or invalid API key (401)", registry=r
        )
        self.in_flight = Gauge("kvscale_router_in_flight", "Requests being proxied now", registry=r)
        self.queued = Gauge("kvscale_router_queued", "Requests waiting for a concurrency slot", registry=r)
        self.backends = Gauge("kvscale_router_backends", "Backends in the pool, by state", ["state"], registry=r)
        self.prefix_entries = Gauge(
            "kvscale_router_prefix_index_entries", "Block hashes held by the prefix index", registry=r
        )
        self.prefix_hit_rate = Gauge(
            "kvscale_router_prefix_hit_rate", "Estimated prefix hit rate: matched / looked-up prompt blocks",
            registry=r,
        )
        self.scrape = Histogram(
            "kvscale_router_scrape_seconds", "Time to fetch and parse one backend's /metrics (light parse)",
            buckets=_SCRAPE_BUCKETS, registry=r,
        )
        self.scrape_errors = Counter(
            "kvscale_router_scrape_errors", "Failed backend metric scrapes", registry=r
        )
        self.health_checks = Counter(
            "kvscale_router_health_checks", "Active /health checks, by result", ["result"], registry=r
        )

        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, family: Any, *labels: str) -> Any:
        key = (id(family), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def request_counter(self, model: str, backend: str, policy: str, status: int) -> Any:
        return self._child(self.requests, model, backend, policy, str(status))

    def ttft_for(self, model: str) -> Any:
        return self._child(self.ttft, model)

    def itl_for(self, model: str) -> Any:
        return self._child(self.itl, model)

    def duration_for(self, model: str) -> Any:
        return self._child(self.duration, model)

    def forget_backend(self, url: str) -> None:
        """Drop the series of a backend that left the pool (keeps label sets bounded under pod churn)."""
        rid = id(self.requests)
        for key in [k for k in self._children if k[0] == rid and k[2] == url]:
            del self._children[key]
        for labels in list(self.requests._metrics):
            if labels[1] == url:
                self.requests.remove(*labels)
        if (url,) in self.ejections._metrics:
            self.ejections.remove(url)

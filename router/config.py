"""Router configuration: one dataclass, filled from CLI flags (each with a ``KVSCALE_ROUTER_*`` env equivalent)."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.backends import BackendSpec, EjectionPolicy

__all__ = ["RouterConfig"]


@dataclass
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # discovery
    backends: list[BackendSpec] = field(default_factory=list)
    k8s_selector: str | None = None
    k8s_namespace: str = "default"
    k8s_port: int = 8000  # the engine port on each pod (or the pod annotation kvscale.io/port)
    k8s_relist_s: float = 30.0
    # policy
    policy: str = "least-request"
    policy_config: str | None = None  # JSON file with extra policies
    # backend state
    scrape_interval_s: float = 0.2
    scrape_timeout_s: float = 1.0
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    health_failure_threshold: int = 2
    models_refresh_s: float = 30.0
    ejection: EjectionPolicy = field(default_factory=EjectionPolicy)
    # proxy
    max_attempts: int = 3
    retry_backoff_s: float = 0.02
    retry_backoff_max_s: float = 0.5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 300.0  # max silence between upstream chunks (socket level)
    first_byte_timeout_s: float = 120.0  # streamed requests: to the first SSE chunk (0 = none)
    stream_idle_timeout_s: float = 60.0  # started streams: max silence between chunks (0 = none)
    header_timeout_s: float = 10.0  # clients: to send a complete request head (slowloris guard; 0 = none)
    request_timeout_s: float = 0.0  # total per attempt; 0 = none
    # limits and security
    max_concurrency: int = 4096
    max_queue: int = 1024
    queue_timeout_s: float = 10.0
    max_body_bytes: int = 4 * 1024 * 1024
    retry_after_s: int = 1
    api_keys: frozenset[str] = frozenset()
    # index and logs
    prefix_index_capacity: int = 200_000
    governance_log: str | None = "-"  # "-" = stderr, a path, or None/"" = off

    def validate(self, require_source: bool = True) -> None:
        if require_source and not self.backends and not self.k8s_selector:
            raise ValueError("give --backend URL (repeatable) or --k8s-selector SELECTOR")
        for name in ("max_attempts", "max_concurrency", "max_body_bytes", "prefix_index_capacity",
                     "health_failure_threshold"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be ≥ 0")
        for name in ("scrape_interval_s", "health_interval_s", "connect_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("first_byte_timeout_s", "stream_idle_timeout_s", "header_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = no limit)")
        if not 0 <= self.ejection.max_percent <= 100:
            raise ValueError("max_ejection_percent must be in [0, 100]")

"""Backends and their live state: router-counted in-flight requests, scraped engine stats, health, ejection.

A :class:`Backend` is identified by its URL and hashed by identity, so plugins may key dicts by it. The
:class:`BackendPool` keeps state across discovery updates (a pod that stays keeps its counters) and answers
"which backends may serve model M now".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

from kvscale.engine_stats import EngineStats

__all__ = ["ROLES", "Backend", "BackendPool", "BackendSpec", "EjectionPolicy", "parse_backend_spec"]

ROLES = ("both", "prefill", "decode")


@dataclass(frozen=True)
class BackendSpec:
    """What discovery knows about a backend: URL, served models (empty = ask /v1/models), role, labels."""

    url: str
    models: frozenset[str] = frozenset()
    role: str = "both"
    labels: Mapping[str, str] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.url, self.models, self.role, tuple(sorted(self.labels.items()))))


def parse_backend_spec(text: str) -> BackendSpec:
    """``URL[,role=prefill|decode|both][,model=NAME]...[,KEY=VALUE]`` (repeat ``model=`` for several models).

    Any other ``KEY=VALUE`` becomes a label (e.g. ``group=long``).
    """
    url, *parts = [p.strip() for p in text.split(",")]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--backend {text!r}: the URL must start with http:// or https://")
    role = "both"
    models: set[str] = set()
    labels: dict[str, str] = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"--backend {text!r}: expected KEY=VALUE after the URL, got {part!r}")
        key, value = (s.strip() for s in part.split("=", 1))
        if key == "role":
            if value not in ROLES:
                raise ValueError(f"--backend {text!r}: role must be one of {ROLES}, got {value!r}")
            role = value
        elif key == "model":
            models.add(value)
        elif key:
            labels[key] = value
    return BackendSpec(url.rstrip("/"), frozenset(models), role, labels)


@dataclass(frozen=True)
class EjectionPolicy:
    """Passive outlier ejection: after ``consecutive_failures`` failures in a row the backend leaves rotation for
    ``base_s · 2^(k-1)`` seconds (k = ejections since its last success, capped at ``max_s``). When that time is
    up it is eligible again (the re-probe): one more failure ejects it for twice as long, a success resets it."""

    consecutive_failures: int = 3
    base_s: float = 1.0
    max_s: float = 60.0
    # At most this share of the pool ejected at once; at least one backend may always be (Envoy's outlier
    # detection ``max_ejection_percent``, default 10): a fault that looks like every backend's cannot empty the pool.
    max_percent: float = 10.0


@dataclass(eq=False)
class Backend:
    """One engine endpoint as the router sees it. Plugins read these fields; only the router writes them."""

    url: str
    role: str = "both"
    labels: dict[str, str] = field(default_factory=dict)
    configured_models: frozenset[str] = frozenset()
    discovered_models: frozenset[str] = frozenset()  # from GET /v1/models
    in_flight: int = 0  # requests the router has sent and not finished (exact, instant)
    stats: EngineStats | None = None  # latest light scrape (running, waiting, KV usage)
    stats_at: float | None = None  # monotonic time of that scrape
    scrape_error: str | None = None  # last scrape failure (stats then keeps the previous value)
    healthy: bool = True  # active /health checks
    health_failures: int = 0
    consecutive_failures: int = 0  # passive: request failures in a row
    ejections: int = 0  # since last success
    ejected_until: float = 0.0
    requests_total: int = 0
    attempts: set[Any] = field(default_factory=set, repr=False)  # router.proxy.AttemptGuard of each attempt in flight
    _urls: dict[str, URL] = field(default_factory=dict, repr=False)  # parsed endpoint URLs, by path

    def abort_attempts(self) -> int:
        """Fire the deadline of every attempt in flight here (the backend left rotation): those that had not
        started are retried elsewhere, started streams end with an SSE error event. Returns how many."""
        guards = list(self.attempts)
        for g in guards:
            g.abort()
        return len(guards)

    def endpoint(self, path: str) -> URL:
        """``url + path`` as a parsed URL, cached (the HTTP client then skips parsing it per request)."""
        u = self._urls.get(path)
        if u is None:
            u = self._urls[path] = URL(self.url + path)
        return u

    @property
    def models(self) -> frozenset[str]:
        return self.configured_models or self.discovered_models

    @property
    def tags(self) -> dict[str, str]:
        """Alias of ``labels`` (static ``--backend`` KEY=VALUE tags or pod labels)."""
        return self.labels

    def stats_age(self, now: float) -> float:
        """Seconds since the last successful scrape (inf if never)."""
        return math.inf if self.stats_at is None else now - self.stats_at

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def __repr__(self) -> str:
        return f"Backend({self.url!r}, role={self.role}, in_flight={self.in_flight})"


class BackendPool:
    """The live set of backends, updated by discovery; state survives updates for backends that stay."""

    def __init__(self, clock: Callable[[], float], ejection: EjectionPolicy | None = None) -> None:
        self.clock = clock
        self.ejection = ejection or EjectionPolicy()
        self.backends: dict[str, Backend] = {}
        self.version = 0  # bumped on every membership change
        self.on_eject: Callable[[Backend], None] | None = None
        self.on_remove: Callable[[Backend], None] | None = None

    def update(self, specs: Iterable[BackendSpec]) -> tuple[list[Backend], list[Backend]]:
        """Replace the membership with ``specs``; returns (added, removed)."""
        wanted = {s.url: s for s in specs}
        removed = [b for url, b in self.backends.items() if url not in wanted]
        for b in removed:
            del self.backends[b.url]
            if self.on_remove:
                self.on_remove(b)
        added = []
        for url, spec in wanted.items():
            b = self.backends.get(url)
            if b is None:
                b = Backend(url, spec.role, dict(spec.labels), spec.models)
                self.backends[url] = b
                added.append(b)
            else:
                b.role, b.labels, b.configured_models = spec.role, dict(spec.labels), spec.models
        if added or removed:
            self.version += 1
        return added, removed

    def __iter__(self):
        return iter(list(self.backends.values()))

    def __len__(self) -> int:
        return len(self.backends)

    def get(self, url: str) -> Backend | None:
        return self.backends.get(url)

    def serves(self, model: str) -> bool:
        """True if some backend (any state) serves ``model``."""
        return any(model in b.models for b in self.backends.values())

    def for_model(self, model: str) -> list[Backend]:
        """Every backend (any state) that serves ``model``."""
        return [b for b in self.backends.values() if model in b.models]

    def available(self, model: str, roles: tuple[str, ...] = ("both", "decode")) -> list[Backend]:
        """Backends that serve ``model`` in one of ``roles``, are healthy and not ejected."""
        now = self.clock()
        return [b for b in self.backends.values()
                if b.healthy and now >= b.ejected_until and b.role in roles and model in b.models]  # fmt: skip

    def models(self, healthy_only: bool = True) -> set[str]:
        now = self.clock()
        return {m for b in self.backends.values() if not healthy_only or b.available(now) for m in b.models}

    # -- passive outlier detection --------------------------------------------------------------------------
    def _may_eject(self, now: float) -> bool:
        """One more ejection keeps the ejected share within ``max_percent`` (or it is the first one)."""
        ejected = sum(1 for b in self.backends.values() if now < b.ejected_until)
        return ejected == 0 or 100.0 * (ejected + 1) / max(len(self.backends), 1) <= self.ejection.max_percent

    def record_success(self, b: Backend) -> None:
        b.consecutive_failures = 0
        b.ejections = 0

    def record_failure(self, b: Backend) -> bool:
        """Count a failed attempt; returns True if this ejected the backend."""
        b.consecutive_failures += 1
        now = self.clock()
        # After an ejection period one more failure (the re-probe) ejects again, for twice as long.
        threshold = 1 if b.ejections else self.ejection.consecutive_failures
        if b.consecutive_failures >= threshold and now >= b.ejected_until and self._may_eject(now):
            b.ejections += 1
            period = min(self.ejection.max_s, self.ejection.base_s * 2 ** (b.ejections - 1))
            b.ejected_until = now + period
            b.consecutive_failures = 0
            if self.on_eject:
                self.on_eject(b)
            return True
        return False

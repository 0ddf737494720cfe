"""Background loops that keep backend state fresh: light metric scrapes, active /health checks, model lists."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from kvscale.engine_stats import ScrapeError, scrape
from router.backends import Backend, BackendPool
from router.metrics import RouterMetrics

log = logging.getLogger("kvscale.router")

__all__ = ["BackendMonitor"]


class BackendMonitor:
    """Scrapes every backend's ``/metrics`` each ``scrape_interval_s`` (``light=True``: running, waiting, KV usage),
    probes ``/health`` each ``health_interval_s`` and refreshes ``/v1/models`` for backends without configured
    models. A failed scrape keeps the previous stats (their age grows); it never reads as an idle engine."""

    def __init__(
        self,
        pool: BackendPool,
        session: aiohttp.ClientSession,
        metrics: RouterMetrics,
        *,
        scrape_interval_s: float = 0.2,
        scrape_timeout_s: float = 1.0,
        health_interval_s: float = 2.0,
        health_timeout_s: float = 1.0,
        health_failure_threshold: int = 2,
        models_refresh_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.session = session
        self.metrics = metrics
        self.scrape_interval_s = scrape_interval_s
        self.scrape_timeout_s = scrape_timeout_s
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.health_failure_threshold = health_failure_threshold
        self.models_refresh_s = models_refresh_s
        self.clock = clock
        self._models_at: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(self.scrape_all, self.scrape_interval_s), name="router-scrape"),
            asyncio.create_task(self._loop(self.check_all, self.health_interval_s), name="router-health"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _loop(self, fn, interval: float) -> None:
        while True:
            started = self.clock()
            try:
                await fn()
            except Exception:  # a bug in one round must not stop the loop
                log.exception("router background loop %s failed", fn.__name__)
            await asyncio.sleep(max(0.0, interval - (self.clock() - started)))

    # -- metrics scrape --------------------------------------------------------------------------------------
    async def scrape_one(self, b: Backend) -> None:
        t0 = time.perf_counter()
        try:
            stats = await scrape(self.session, f"{b.url}/metrics", timeout_s=self.scrape_timeout_s, light=True)
        except ScrapeError as exc:
            b.scrape_error = str(exc)
            self.metrics.scrape_errors.inc()
            return
        self.metrics.scrape.observe(time.perf_counter() - t0)
        b.stats, b.stats_at, b.scrape_error = stats, self.clock(), None

    async def scrape_all(self) -> None:
        backends = list(self.pool)
        if backends:
            await asyncio.gather(*(self.scrape_one(b) for b in backends))

    # -- health and models -----------------------------------------------------------------------------------
    async def check_one(self, b: Backend) -> None:
        ok = False
        try:
            async with self.session.get(
                f"{b.url}/health", timeout=aiohttp.ClientTimeout(total=self.health_timeout_s)
            ) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        self.metrics.health_checks.labels("ok" if ok else "fail").inc()
        if ok:
            if not b.healthy:
                log.info("backend %s is healthy again", b.url)
            b.healthy, b.health_failures = True, 0
            if not b.configured_models and (
                not b.discovered_models or self.clock() - self._models_at.get(b.url, -1e18) >= self.models_refresh_s
            ):
                await self.refresh_models(b)
        else:
            b.health_failures += 1
            if b.health_failures >= self.health_failure_threshold and b.healthy:
                b.healthy = False
                aborted = b.abort_attempts()
                log.warning("backend %s failed %d health checks: out of rotation (%d requests in flight there "
                            "aborted)", b.url, b.health_failures, aborted)  # fmt: skip

    async def refresh_models(self, b: Backend) -> None:
        try:
            async with self.session.get(
                f"{b.url}/v1/models", timeout=aiohttp.ClientTimeout(total=self.health_timeout_s)
            ) as resp:
                if resp.status != 200:
                    return
                data = await resp.json(content_type=None)
            models = frozenset(m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, AttributeError, TypeError):
            return
        b.discovered_models = models
        self._models_at[b.url] = self.clock()

    async def check_all(self) -> None:
        backends = list(self.pool)
        if backends:
            await asyncio.gather(*(self.check_one(b) for b in backends))
        self._update_gauges()

    def _update_gauges(self) -> None:
        now = self.clock()
        counts = {"available": 0, "unhealthy": 0, "ejected": 0}
        for b in self.pool:
            if not b.healthy:
                counts["unhealthy"] += 1
            elif now < b.ejected_until:
                counts["ejected"] += 1
            else:
                counts["available"] += 1
        for state, n in counts.items():
            self.metrics.backends.labels(state).set(n)

    async def on_added(self, backends: list[Backend]) -> None:
        """First health check (and model list) for new backends, so they serve without waiting a round."""
        if backends:
            await asyncio.gather(*(self.check_one(b) for b in backends), *(self.scrape_one(b) for b in backends))

"""Signals behind a scaling decision: one :class:`PoolSignals` per pool per signal interval.

Where they come from (the "metrics adapter"):

* :class:`PodHistory` turns per-pod :class:`~kvscale.engine_stats.EngineStats` snapshots into pool signals with
  :func:`~kvscale.engine_stats.window`: rates over the last interval, latency percentiles and mean ISL/OSL over the
  longer latency window, gauges as of the last read. Both the live pod scraper (:class:`PodScrapeSource`) and the
  virtual-clock evaluator (``scaler.evaluate.signals.VirtualSource``) feed it, so the policy sees the same quantities
  computed the same way in production and in the evaluation.
* :class:`PrometheusSource` asks a real Prometheus for the same quantities (``rate()`` of the counters, summed
  histogram buckets, sums of gauges) and returns the same shape.

A failed or stale read raises :class:`SignalError` (never zeros: Dynamo #14765 scaled a pool down because a
failed read looked idle). :class:`SignalPending` (a subclass) means "not enough history yet" and is not counted as
an error.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from kvscale.engine_stats import (
    EngineStats,
    EngineWindow,
    HistogramSnapshot,
    ScrapeError,
    fetch_page,
    parse_metrics,
    window,
)
from kvscale.engines import ADAPTERS, VLLM, EngineAdapter, promql
from scaler.discovery import PodDiscovery
from scaler.metadata import ScalerSettings


class SignalError(RuntimeError):
    """The pool's signals could not be read (or are stale): hold, never read as idle."""


class SignalPending(SignalError):
    """Not enough history for a rate yet (first read after start or after a pod set change)."""


@dataclass(frozen=True)
class PoolSignals:
    """A pool's state over the last signal interval (rates are pool totals)."""

    at: float
    replicas: int  # pods whose metrics were read
    arrival_rate: float  # req/s entering the pool's engines (finished + growth of running + waiting)
    finish_rate: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    mean_isl: float | None  # over the latency window (finished requests)
    mean_osl: float | None
    prefix_hit_rate: float | None
    running: float
    waiting: float
    kv_usage: float  # mean over pods, 0..1
    kv_usage_max: float
    ttft: HistogramSnapshot = field(default_factory=HistogramSnapshot)  # over the latency window
    itl: HistogramSnapshot = field(default_factory=HistogramSnapshot)
    window_s: float = 0.0
    missing: int = 0  # discovered pods that did not answer (their share was extrapolated)

    def ttft_quantile(self, percentile: float) -> float | None:
        return self.ttft.quantile(percentile / 100.0)

    def itl_quantile(self, percentile: float) -> float | None:
        return self.itl.quantile(percentile / 100.0)

    @property
    def idle(self) -> bool:
        return self.arrival_rate <= 0.0 and self.running <= 0.0 and self.waiting <= 0.0


class SignalSource(Protocol):
    """What the scaler's background loop reads every signal interval."""

    async def read(self) -> PoolSignals: ...

    async def close(self) -> None: ...


def _sum_hist(hs: list[HistogramSnapshot]) -> HistogramSnapshot:
    out = HistogramSnapshot()
    for h in hs:
        out = out + h
    return out


def _weighted_mean(pairs: list[tuple[float | None, float]]) -> float | None:
    num = sum(v * w for v, w in pairs if v is not None and w > 0)
    den = sum(w for v, w in pairs if v is not None and w > 0)
    return num / den if den > 0 else None


class PodHistory:
    """Per-pod snapshot history → :class:`PoolSignals`.

    ``update`` takes the latest read of every discovered pod (an ``EngineStats`` or the ``ScrapeError`` it
    raised). Pods that failed are extrapolated from the others (traffic is load-balanced) as long as at least
    ``min_answer_fraction`` of the pods answered; otherwise the whole read is a :class:`SignalError`.
    """

    def __init__(self, latency_window_s: float, min_answer_fraction: float = 0.5) -> None:
        self.latency_window_s = latency_window_s
        self.min_answer_fraction = min_answer_fraction
        self._hist: dict[Hashable, deque[EngineStats]] = {}

    def update(self, reads: Mapping[Hashable, EngineStats | Exception], now: float) -> PoolSignals:
        for gone in set(self._hist) - set(reads):
            del self._hist[gone]
        if not reads:
            raise SignalError("no pods discovered for this pool")
        ok = {k: v for k, v in reads.items() if isinstance(v, EngineStats)}
        failed = {k: v for k, v in reads.items() if not isinstance(v, EngineStats)}
        if len(ok) < max(1, math.ceil(self.min_answer_fraction * len(reads))):
            first = next(iter(failed.values()), None)
            raise SignalError(f"only {len(ok)} of {len(reads)} pods answered; e.g. {first}")
        shorts: list[EngineWindow] = []
        longs: list[EngineWindow] = []
        for key, stats in ok.items():
            h = self._hist.setdefault(key, deque())
            if h and stats.at <= h[-1].at:
                raise SignalError(f"pod {key}: snapshot is not newer than the previous one")
            h.append(stats)
            # keep one snapshot at or before the window start, so the long window spans it fully
            while len(h) > 2 and h[1].at <= stats.at - self.latency_window_s:
                h.popleft()
            if len(h) >= 2:
                shorts.append(window(h[-2], h[-1]))
                longs.append(window(h[0], h[-1]))
        if not shorts:
            raise SignalPending("first read of these pods: rates need a second read")
        # Rates of the pods with a window also stand for pods that served in the last interval but failed to answer
        # now (traffic is balanced). Not for new pods (first read): they served little or nothing of the interval;
        # extrapolating to them would turn a scale-up into a phantom arrival spike (4 old + 12 new pods read 4x the
        # real rate) and feed back into more scale-up.
        known_failed = sum(1 for k in failed if self._hist.get(k))
        scale = (len(shorts) + known_failed) / len(shorts)
        gauge_scale = len(reads) / len(ok)
        return PoolSignals(
            at=now,
            replicas=len(ok),
            arrival_rate=sum(w.arrival_rate for w in shorts) * scale,
            finish_rate=sum(w.finish_rate for w in shorts) * scale,
            prompt_tokens_per_s=sum(w.prompt_tokens_per_s for w in shorts) * scale,
            generation_tokens_per_s=sum(w.generation_tokens_per_s for w in shorts) * scale,
            mean_isl=_weighted_mean([(w.mean_isl, w.finish_rate * w.seconds) for w in longs]),
            mean_osl=_weighted_mean([(w.mean_osl, w.finish_rate * w.seconds) for w in longs]),
            prefix_hit_rate=_weighted_mean([(w.prefix_hit_rate, w.prompt_tokens_per_s + 1e-9) for w in longs]),
            running=sum(s.running for s in ok.values()) * gauge_scale,
            waiting=sum(s.waiting for s in ok.values()) * gauge_scale,
            kv_usage=sum(s.kv_usage for s in ok.values()) / len(ok),
            kv_usage_max=max(s.kv_usage for s in ok.values()),
            ttft=_sum_hist([w.ttft for w in longs]),
            itl=_sum_hist([w.itl for w in longs]),
            window_s=max(w.seconds for w in shorts),
            missing=len(failed),
        )


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the scaler, which then stops its workers


class PageParser:
    """Parses pods' metrics pages in ``workers`` worker processes, off the event loop that answers KEDA.

    A vLLM page takes ~1-2 ms of pure-Python parsing (``prometheus_client``'s parser); with 20 ScaledObjects of a
    few pods each that is enough to put a 5 ms tail on the GetMetrics answers sharing the loop. ``workers=0``
    parses in line (tests, the evaluator). Workers are spawned (not forked: the gRPC runtime's threads do not
    survive a fork) when the service starts; one that dies is replaced on the next page.
    """

    def __init__(self, workers: int = 1) -> None:
        if workers < 0:
            raise ValueError(f"parse workers must be >= 0, got {workers}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        if self.workers and self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint
            )
            for _ in range(self.workers):  # spawn and import now, not on the first scrape
                self._pool.submit(int)

    async def parse(self, url: str, text: str, at: float) -> EngineStats:
        """``text`` fetched from ``url`` at monotonic time ``at``; raises ScrapeError naming the URL."""
        try:
            if not self.workers:
                return parse_metrics(text, at=at)
            self.start()
            assert self._pool is not None
            return await asyncio.get_running_loop().run_in_executor(self._pool, parse_metrics, text, at)
        except ScrapeError as exc:
            raise ScrapeError(f"{url}: {exc}") from exc
        except BrokenProcessPool as exc:
            self._pool = None  # a worker died (OOM-killed?): the next page starts a new pool
            raise ScrapeError(f"{url}: the metrics parser process died ({exc})") from exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class PodScrapeSource:
    """Pods mode: discover the pool's pods, scrape each one's /metrics concurrently, feed :class:`PodHistory`."""

    def __init__(
        self,
        discovery: PodDiscovery,
        session: aiohttp.ClientSession,
        settings: ScalerSettings,
        *,
        timeout_s: float | None = None,
        clock: Callable[[], float],
        parser: PageParser | None = None,
    ) -> None:
        self.discovery = discovery
        self.session = session
        self.timeout_s = timeout_s if timeout_s is not None else min(2.0, settings.signal_interval_s * 0.8)
        self.history = PodHistory(settings.latency_window_s)
        self.clock = clock
        self.parser = parser or PageParser(workers=0)
        self.last_failed = 0  # pods whose page could not be read or was implausible, at the last read
        self.last_stats: dict[str, EngineStats] = {}  # the pages read at the last read, by URL

    async def _one(self, url: str) -> EngineStats | Exception:
        try:
            text = await fetch_page(self.session, url, timeout_s=self.timeout_s)
            return await self.parser.parse(url, text, time.monotonic())
        except ScrapeError as e:
            return e

    async def read(self) -> PoolSignals:
        urls = self.discovery.urls()
        if urls is None:
            raise SignalError(f"pod discovery has no result yet: {self.discovery.last_error or 'starting'}")
        results = await asyncio.gather(*(self._one(u) for u in urls))
        self.last_failed = sum(1 for r in results if isinstance(r, Exception))  # counted by the service
        self.last_stats = {u: r for u, r in zip(urls, results, strict=True) if isinstance(r, EngineStats)}
        return self.history.update(dict(zip(urls, results, strict=True)), self.clock())

    async def close(self) -> None:
        self.discovery.close()


class PrometheusSource:
    """Prometheus mode: the same quantities from PromQL over ``latencyWindowSeconds``.

    The queries are built from the engine's adapter (:mod:`kvscale.engines`): ``rate()`` of its counters, the
    summed bucket increases of its latency histograms (turned into a :class:`HistogramSnapshot` so the quantile is
    computed exactly as in pods mode), sums of its gauges. The engine is found on the first read, by which
    running-requests series the pool's selector has (``count(vllm:num_requests_running{...})``,
    ``count(sglang:num_running_reqs{...})``), and kept until a read finds no series. Any failed query, or no
    running-requests series of any engine (every target down: Prometheus marks its series stale), is a
    :class:`SignalError`.
    """

    def __init__(self, settings: ScalerSettings, *, clock: Callable[[], float], timeout_s: float = 3.0) -> None:
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        self.settings = settings
        self.clock = clock
        self.timeout_s = timeout_s
        # one quick retry: a down Prometheus must fail this read fast, not after seconds of backoff
        self.prom = PrometheusConnect(
            url=settings.prometheus_url, retry=Retry(total=1, backoff_factor=0.05), timeout=timeout_s
        )
        matchers = [f'model_name="{_escape(settings.model)}"']
        if settings.prometheus_selector:
            matchers.append(settings.prometheus_selector)
        self.selector = "{" + ",".join(matchers) + "}"
        self.window = f"{max(2, round(settings.latency_window_s))}s"
        self.engine: EngineAdapter | None = None  # detected on the first read; None again after a read without series

    def queries(self, engine: EngineAdapter | str | None = None) -> dict[str, str]:
        """The PromQL of one read for ``engine`` (default: the detected one, else vLLM)."""
        a = ADAPTERS[engine] if isinstance(engine, str) else engine or self.engine or VLLM
        s, w = self.selector, self.window

        def rate(key: str, part: str = "") -> str:
            return f"sum({promql(a[key], s, fn='rate', window=w, part=part)})"

        running, waiting, kv = a["running"], a["waiting"], a["kv_usage"]
        out = {
            "replicas": f"count({promql(running, s)})",
            "running": f"sum({promql(running, s)})",
            "waiting": f"sum({promql(waiting, s)})",
            "kv_usage": f"avg({promql(kv, s)})",
            "kv_usage_max": f"max({promql(kv, s)})",
            "finish_rate": rate("requests_finished_total"),
            "in_system_deriv": f"sum({promql(running, s, fn='deriv', window=w)})"
            f" + sum({promql(waiting, s, fn='deriv', window=w)})",
            "prompt_tokens_per_s": rate("prompt_tokens_total"),
            "generation_tokens_per_s": rate("generation_tokens_total"),
        }
        if a.get("prompt_len") and a.get("output_len"):
            out["isl_sum"] = rate("prompt_len", "_sum")
            out["isl_count"] = rate("prompt_len", "_count")
            out["osl_sum"] = rate("output_len", "_sum")
        if a.get("prefix_hits_total") and a.get("prefix_queries_total"):
            out["prefix_hits"] = rate("prefix_hits_total")
            out["prefix_queries"] = rate("prefix_queries_total")
        if q := a.get("prefix_hit_rate_gauge"):  # a point-in-time gauge: its mean over the window
            out["prefix_hit_rate_gauge"] = f"avg({promql(q, s, fn='avg_over_time', window=w)})"
        out["ttft_buckets"] = f"sum by (le) ({promql(a['ttft'], s, fn='increase', window=w, part='_bucket')})"
        out["itl_buckets"] = f"sum by (le) ({promql(a['itl'], s, fn='increase', window=w, part='_bucket')})"
        return out

    def _query(self, key: str, q: str) -> list[dict]:
        try:
            params = {"timeout": f"{round(self.timeout_s * 1000)}ms"}  # Prometheus durations: no "3.0s"
            return self.prom.custom_query(q, params=params, timeout=self.timeout_s)
        except Exception as e:  # the client raises requests/ValueError/PrometheusApiClientException
            raise SignalError(f"prometheus {self.settings.prometheus_url}: query {key} failed: {e}") from e

    def _detect(self) -> EngineAdapter:
        """The engine whose running-requests series the pool's selector finds (the first in table order)."""
        for a in ADAPTERS.values():
            if self._query(f"{a.engine} detection", f"count({promql(a.running, self.selector)})"):
                return a
        names = " or ".join(s.sample for a in ADAPTERS.values() for s in a.running.series)
        raise SignalError(f"prometheus: no engine series for this pool (no {names} series for {self.selector})")

    def _query_all(self) -> tuple[EngineAdapter, dict[str, list[dict]]]:
        engine = self.engine or self._detect()
        self.engine = engine
        answers: dict[str, list[dict]] = {}  # by PromQL: SGLang's prompt tokens are two quantities, one query
        out = {}
        for key, q in self.queries(engine).items():
            if q not in answers:
                answers[q] = self._query(key, q)
            out[key] = answers[q]
        return engine, out

    async def read(self) -> PoolSignals:
        engine, res = await asyncio.to_thread(self._query_all)
        at = self.clock()
        # counters whose series appear only with the first finished request (SGLang's): no series is zero
        of = {"finish_rate": "requests_finished_total", "prompt_tokens_per_s": "prompt_tokens_total",
              "generation_tokens_per_s": "generation_tokens_total"}  # fmt: skip
        zero_if_absent = {key for key, quantity in of.items() if engine[quantity].lazy}

        def scalar(key: str, required: bool = True) -> float | None:
            vec = res.get(key) or []
            if not vec:
                if required and key not in zero_if_absent:
                    raise SignalError(f"prometheus: no series for {key} ({self.queries(engine)[key]}): targets down?")
                return None
            v = float(vec[0]["value"][1])
            return v if math.isfinite(v) else None

        def hist(key: str) -> HistogramSnapshot:
            per_le = sorted((float(x["metric"]["le"]), float(x["value"][1])) for x in res.get(key) or [])
            if not per_le:
                return HistogramSnapshot()
            return HistogramSnapshot(tuple(per_le), 0.0, per_le[-1][1])

        replicas = int(scalar("replicas", False) or 0)
        if replicas <= 0:
            self.engine = None  # the pods may have been replaced by another engine's: detect again
            raise SignalError(f"prometheus: no {engine.engine} engine series for this pool")
        finish = scalar("finish_rate") or 0.0
        prompt_tps = scalar("prompt_tokens_per_s") or 0.0
        generation_tps = scalar("generation_tokens_per_s") or 0.0
        if res.get("isl_count"):  # the request-length histograms
            isl_count = scalar("isl_count", False) or 0.0
            mean_isl = (scalar("isl_sum", False) or 0.0) / isl_count if isl_count > 0 else None
            mean_osl = (scalar("osl_sum", False) or 0.0) / isl_count if isl_count > 0 else None
        else:  # none exported (SGLang by default): tokens over the requests finished in the window
            mean_isl = prompt_tps / finish if finish > 0 else None
            mean_osl = generation_tps / finish if finish > 0 else None
        queries = scalar("prefix_queries", False) or 0.0
        hits = scalar("prefix_hits", False)
        gauge_hit = scalar("prefix_hit_rate_gauge", False) if hits is None else None
        if gauge_hit is not None:  # no hits counter (or none yet): the engine's hit-rate gauge
            prefix_hit_rate: float | None = gauge_hit
        else:
            prefix_hit_rate = (hits or 0.0) / queries if queries > 0 else None
        return PoolSignals(
            at=at,
            replicas=replicas,
            arrival_rate=max(0.0, finish + (scalar("in_system_deriv", False) or 0.0)),
            finish_rate=finish,
            prompt_tokens_per_s=prompt_tps,
            generation_tokens_per_s=generation_tps,
            mean_isl=mean_isl,
            mean_osl=mean_osl,
            prefix_hit_rate=prefix_hit_rate,
            running=scalar("running") or 0.0,
            waiting=scalar("waiting") or 0.0,
            kv_usage=scalar("kv_usage") or 0.0,
            kv_usage_max=scalar("kv_usage_max") or 0.0,
            ttft=hist("ttft_buckets"),
            itl=hist("itl_buckets"),
            window_s=self.settings.latency_window_s,
        )

    async def close(self) -> None:
        self.prom.close()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')

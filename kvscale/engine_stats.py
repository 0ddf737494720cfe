"""One shape for an inference engine's state, read from its Prometheus ``/metrics`` (vLLM or SGLang names).

Shared by the scaler (signals behind a decision) and the router (per-backend load). A snapshot is a point in time;
:func:`window` turns two snapshots into rates (arrival rate, tokens/s, mean ISL/OSL, latency percentiles over the
interval). A failed or unparsable read raises :class:`ScrapeError`: callers must never read it as zeros.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "EngineStats",
    "EngineWindow",
    "HistogramSnapshot",
    "ScrapeError",
    "parse_metrics",
    "scrape",
    "window",
]


class ScrapeError(RuntimeError):
    """The engine's metrics could not be read or understood."""


@dataclass(frozen=True)
class HistogramSnapshot:
    """A cumulative Prometheus histogram: ``buckets`` are (upper bound, cumulative count), ending with +Inf."""

    buckets: tuple[tuple[float, float], ...] = ()
    sum: float = 0.0
    count: float = 0.0

    def __sub__(self, older: HistogramSnapshot) -> HistogramSnapshot:
        """Observations made between ``older`` and ``self`` (a reset, i.e. a restarted pod, yields ``self``)."""
        if not older.buckets or self.count < older.count or len(self.buckets) != len(older.buckets):
            return self
        buckets = tuple((le, c - o) for (le, c), (_, o) in zip(self.buckets, older.buckets, strict=True))
        return HistogramSnapshot(buckets, self.sum - older.sum, self.count - older.count)

    def __add__(self, other: HistogramSnapshot) -> HistogramSnapshot:
        if not self.buckets:
            return other
        if not other.buckets:
            return self
        if [le for le, _ in self.buckets] != [le for le, _ in other.buckets]:
            raise ScrapeError("cannot add histograms with different bucket bounds")
        buckets = tuple((le, a + b) for (le, a), (_, b) in zip(self.buckets, other.buckets, strict=True))
        return HistogramSnapshot(buckets, self.sum + other.sum, self.count + other.count)

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """Prometheus ``histogram_quantile``: linear interpolation inside the bucket; None without observations."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        prev_le, prev_c = 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank:
                if math.isinf(le):
                    return prev_le  # Prometheus returns the highest finite bound
                if c == prev_c:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
            prev_le, prev_c = le, c
        return prev_le


@dataclass(frozen=True)
class EngineStats:
    """One scrape of one engine (all its model/engine label sets summed)."""

    engine: str  # "vllm" | "sglang"
    at: float  # monotonic seconds when the scrape completed
    running: float
    waiting: float
    kv_usage: float  # 0..1
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    requests_finished_total: float = 0.0
    prefix_queries_total: float = 0.0  # tokens looked up in the prefix cache
    prefix_hits_total: float = 0.0  # of which cached
    prefix_hit_rate_gauge: float | None = None  # SGLang exports a gauge instead of counters
    ttft: HistogramSnapshot = HistogramSnapshot()
    itl: HistogramSnapshot = HistogramSnapshot()
    prompt_len: HistogramSnapshot = HistogramSnapshot()  # sum and count only (the mean ISL): no buckets
    output_len: HistogramSnapshot = HistogramSnapshot()
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    models: frozenset[str] = frozenset()
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_loras: int | None = None

    @property
    def in_system(self) -> float:
        return self.running + self.waiting


@dataclass(frozen=True)
class EngineWindow:
    """What happened between two scrapes of the same engine."""

    seconds: float
    arrival_rate: float  # req/s: finished + growth of running+waiting
    finish_rate: float
    prompt_tokens_per_s: float  # prefill tokens computed (uncached) per second
    generation_tokens_per_s: float
    mean_isl: float | None  # from the request prompt-length histogram (finished requests)
    mean_osl: float | None
    prefix_hit_rate: float | None
    ttft: HistogramSnapshot = field(default_factory=HistogramSnapshot)
    itl: HistogramSnapshot = field(default_factory=HistogramSnapshot)
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0


def _counter_delta(new: float, old: float) -> float:
    return new - old if new >= old else new  # counter reset (pod restarted)


def window(older: EngineStats, newer: EngineStats) -> EngineWindow:
    """Rates between two snapshots of one engine; raises ScrapeError if they are not in time order."""
    dt = newer.at - older.at
    if dt <= 0:
        raise ScrapeError(f"snapshots are not in time order (dt={dt:.3f}s)")
    finished = _counter_delta(newer.requests_finished_total, older.requests_finished_total)
    arrivals = max(0.0, finished + newer.in_system - older.in_system)
    q = _counter_delta(newer.prefix_queries_total, older.prefix_queries_total)
    h = _counter_delta(newer.prefix_hits_total, older.prefix_hits_total)
    hit_rate = h / q if q > 0 else newer.prefix_hit_rate_gauge
    return EngineWindow(
        seconds=dt,
        arrival_rate=arrivals / dt,
        finish_rate=finished / dt,
        prompt_tokens_per_s=_counter_delta(newer.prompt_tokens_total, older.prompt_tokens_total) / dt,
        generation_tokens_per_s=_counter_delta(newer.generation_tokens_total, older.generation_tokens_total) / dt,
        mean_isl=(newer.prompt_len - older.prompt_len).mean,
        mean_osl=(newer.output_len - older.output_len).mean,
        prefix_hit_rate=hit_rate,
        ttft=newer.ttft - older.ttft,
        itl=newer.itl - older.itl,
        running=newer.running,
        waiting=newer.waiting,
        kv_usage=newer.kv_usage,
    )


# Metric names per engine, first match wins (newer vLLM names first).
_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "vllm": {
        "running": ("vllm:num_requests_running",),
        "waiting": ("vllm:num_requests_waiting",),
        "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "prompt_tokens_total": ("vllm:prompt_tokens",),
        "generation_tokens_total": ("vllm:generation_tokens",),
        "requests_finished_total": ("vllm:request_success",),
        "prefix_queries_total": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
        "prefix_hits_total": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
        "ttft": ("vllm:time_to_first_token_seconds",),
        "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
        "prompt_len": ("vllm:request_prompt_tokens",),
        "output_len": ("vllm:request_generation_tokens",),
    },
    "sglang": {
        "running": ("sglang:num_running_reqs",),
        "waiting": ("sglang:num_queue_reqs",),
        "kv_usage": ("sglang:token_usage",),
        "prompt_tokens_total": ("sglang:prompt_tokens",),
        "generation_tokens_total": ("sglang:generation_tokens",),
        "requests_finished_total": ("sglang:num_requests",),
        "prefix_hit_rate_gauge": ("sglang:cache_hit_rate",),
        "ttft": ("sglang:time_to_first_token_seconds",),
        "itl": ("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
    },
}
_HISTOGRAMS = ("ttft", "itl", "prompt_len", "output_len")
_MEAN_ONLY = ("prompt_len", "output_len")  # only _sum and _count are read: their buckets are skipped
_INFO = ("vllm:cache_config_info", "vllm:lora_requests_info")
_LIGHT = {"running", "waiting", "kv_usage"}


def _keep_prefixes(text: str, engine: str, light: bool) -> tuple[str, ...]:
    """Line prefixes worth parsing: per quantity, the series of the first of its names that the page has (a vLLM
    page exports both the new and the deprecated ITL histogram) and their ``# TYPE`` line, plus the info series.
    Exact names: ``vllm:prompt_tokens`` must not also pull in ``vllm:prompt_tokens_cached_by_source_total``."""
    keep: list[str] = [f"{n}{{" for n in _INFO] + [f"# TYPE {n} " for n in _INFO]
    for key, names in _NAMES[engine].items():
        if light and key not in _LIGHT:
            continue
        name = next((n for n in names if f"# TYPE {n}" in text), names[0])
        if key in _HISTOGRAMS:
            ends = ("_sum", "_count") if key in _MEAN_ONLY else ("_bucket", "_sum", "_count")
        elif key.endswith("_total"):  # counters: prometheus_client exposes name_total
            ends = ("_total{", "_total ")
        else:
            ends = ("{", " ")
        keep += [name + e for e in ends] + [f"# TYPE {name} ", f"# TYPE {name}_total "]
    return tuple(keep)


def parse_metrics(text: str, at: float | None = None, light: bool = False) -> EngineStats:
    """Parse a Prometheus text page from vLLM or SGLang into :class:`EngineStats`.

    ``light`` reads only the load gauges (running, waiting, KV usage) and the info series: what a router needs
    every few hundred milliseconds, at a fraction of the cost. Counters and histograms are then left empty.

    Raises ScrapeError when the page is not an engine's metrics (no running/waiting series), so a wrong URL or a
    proxy's error page is never mistaken for an idle engine.
    """
    engine = "sglang" if "sglang:num_running_reqs" in text else "vllm"
    names = _NAMES[engine]
    # Cheap pre-filter: the library parser is pure Python (~30 us a sample) and a vLLM page is mostly series we
    # never read (other histograms, buckets of the length histograms).
    keep = _keep_prefixes(text, engine, light)
    lines = [ln for ln in text.splitlines() if ln.startswith(keep)]
    try:
        families = {f.name: f for f in text_string_to_metric_families("\n".join(lines) + "\n")}
    except Exception as exc:  # the library raises ValueError/TypeError/IndexError on malformed pages
        raise ScrapeError(f"malformed metrics page: {exc}") from exc

    def family(key: str):
        for name in names.get(key, ()):
            if name in families:
                return families[name]
        return None

    def scalar(key: str, reduce=sum) -> float | None:
        f = family(key)
        if f is None:
            return None
        values = [s.value for s in f.samples if not s.name.endswith("_created") and math.isfinite(s.value)]
        return float(reduce(values)) if values else None

    def histogram(key: str) -> HistogramSnapshot:
        f = family(key)
        if f is None:
            return HistogramSnapshot()
        per_le: dict[float, float] = {}
        total = count = 0.0
        for s in f.samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                per_le[le] = per_le.get(le, 0.0) + s.value
            elif s.name.endswith("_sum"):
                total += s.value
            elif s.name.endswith("_count"):
                count += s.value
        return HistogramSnapshot(tuple(sorted(per_le.items())), total, count)

    running, waiting = scalar("running"), scalar("waiting")
    if running is None or waiting is None:
        raise ScrapeError(f"not an engine metrics page: no {names['running'][0]} / {names['waiting'][0]} series")
    kv = scalar("kv_usage", reduce=max)
    models = frozenset(
        s.labels["model_name"] for f in families.values() for s in f.samples if "model_name" in s.labels
    )
    block_size = num_blocks = max_loras = None
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    if (cc := families.get(_INFO[0])) and cc.samples:
        labels = cc.samples[0].labels
        block_size = int(labels["block_size"]) if labels.get("block_size", "").isdigit() else None
        num_blocks = int(labels["num_gpu_blocks"]) if labels.get("num_gpu_blocks", "").isdigit() else None
    if (lr := families.get(_INFO[1])) and lr.samples:
        latest = max(lr.samples, key=lambda s: s.value)  # vLLM sets the value to the update timestamp
        split = lambda v: frozenset(x for x in v.split(",") if x)  # noqa: E731
        running_loras = split(latest.labels.get("running_lora_adapters", ""))
        waiting_loras = split(latest.labels.get("waiting_lora_adapters", ""))
        ml = latest.labels.get("max_lora", "")
        max_loras = int(ml) if ml.isdigit() else None
    counters = ("prompt_tokens_total", "generation_tokens_total", "requests_finished_total",
                "prefix_queries_total", "prefix_hits_total")  # fmt: skip
    kwargs = {k: scalar(k) or 0.0 for k in counters}
    return EngineStats(
        engine=engine,
        at=time.monotonic() if at is None else at,
        running=running,
        waiting=waiting,
        kv_usage=kv or 0.0,
        prefix_hit_rate_gauge=scalar("prefix_hit_rate_gauge", reduce=max),
        **kwargs,
        **{k: histogram(k) for k in _HISTOGRAMS},
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        models=models,
        running_loras=running_loras,
        waiting_loras=waiting_loras,
        max_loras=max_loras,
    )


async def fetch_page(session: aiohttp.ClientSession, url: str, timeout_s: float = 2.0) -> str:
    """GET ``url`` (a pod's /metrics) and return the page; every failure is a ScrapeError naming the URL."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                raise ScrapeError(f"{url}: HTTP {resp.status}")
            return await resp.text()
    except ScrapeError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ScrapeError(f"{url}: {type(exc).__name__}: {exc}") from exc


async def scrape(
    session: aiohttp.ClientSession, url: str, timeout_s: float = 2.0, light: bool = False
) -> EngineStats:
    """GET ``url`` (a pod's /metrics) and parse it; every failure is a ScrapeError naming the URL."""
    text = await fetch_page(session, url, timeout_s)
    try:
        return parse_metrics(text, light=light)
    except ScrapeError as exc:
        raise ScrapeError(f"{url}: {exc}") from exc

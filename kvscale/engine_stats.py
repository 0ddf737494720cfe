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

from kvscale.engines import EngineAdapter, Series, detect

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
        if self.count < older.count or len(self.buckets) != len(older.buckets):
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
    # the engine exports no request-length histograms (SGLang by default): the window's mean ISL/OSL come from
    # the token counters over the finished requests instead
    lengths_from_counters: bool = False
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
    mean_isl: float | None  # from the request prompt-length histogram (finished requests), else the counters
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
    prompt_tokens = _counter_delta(newer.prompt_tokens_total, older.prompt_tokens_total)
    generation_tokens = _counter_delta(newer.generation_tokens_total, older.generation_tokens_total)
    if newer.lengths_from_counters:  # no length histograms: tokens over the requests finished in the window
        mean_isl = prompt_tokens / finished if finished > 0 else None
        mean_osl = generation_tokens / finished if finished > 0 else None
    else:
        mean_isl = (newer.prompt_len - older.prompt_len).mean
        mean_osl = (newer.output_len - older.output_len).mean
    return EngineWindow(
        seconds=dt,
        arrival_rate=arrivals / dt,
        finish_rate=finished / dt,
        prompt_tokens_per_s=prompt_tokens / dt,
        generation_tokens_per_s=generation_tokens / dt,
        mean_isl=mean_isl,
        mean_osl=mean_osl,
        prefix_hit_rate=hit_rate,
        ttft=newer.ttft - older.ttft,
        itl=newer.itl - older.itl,
        running=newer.running,
        waiting=newer.waiting,
        kv_usage=newer.kv_usage,
    )


_HISTOGRAMS = ("ttft", "itl", "prompt_len", "output_len")
_COUNTERS = ("prompt_tokens_total", "generation_tokens_total", "requests_finished_total",
             "prefix_queries_total", "prefix_hits_total")  # fmt: skip
_LIGHT = {"running", "waiting", "kv_usage"}


def _chosen(text: str, adapter: EngineAdapter, light: bool) -> dict[str, Series | None]:
    """Per quantity, the first of its series that the page exports (None: the page has none of them)."""
    return {key: q.first_on_page(text) for key, q in adapter.quantities.items() if not (light and key not in _LIGHT)}


def _keep_prefixes(adapter: EngineAdapter, chosen: dict[str, Series | None]) -> tuple[str, ...]:
    """Line prefixes worth parsing: per quantity, the series of the first of its names that the page has (a vLLM
    page exports both the new and the deprecated ITL histogram) and their ``# TYPE`` line, plus the info series.
    Exact names: ``vllm:prompt_tokens`` must not also pull in ``vllm:prompt_tokens_cached_by_source_total``."""
    info = [n for n in (adapter.cache_config_info, adapter.lora_info) if n]
    keep: list[str] = [f"{n}{{" for n in info] + [f"# TYPE {n} " for n in info]
    for key, series in chosen.items():
        q = adapter[key]
        s = series or q.series[0]
        if s.kind == "histogram" and not s.part:
            ends = ("_sum", "_count") if q.mean_only else ("_bucket", "_sum", "_count")
            names = [s.name + e for e in ends]
        else:  # a gauge, a counter (prometheus_client exposes name_total) or one part of a histogram
            names = [s.sample]
        keep += [n + e for n in names for e in ("{", " ")] + [f"# TYPE {n} " for n in s.type_names]
    return tuple(keep)


def parse_metrics(text: str, at: float | None = None, light: bool = False) -> EngineStats:
    """Parse a Prometheus text page from vLLM or SGLang into :class:`EngineStats` (names: :mod:`kvscale.engines`).

    ``light`` reads only the load gauges (running, waiting, KV usage) and the info series: what a router needs
    every few hundred milliseconds, at a fraction of the cost. Counters and histograms are then left empty.

    Raises ScrapeError when the page is not an engine's metrics (no running/waiting series), so a wrong URL or a
    proxy's error page is never mistaken for an idle engine.
    """
    adapter = detect(text)
    chosen = _chosen(text, adapter, light)
    # Cheap pre-filter: the library parser is pure Python (~30 us a sample) and a vLLM page is mostly series we
    # never read (other histograms, buckets of the length histograms).
    keep = _keep_prefixes(adapter, chosen)
    lines = [ln for ln in text.splitlines() if ln.startswith(keep)]
    try:
        families = list(text_string_to_metric_families("\n".join(lines) + "\n"))
    except Exception as exc:  # the library raises ValueError/TypeError/IndexError on malformed pages
        raise ScrapeError(f"malformed metrics page: {exc}") from exc
    samples: dict[str, list] = {}
    for f in families:
        for smp in f.samples:
            samples.setdefault(smp.name, []).append(smp)

    def series_of(key: str) -> Series | None:
        """The series read for ``key`` (None: not read, or not on the page): the chosen one; on a page without
        ``# TYPE`` lines, the first name if it has samples."""
        if key not in chosen:
            return None
        s = chosen[key] or adapter[key].series[0]
        return s if chosen[key] is not None or s.sample in samples else None

    def scalar(key: str) -> float | None:
        s = series_of(key)
        values = [x.value for x in samples.get(s.sample, ())] if s else []
        if not all(math.isfinite(v) for v in values):  # a NaN gauge is broken, not idle
            raise ScrapeError(f"implausible {s.sample}: {next(v for v in values if not math.isfinite(v))}")
        if not values:
            return None
        return float(max(values) if adapter[key].reduce == "max" else sum(values))

    def histogram(key: str) -> HistogramSnapshot:
        s = series_of(key)
        if s is None:
            return HistogramSnapshot()
        per_le: dict[float, float] = {}
        for x in samples.get(s.name + "_bucket", ()):
            le = float(x.labels["le"])
            per_le[le] = per_le.get(le, 0.0) + x.value
        total = sum(x.value for x in samples.get(s.name + "_sum", ()))
        count = sum(x.value for x in samples.get(s.name + "_count", ()))
        return HistogramSnapshot(tuple(sorted(per_le.items())), total, count)

    running, waiting = scalar("running"), scalar("waiting")
    if running is None or waiting is None:
        run, wait = adapter["running"].series[0].sample, adapter["waiting"].series[0].sample
        raise ScrapeError(f"not an engine metrics page: no {run} / {wait} series")
    kv = scalar("kv_usage")
    models = frozenset(x.labels["model_name"] for xs in samples.values() for x in xs if "model_name" in x.labels)
    block_size = num_blocks = max_loras = None
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    if adapter.cache_config_info and (cc := samples.get(adapter.cache_config_info)):
        labels = cc[0].labels
        block_size = int(labels["block_size"]) if labels.get("block_size", "").isdigit() else None
        num_blocks = int(labels["num_gpu_blocks"]) if labels.get("num_gpu_blocks", "").isdigit() else None
    if adapter.lora_info and (lr := samples.get(adapter.lora_info)):
        latest = max(lr, key=lambda x: x.value)  # vLLM sets the value to the update timestamp
        split = lambda v: frozenset(x for x in v.split(",") if x)  # noqa: E731
        running_loras = split(latest.labels.get("running_lora_adapters", ""))
        waiting_loras = split(latest.labels.get("waiting_lora_adapters", ""))
        ml = latest.labels.get("max_lora", "")
        max_loras = int(ml) if ml.isdigit() else None
    counters = {k: scalar(k) or 0.0 for k in _COUNTERS}
    _check_plausible(adapter.engine, running, waiting, kv, counters)
    if series_of("prefix_hits_total") is None:
        # A hit rate from counters needs the hits counter: without it (SGLang before cached_tokens_total) the
        # queried tokens alone would read as a 0 % hit rate; the hit-rate gauge stands in.
        counters["prefix_queries_total"] = counters["prefix_hits_total"] = 0.0
    return EngineStats(
        engine=adapter.engine,
        at=time.monotonic() if at is None else at,
        running=running,
        waiting=waiting,
        kv_usage=kv or 0.0,
        prefix_hit_rate_gauge=scalar("prefix_hit_rate_gauge"),
        **counters,
        **{k: histogram(k) for k in _HISTOGRAMS},
        lengths_from_counters=not light and series_of("prompt_len") is None,
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        models=models,
        running_loras=running_loras,
        waiting_loras=waiting_loras,
        max_loras=max_loras,
    )


MAX_PLAUSIBLE_REQUESTS = 1e6  # running or waiting on one engine: beyond this a gauge is broken, not busy


def _check_plausible(engine: str, running: float, waiting: float, kv: float | None, counters: dict[str, float]) -> None:
    """Refuse values no healthy engine reports (a KV usage of 100 exported as percent, 1e12 waiting requests,
    negative gauges or counters): the read fails (a ScrapeError), so a broken exporter never drives a decision."""
    for name, v in (("running", running), ("waiting", waiting)):
        if not 0 <= v <= MAX_PLAUSIBLE_REQUESTS:
            raise ScrapeError(f"implausible {engine} {name} requests: {v:g} (expected 0 to {MAX_PLAUSIBLE_REQUESTS:g})")
    if kv is not None and not 0 <= kv <= 1.0 + 1e-6:
        raise ScrapeError(f"implausible {engine} KV-cache usage {kv:g}: expected a fraction in [0, 1] (percent?)")
    for name, v in counters.items():
        if v < 0:
            raise ScrapeError(f"implausible {engine} counter {name}: {v:g} (counters are >= 0)")


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

"""Prometheus metrics of a simulated engine, with vLLM's (default) or SGLang's names, types and label keys.

vLLM 0.32 names (``vllm/v1/metrics/loggers.py``), labels ``model_name`` and ``engine``; counters carry ``_total``;
histogram buckets copied from ``vllm/v1/metrics/buckets.py``. Engine state (running, waiting, KV usage, prefix
cache, preemptions, token counters) is read from the engine core at scrape time; request latencies are observed
when requests finish. :class:`ReplicaCounters` is the request-counter part alone, without a registry, for the
replicas of a virtual-clock cluster (the scaling evaluator reads them as engine stats).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvscale.engine_stats import HistogramSnapshot
from simulator.engine import EngineCore
from simulator.request import Request

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FLAVORS = ("vllm", "sglang")


def request_tokens_buckets(max_model_len: int) -> list[float]:
    """vLLM's 1-2-5 buckets up to max_model_len."""
    out: list[float] = []
    e = 1
    while True:
        for m in (1, 2, 5):
            v = m * e
            if v > max_model_len:
                return out
            out.append(float(v))
        e *= 10


@dataclass(frozen=True)
class MetricsInfo:
    model_name: str
    block_size: int
    num_gpu_blocks: int
    enable_prefix_caching: bool
    max_loras: int = 0


def _families(
    cls: type[GaugeMetricFamily] | type[CounterMetricFamily],
    labels: list[str],
    values: list[str],
    rows: tuple[tuple[str, str, float], ...],
) -> Iterator[Metric]:
    """One single-sample family per (name, documentation, value) row."""
    for name, doc, v in rows:
        fam = cls(name, doc, labels=labels)
        fam.add_metric(values, float(v))
        yield fam


class _EngineStateCollector(Collector):
    def __init__(self, engine: EngineCore, info: MetricsInfo, flavor: str, running_loras: dict[str, int]) -> None:
        self.engine = engine
        self.info = info
        self.flavor = flavor
        self.running_loras = running_loras

    def collect(self) -> Iterator[Metric]:
        e, info = self.engine, self.info
        if self.flavor == "sglang":
            labels, values = ["model_name"], [info.model_name]
            used_tokens = (e.kv.num_blocks - e.kv.num_free_blocks) * e.kv.block_size
            hit_rate = e.kv.prefix_hits / e.kv.prefix_queries if e.kv.prefix_queries else 0.0
            yield from _families(GaugeMetricFamily, labels, values, (
                ("sglang:num_running_reqs", "The number of running requests.", e.num_running),
                ("sglang:num_queue_reqs", "The number of requests in the waiting queue.", e.num_waiting),
                ("sglang:token_usage", "The token usage.", e.kv.usage),
                ("sglang:cache_hit_rate", "The prefix cache hit rate.", hit_rate),
                ("sglang:num_used_tokens", "The number of used tokens.", used_tokens),
            ))  # fmt: skip
            yield from _families(CounterMetricFamily, labels, values, (
                ("sglang:prompt_tokens", "Number of prefill tokens processed.", e.prompt_tokens_total),
                ("sglang:generation_tokens", "Number of generation tokens processed.", e.generation_tokens_total),
                ("sglang:num_retracted_reqs", "Number of retracted (preempted) requests.", e.scheduler.num_preemptions),
            ))  # fmt: skip
            return
        labels, values = ["model_name", "engine"], [info.model_name, "0"]
        yield from _families(GaugeMetricFamily, labels, values, (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", e.num_running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", e.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", e.kv.usage),
        ))  # fmt: skip
        yield from _families(CounterMetricFamily, labels, values, (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             e.kv.prefix_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", e.kv.prefix_hits),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", e.scheduler.num_preemptions),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", e.prompt_tokens_total),
            ("vllm:generation_tokens", "Number of generation tokens processed.", e.generation_tokens_total),
        ))  # fmt: skip
        cache = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["block_size", "enable_prefix_caching", "engine", "num_gpu_blocks", "prefix_caching_hash_algo"],
        )
        cache.add_metric(
            [str(info.block_size), str(info.enable_prefix_caching), "0", str(info.num_gpu_blocks), "xxh3_64"], 1.0
        )
        yield cache
        if info.max_loras:
            lora = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            )
            running = ",".join(sorted(n for n, c in self.running_loras.items() if c > 0))
            lora.add_metric([str(info.max_loras), "", running], 1.0)
            yield lora


class EngineMetrics:
    """A registry per server (never the global one), so several simulated pods can share a process."""

    def __init__(self, engine: EngineCore, info: MetricsInfo, flavor: str = "vllm", max_model_len: int = 8192) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"metrics flavor must be one of {FLAVORS}, got {flavor!r}")
        self.flavor = flavor
        self.registry = CollectorRegistry(auto_describe=True)
        self.running_loras: dict[str, int] = {}
        self.registry.register(_EngineStateCollector(engine, info, flavor, self.running_loras))
        p = "sglang" if flavor == "sglang" else "vllm"
        labels = ["model_name"] if flavor == "sglang" else ["model_name", "engine"]
        self._lv = [info.model_name] if flavor == "sglang" else [info.model_name, "0"]
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...] | list[float]) -> Histogram:
            return Histogram(f"{p}:{name}", doc, labels, buckets=buckets, registry=r).labels(*self._lv)

        self.ttft = hist("time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = hist(
            "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        tok_buckets = request_tokens_buckets(max_model_len)
        if flavor == "vllm":
            self.tpot = hist(
                "request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                ITL_BUCKETS,
            )
            self.queue = hist(
                "request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                REQUEST_LATENCY_BUCKETS,
            )
            self.prompt_tokens = hist("request_prompt_tokens", "Number of prefill tokens processed.", tok_buckets)
            self.gen_tokens = hist("request_generation_tokens", "Number of generation tokens processed.", tok_buckets)
            self.success = Counter(
                "vllm:request_success",
                "Count of successfully processed requests.",
                [*labels, "finished_reason"],
                registry=r,
            )

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_first_token(self, req: Request) -> None:
        """Like vLLM, TTFT is observed when the first token is out, not when the request finishes."""
        self.ttft.observe(req.first_token_time - req.arrival_time)

    def observe_finished(self, req: Request) -> None:
        self.e2e.observe(req.finish_time - req.arrival_time)
        if self.flavor != "vllm":
            return
        n = req.num_output_tokens
        if n > 1:
            self.tpot.observe((req.last_token_time - req.first_token_time) / (n - 1))
        if req.first_scheduled_time >= 0:
            self.queue.observe(req.first_scheduled_time - req.arrival_time)
        self.prompt_tokens.observe(req.num_prompt_tokens)
        self.gen_tokens.observe(n)
        self.success.labels(*self._lv, req.finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WeightedHistogram:
    """A cumulative Prometheus-style histogram (vLLM's bucket bounds) with weighted observations, no registry."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] | list[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0.0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0.0

    def observe(self, v: float, weight: float = 1.0) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += weight
        self.sum += v * weight
        self.count += weight

    def snapshot(self) -> HistogramSnapshot:
        cum = np.cumsum(self.counts)
        les = [*self.bounds, math.inf]
        return HistogramSnapshot(tuple(zip(les, cum.tolist(), strict=True)), self.sum, self.count)


class ReplicaCounters:
    """The request counters a real engine's /metrics would show for one simulated replica, without
    ``prometheus_client``: finished requests and the TTFT, ITL, prompt- and output-length histograms, fed from
    finished requests (:meth:`on_finish`) and read as :class:`~kvscale.engine_stats.HistogramSnapshot`.

    For a virtual-clock cluster, where no engine serves a metrics page (:class:`EngineMetrics` is the registry of
    a served engine). The cluster keeps no per-token gaps, so a request's inter-token gaps count at their mean.
    """

    __slots__ = ("finished", "isl", "itl", "osl", "ttft")

    def __init__(self, token_buckets: list[float]) -> None:
        self.finished = 0
        self.ttft = WeightedHistogram(TTFT_BUCKETS)
        self.itl = WeightedHistogram(ITL_BUCKETS)
        self.isl = WeightedHistogram(token_buckets)
        self.osl = WeightedHistogram(token_buckets)

    def on_finish(self, req: Request) -> None:
        self.finished += 1
        if req.first_token_time >= 0:
            self.ttft.observe(req.first_token_time - req.arrival_time)
        n = req.num_output_tokens
        if n > 1:  # each inter-token gap of the request, at its mean (the cluster does not keep every gap)
            self.itl.observe((req.last_token_time - req.first_token_time) / (n - 1), n - 1)
        self.isl.observe(req.num_prompt_tokens)
        self.osl.observe(n)

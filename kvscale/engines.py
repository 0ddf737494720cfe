"""Engine adapters: per inference engine (vLLM, SGLang), one table of the metrics behind each quantity.

Both readers of an engine's metrics are built from these tables: the pod scrape
(:func:`kvscale.engine_stats.parse_metrics`, a pod's ``/metrics`` page) and the scaler's PromQL
(``scaler.signals.PrometheusSource``, the same quantities from a Prometheus that scrapes the pods). A quantity names
its series in preference order (newer names first, deprecated ones after: vLLM's ``vllm:gpu_cache_usage_perc``); the
first one a page (or, in PromQL, a pod's label set, joined with ``or``) exports wins. Counters are named as in
``# TYPE`` without the ``_total`` that the exposition appends (``vllm:prompt_tokens`` → ``vllm:prompt_tokens_total``).

Quantities (keys of :attr:`EngineAdapter.quantities`; an engine lacks those it does not export):

* gauges: ``running`` (requests in the running batch), ``waiting`` (queued in the engine), ``kv_usage`` (KV-cache
  usage 0..1, the max over a pod's label sets), ``prefix_hit_rate_gauge`` (a hit-rate gauge 0..1, read only where
  the prefix counters are not exported);
* counters: ``prompt_tokens_total``, ``generation_tokens_total``, ``requests_finished_total``,
  ``prefix_queries_total`` (prompt tokens looked up in the prefix cache) and ``prefix_hits_total`` (of which cached);
* histograms: ``ttft`` and ``itl`` (seconds), ``prompt_len`` and ``output_len`` (tokens per finished request: only
  their mean is read, so their buckets are skipped).

SGLang (``sglang/srt/metrics/collector.py``) differs from vLLM in what it means, not only in names:

* its token and request counters (``sglang:prompt_tokens_total``, ``sglang:generation_tokens_total``,
  ``sglang:cached_tokens_total``, ``sglang:num_requests_total``) count *finished* requests, all at once when a
  request finishes, and their series appear only with the first finished request (:attr:`Quantity.lazy`: a missing
  series means zero, not a missing target);
* ``sglang:cache_hit_rate`` is a gauge: the hit rate of the *last prefill batch* (older SGLang: since start), not a
  rate over any window. The prefix hit rate is therefore read from the counters (cached ÷ prompt tokens of the
  requests finished in the window) where the engine exports ``sglang:cached_tokens_total``; the gauge (averaged over
  the window in PromQL) only stands in where it does not;
* it exports no request-length histograms unless started with ``--collect-tokens-histogram``
  (``sglang:prompt_tokens_histogram``); without them the mean ISL/OSL over a window is the token counters' increase
  over the finished requests' (exact for SGLang, whose counters move when a request finishes);
* finished requests: ``sglang:num_requests_total``, else the count of the end-to-end latency histogram (observed
  once per finished request too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ADAPTERS",
    "SGLANG",
    "VLLM",
    "EngineAdapter",
    "Quantity",
    "Series",
    "detect",
    "promql",
]

Kind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class Series:
    """One metric an engine exports: ``name`` as in its ``# TYPE`` line (a counter without ``_total``), its kind,
    and for a histogram read as a counter, the part read (``"_count"``)."""

    name: str
    kind: Kind
    part: str = ""

    @property
    def sample(self) -> str:
        """The exposition sample name a gauge or counter value is read from."""
        if self.kind == "counter":
            return self.name + "_total"
        return self.name + self.part

    @property
    def type_names(self) -> tuple[str, ...]:
        """Names its ``# TYPE`` line may carry (prometheus_client writes a counter's with ``_total``)."""
        return (self.name, self.name + "_total") if self.kind == "counter" else (self.name,)

    def on_page(self, text: str) -> bool:
        """Whether a metrics page exports this metric (has its ``# TYPE`` line; a labelled metric may have none
        of its series yet)."""
        return any(f"# TYPE {n} " in text for n in self.type_names)


def gauge(name: str) -> Series:
    return Series(name, "gauge")


def counter(name: str) -> Series:
    return Series(name, "counter")


def histogram(name: str) -> Series:
    return Series(name, "histogram")


def histogram_count(name: str) -> Series:
    """A histogram's ``_count``, read as a counter of the observations (e.g. finished requests)."""
    return Series(name, "histogram", "_count")


@dataclass(frozen=True)
class Quantity:
    """What a reader wants (``key``) and where an engine exports it (``series``, preferred first)."""

    key: str
    kind: Kind
    series: tuple[Series, ...]
    meaning: str
    reduce: Literal["sum", "max"] = "sum"  # how one pod's label sets (engines, model names) combine
    mean_only: bool = False  # a histogram read for its mean: _sum and _count, its buckets skipped
    lazy: bool = False  # series appear with the first observation: a missing series is zero, not a missing target

    def first_on_page(self, text: str) -> Series | None:
        """The first of the series that ``text`` exports, or None."""
        return next((s for s in self.series if s.on_page(text)), None)


def _q(key: str, kind: Kind, series: Series | tuple[Series, ...], meaning: str, **kw) -> tuple[str, Quantity]:
    return key, Quantity(key, kind, series if isinstance(series, tuple) else (series,), meaning, **kw)


@dataclass(frozen=True)
class EngineAdapter:
    """One engine's metric table (see the module docstring)."""

    engine: str
    quantities: Mapping[str, Quantity]
    cache_config_info: str | None = None  # info series with block_size / num_gpu_blocks labels
    lora_info: str | None = None  # info series with running/waiting LoRA adapters

    def __getitem__(self, key: str) -> Quantity:
        return self.quantities[key]

    def get(self, key: str) -> Quantity | None:
        return self.quantities.get(key)

    @property
    def running(self) -> Quantity:
        """The series whose presence says "this engine": every engine exports its running-requests gauge."""
        return self.quantities["running"]


VLLM = EngineAdapter(
    "vllm",
    dict([
        _q("running", "gauge", gauge("vllm:num_requests_running"), "requests in model execution batches"),
        _q("waiting", "gauge", gauge("vllm:num_requests_waiting"), "requests waiting to be scheduled"),
        _q("kv_usage", "gauge", (gauge("vllm:kv_cache_usage_perc"), gauge("vllm:gpu_cache_usage_perc")),
           "KV-cache usage, 0..1", reduce="max"),
        _q("prompt_tokens_total", "counter", counter("vllm:prompt_tokens"), "prefill tokens processed"),
        _q("generation_tokens_total", "counter", counter("vllm:generation_tokens"), "generation tokens processed"),
        _q("requests_finished_total", "counter", counter("vllm:request_success"), "finished requests"),
        _q("prefix_queries_total", "counter",
           (counter("vllm:prefix_cache_queries"), counter("vllm:gpu_prefix_cache_queries")),
           "prefix-cache queries, in tokens"),
        _q("prefix_hits_total", "counter",
           (counter("vllm:prefix_cache_hits"), counter("vllm:gpu_prefix_cache_hits")),
           "prefix-cache hits, in tokens"),
        _q("ttft", "histogram", histogram("vllm:time_to_first_token_seconds"), "time to first token (s)"),
        _q("itl", "histogram",
           (histogram("vllm:inter_token_latency_seconds"), histogram("vllm:time_per_output_token_seconds")),
           "inter-token latency (s)"),
        _q("prompt_len", "histogram", histogram("vllm:request_prompt_tokens"), "prompt tokens per finished request",
           mean_only=True),
        _q("output_len", "histogram", histogram("vllm:request_generation_tokens"),
           "generated tokens per finished request", mean_only=True),
    ]),
    cache_config_info="vllm:cache_config_info",
    lora_info="vllm:lora_requests_info",
)  # fmt: skip

SGLANG = EngineAdapter(
    "sglang",
    dict([
        _q("running", "gauge", gauge("sglang:num_running_reqs"), "requests in the running batch"),
        _q("waiting", "gauge", gauge("sglang:num_queue_reqs"), "requests in the waiting queue"),
        _q("kv_usage", "gauge", gauge("sglang:token_usage"), "KV token usage, 0..1", reduce="max"),
        _q("prompt_tokens_total", "counter", counter("sglang:prompt_tokens"),
           "prompt tokens of finished requests (cached ones included)", lazy=True),
        _q("generation_tokens_total", "counter", counter("sglang:generation_tokens"),
           "generated tokens of finished requests", lazy=True),
        _q("requests_finished_total", "counter",
           (counter("sglang:num_requests"), histogram_count("sglang:e2e_request_latency_seconds")),
           "finished requests", lazy=True),
        _q("prefix_queries_total", "counter", counter("sglang:prompt_tokens"),
           "prompt tokens of finished requests: what the prefix cache was asked for", lazy=True),
        _q("prefix_hits_total", "counter", counter("sglang:cached_tokens"),
           "of which were cached", lazy=True),
        _q("prefix_hit_rate_gauge", "gauge", gauge("sglang:cache_hit_rate"),
           "hit rate of the last prefill batch, 0..1", reduce="max"),
        _q("ttft", "histogram", histogram("sglang:time_to_first_token_seconds"), "time to first token (s)"),
        _q("itl", "histogram",
           (histogram("sglang:inter_token_latency_seconds"), histogram("sglang:time_per_output_token_seconds")),
           "inter-token latency (s)"),
        _q("prompt_len", "histogram", histogram("sglang:prompt_tokens_histogram"),
           "prompt tokens per finished request (--collect-tokens-histogram only)", mean_only=True),
        _q("output_len", "histogram", histogram("sglang:generation_tokens_histogram"),
           "generated tokens per finished request (--collect-tokens-histogram only)", mean_only=True),
    ]),
)  # fmt: skip

ADAPTERS: dict[str, EngineAdapter] = {a.engine: a for a in (VLLM, SGLANG)}


def detect(text: str) -> EngineAdapter:
    """The engine whose running-requests series a metrics page carries (vLLM when none does: its names then
    appear in the "not an engine metrics page" error)."""
    for adapter in ADAPTERS.values():
        if any(s.sample in text for s in adapter.running.series):
            return adapter
    return VLLM


def promql(q: Quantity, selector: str, *, fn: str | None = None, window: str | None = None, part: str = "") -> str:
    """The instant vector of quantity ``q`` for the pods ``selector`` picks (``{a="b",...}``).

    Each series is one term, preferred first, joined with ``or``: PromQL's ``or`` keeps a right-hand element only
    where no left-hand one has the same labels (the metric name aside), so a pod exporting a new and a deprecated
    name is counted once, by the new one. ``fn`` wraps every term in a range function (``rate``, ``increase``,
    ``deriv``, ``avg_over_time``) over ``window``; ``part`` picks a histogram's ``_bucket``/``_sum``/``_count``.
    """
    if fn is not None and window is None:
        raise ValueError(f"{fn}() needs a window")
    terms = []
    for s in q.series:
        vector = f"{s.name + part if part else s.sample}{selector}"
        terms.append(f"{fn}({vector}[{window}])" if fn else vector)
    return " or ".join(terms)

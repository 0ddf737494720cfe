"""Engine adapters (kvscale.engines): one table per engine, read by the pod scrape (parse_metrics + window) and by
the scaler's PromQL (PrometheusSource), with SGLang's meanings (finished-request counters, a hit-rate gauge, no
request-length histograms by default)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvscale.engine_stats import HistogramSnapshot, parse_metrics, window
from kvscale.engines import ADAPTERS, SGLANG, VLLM, detect, promql
from scaler.metadata import ScalerSettings
from scaler.signals import PrometheusSource, SignalError

VLLM_PAGE = Path(__file__).parents[1] / "data" / "vllm_reference" / "metrics.txt"  # recorded from real vLLM (CPU)
M = "sim-model"


# -- the tables ----------------------------------------------------------------------------------------------------
def test_every_engine_has_the_quantities_a_decision_needs():
    for a in ADAPTERS.values():
        for key in ("running", "waiting", "kv_usage", "prompt_tokens_total", "generation_tokens_total",
                    "requests_finished_total", "ttft", "itl"):  # fmt: skip
            assert key in a.quantities, (a.engine, key)
        for q in a.quantities.values():
            assert q.series and all(s.name.startswith(a.engine + ":") for s in q.series), q
            if q.kind == "counter":  # counters are read from name_total (or a histogram's _count)
                assert all(s.sample.endswith(("_total", "_count")) for s in q.series), q
            if q.kind == "gauge":
                assert all(s.sample == s.name for s in q.series), q


def test_preference_order_and_meanings():
    assert [s.name for s in VLLM["kv_usage"].series] == ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]
    assert VLLM["prompt_tokens_total"].series[0].sample == "vllm:prompt_tokens_total"
    # SGLang: a hit-rate gauge, finished-request counters that appear lazily, finished requests also as the
    # end-to-end latency histogram's count
    assert SGLANG["prefix_hit_rate_gauge"].kind == "gauge" and "prefix_hit_rate_gauge" not in VLLM.quantities
    assert SGLANG["prefix_hits_total"].series[0].sample == "sglang:cached_tokens_total"
    assert [s.sample for s in SGLANG["requests_finished_total"].series] == [
        "sglang:num_requests_total", "sglang:e2e_request_latency_seconds_count"]  # fmt: skip
    assert SGLANG["requests_finished_total"].lazy and not VLLM["requests_finished_total"].lazy


def test_detect_by_the_running_series():
    assert detect(VLLM_PAGE.read_text()) is VLLM
    assert detect(_sglang_page()) is SGLANG
    assert detect("<html>502</html>") is VLLM  # the error then names vLLM's series


def test_promql_joins_the_names_with_or_preferred_first():
    sel = '{model_name="m"}'
    assert promql(VLLM["running"], sel) == 'vllm:num_requests_running{model_name="m"}'
    assert promql(VLLM["kv_usage"], sel) == (
        'vllm:kv_cache_usage_perc{model_name="m"} or vllm:gpu_cache_usage_perc{model_name="m"}')  # fmt: skip
    assert promql(SGLANG["requests_finished_total"], sel, fn="rate", window="10s") == (
        'rate(sglang:num_requests_total{model_name="m"}[10s])'
        ' or rate(sglang:e2e_request_latency_seconds_count{model_name="m"}[10s])')  # fmt: skip
    assert promql(VLLM["ttft"], sel, fn="increase", window="5s", part="_bucket") == (
        'increase(vllm:time_to_first_token_seconds_bucket{model_name="m"}[5s])')  # fmt: skip
    with pytest.raises(ValueError):
        promql(VLLM["running"], sel, fn="rate")


def _source() -> PrometheusSource:
    s = ScalerSettings(pool="aggregated", model=M, metrics_source="prometheus", prometheus_url="http://127.0.0.1:1",
                       prometheus_selector='job="vllm"', latency_window_s=10.0)  # fmt: skip
    return PrometheusSource(s, clock=lambda: 100.0)


def test_prometheus_queries_are_built_from_the_adapter():
    src = _source()
    v, g = src.queries("vllm"), src.queries("sglang")
    sel = '{model_name="sim-model",job="vllm"}'
    # vLLM: the queries written out by hand before the adapter (single-name quantities read the same)
    assert v["replicas"] == f"count(vllm:num_requests_running{sel})"
    assert v["finish_rate"] == f"sum(rate(vllm:request_success_total{sel}[10s]))"
    assert v["isl_sum"] == f"sum(rate(vllm:request_prompt_tokens_sum{sel}[10s]))"
    assert v["ttft_buckets"] == f"sum by (le) (increase(vllm:time_to_first_token_seconds_bucket{sel}[10s]))"
    assert v["kv_usage"] == f"avg(vllm:kv_cache_usage_perc{sel} or vllm:gpu_cache_usage_perc{sel})"
    assert "prefix_hit_rate_gauge" not in v
    # SGLang: its own names only, the gauge averaged over the window
    assert not any("vllm:" in q for q in g.values()), g
    assert g["replicas"] == f"count(sglang:num_running_reqs{sel})"
    assert g["waiting"] == f"sum(sglang:num_queue_reqs{sel})"
    assert g["prefix_hits"] == f"sum(rate(sglang:cached_tokens_total{sel}[10s]))"
    assert g["prefix_hit_rate_gauge"] == f"avg(avg_over_time(sglang:cache_hit_rate{sel}[10s]))"
    assert set(v) <= set(g) | {"prefix_hit_rate_gauge"}
    assert src.queries() == v  # before detection: vLLM's


# -- the pod scrape ------------------------------------------------------------------------------------------------
def _sglang_page(finished: int = 0, prompt: int = 0, generated: int = 0, cached: int | None = 0,
                 hit_gauge: float = 0.25, running: float = 3, queued: float = 1) -> str:  # fmt: skip
    """A page with real SGLang's names and types (sglang/srt/metrics/collector.py): tokenizer counters created
    on the first finished request; ``cached=None``: an SGLang without ``sglang:cached_tokens_total``."""
    r = CollectorRegistry()
    lab = ["model_name"]
    Gauge("sglang:num_running_reqs", "", lab, registry=r).labels(M).set(running)
    Gauge("sglang:num_queue_reqs", "", lab, registry=r).labels(M).set(queued)
    Gauge("sglang:token_usage", "", lab, registry=r).labels(M).set(0.4)
    Gauge("sglang:cache_hit_rate", "", lab, registry=r).labels(M).set(hit_gauge)
    counters = {"sglang:prompt_tokens": prompt, "sglang:generation_tokens": generated, "sglang:num_requests": finished}
    if cached is not None:
        counters["sglang:cached_tokens"] = cached
    for name, value in counters.items():
        c = Counter(name, "", lab, registry=r)
        if finished:
            c.labels(M).inc(value)
    ttft = Histogram("sglang:time_to_first_token_seconds", "", lab, buckets=(0.1, 0.5, 1.0), registry=r)
    e2e = Histogram("sglang:e2e_request_latency_seconds", "", lab, buckets=(1.0, 10.0), registry=r)
    for _ in range(finished):
        ttft.labels(M).observe(0.2)
        e2e.labels(M).observe(2.0)
    return generate_latest(r).decode()


def test_parse_an_sglang_page():
    st = parse_metrics(_sglang_page(finished=10, prompt=400, generated=80, cached=100), at=5.0)
    assert st.engine == "sglang" and (st.running, st.waiting, st.kv_usage) == (3, 1, 0.4)
    assert (st.requests_finished_total, st.prompt_tokens_total, st.generation_tokens_total) == (10, 400, 80)
    assert (st.prefix_queries_total, st.prefix_hits_total, st.prefix_hit_rate_gauge) == (400, 100, 0.25)
    assert st.ttft.count == 10 and len(st.ttft.buckets) == 4 and st.models == {M}
    assert st.lengths_from_counters and st.prompt_len.count == 0
    light = parse_metrics(_sglang_page(finished=10, prompt=400), light=True)
    assert light.running == 3 and light.requests_finished_total == 0 and not light.lengths_from_counters
    # before the first finished request the counters have no series: zeros, not an error
    fresh = parse_metrics(_sglang_page(), at=1.0)
    assert fresh.requests_finished_total == 0 and fresh.prompt_tokens_total == 0


def test_sglang_window_sizes_from_the_counters_and_hit_rate_from_cached_tokens():
    a = parse_metrics(_sglang_page(finished=10, prompt=400, generated=80, cached=100), at=5.0)
    b = parse_metrics(_sglang_page(finished=30, prompt=1400, generated=280, cached=600), at=10.0)
    w = window(a, b)
    assert w.finish_rate == pytest.approx(4.0)
    assert w.mean_isl == pytest.approx(50.0) and w.mean_osl == pytest.approx(10.0)  # 1000 / 20, 200 / 20
    assert w.prefix_hit_rate == pytest.approx(0.5)  # 500 cached of 1000 prompt tokens (not the 0.25 gauge)
    idle = window(b, parse_metrics(_sglang_page(finished=30, prompt=1400, generated=280, cached=600), at=15.0))
    assert idle.mean_isl is None and idle.mean_osl is None  # nothing finished: sizes unknown, not 0
    # an SGLang without cached_tokens_total: the hit-rate gauge, never a 0 % read from prompt tokens alone
    c = parse_metrics(_sglang_page(finished=10, prompt=400, cached=None, hit_gauge=0.3), at=5.0)
    d = parse_metrics(_sglang_page(finished=20, prompt=800, cached=None, hit_gauge=0.3), at=10.0)
    assert c.prefix_queries_total == 0 and window(c, d).prefix_hit_rate == pytest.approx(0.3)


def test_sglang_finished_requests_from_the_latency_histogram_when_no_counter():
    """The simulator's SGLang flavour has no sglang:num_requests_total: the e2e histogram's count stands in."""
    lines = r"^(# (HELP|TYPE) )?sglang:num_requests_(total|created)[ {].*\n"
    page = re.sub(lines, "", _sglang_page(finished=7, prompt=70), flags=re.M)
    assert "num_requests" not in page
    assert parse_metrics(page).requests_finished_total == 7


def test_vllm_sizes_still_from_the_histograms_over_the_window():
    text = VLLM_PAGE.read_text()
    a = parse_metrics(text, at=1.0)
    assert not a.lengths_from_counters and a.prompt_len.count > 0 and not a.prompt_len.buckets
    more = HistogramSnapshot((), a.prompt_len.sum + 300.0, a.prompt_len.count + 3)
    b = replace(a, at=2.0, prompt_len=more, requests_finished_total=a.requests_finished_total + 3)
    assert window(a, b).mean_isl == pytest.approx(100.0)  # the window's 3 requests, not the pod's lifetime mean
    assert window(a, b).mean_osl is None  # no output-length observations in the window


def test_deprecated_vllm_names():
    page = "\n".join([
        "# TYPE vllm:num_requests_running gauge", 'vllm:num_requests_running{model_name="m"} 2.0',
        "# TYPE vllm:num_requests_waiting gauge", 'vllm:num_requests_waiting{model_name="m"} 1.0',
        "# TYPE vllm:gpu_cache_usage_perc gauge", 'vllm:gpu_cache_usage_perc{model_name="m"} 0.7',
        "# TYPE vllm:gpu_prefix_cache_queries_total counter", 'vllm:gpu_prefix_cache_queries_total{model_name="m"} 50',
        "# TYPE vllm:gpu_prefix_cache_hits_total counter", 'vllm:gpu_prefix_cache_hits_total{model_name="m"} 20',
        "# TYPE vllm:time_per_output_token_seconds histogram",
        'vllm:time_per_output_token_seconds_bucket{le="0.1",model_name="m"} 4',
        'vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="m"} 5',
        'vllm:time_per_output_token_seconds_sum{model_name="m"} 0.5',
        'vllm:time_per_output_token_seconds_count{model_name="m"} 5', "",
    ])  # fmt: skip
    st = parse_metrics(page)
    assert st.kv_usage == 0.7 and (st.prefix_queries_total, st.prefix_hits_total) == (50, 20)
    assert st.itl.count == 5 and st.itl.buckets[-1] == (float("inf"), 5)


# -- Prometheus mode: the engine found per pool --------------------------------------------------------------------
class FakeProm:
    """``custom_query`` answering from a table of PromQL → vector; every query is recorded."""

    def __init__(self, answers: dict[str, list[dict]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def custom_query(self, q: str, params=None, timeout=None) -> list[dict]:
        self.asked.append(q)
        return self.answers.get(q, [])

    def close(self) -> None:
        pass


def _vec(v: float) -> list[dict]:
    return [{"metric": {}, "value": [0, str(v)]}]


async def test_prometheus_mode_detects_sglang_caches_it_and_derives_sizes():
    src = _source()
    q = src.queries("sglang")
    answers = {q["replicas"]: _vec(2), q["running"]: _vec(6), q["waiting"]: _vec(1), q["kv_usage"]: _vec(0.3),
               q["kv_usage_max"]: _vec(0.4), q["finish_rate"]: _vec(4.0), q["prompt_tokens_per_s"]: _vec(200.0),
               q["generation_tokens_per_s"]: _vec(40.0), q["prefix_queries"]: _vec(200.0),
               q["prefix_hit_rate_gauge"]: _vec(0.2)}  # fmt: skip
    src.prom = fake = FakeProm(answers)
    sig = await src.read()
    assert src.engine is SGLANG and fake.asked[:2] == [
        src.queries("vllm")["replicas"], src.queries("sglang")["replicas"]]  # fmt: skip
    assert sig.replicas == 2 and sig.running == 6 and sig.finish_rate == 4.0
    assert sig.mean_isl == pytest.approx(50.0) and sig.mean_osl == pytest.approx(10.0)  # no length histograms
    assert sig.prefix_hit_rate == pytest.approx(0.2)  # no cached_tokens series (yet): the gauge over the window
    fake.asked.clear()
    await src.read()
    assert src.queries("vllm")["replicas"] not in fake.asked  # cached: no detection
    answers[q["prefix_hits"]] = _vec(50.0)
    assert (await src.read()).prefix_hit_rate == pytest.approx(0.25)  # the counters win once they exist
    # the lazy counters before any request finished: zero, not "targets down"
    for key in ("finish_rate", "prompt_tokens_per_s", "generation_tokens_per_s", "prefix_queries", "prefix_hits"):
        answers.pop(q[key], None)
    idle = await src.read()
    assert idle.finish_rate == 0 and idle.mean_isl is None and idle.replicas == 2
    # the pods are gone: SignalError, and the next read detects again
    answers.pop(q["replicas"])
    with pytest.raises(SignalError):
        await src.read()
    assert src.engine is None
    with pytest.raises(SignalError, match="no engine series"):
        await src.read()


async def test_prometheus_mode_vllm_unchanged():
    src = _source()
    q = src.queries("vllm")
    answers = {q["replicas"]: _vec(1), q["running"]: _vec(2), q["waiting"]: _vec(0), q["kv_usage"]: _vec(0.3),
               q["kv_usage_max"]: _vec(0.3), q["finish_rate"]: _vec(2.0), q["prompt_tokens_per_s"]: _vec(500.0),
               q["generation_tokens_per_s"]: _vec(20.0), q["isl_sum"]: _vec(160.0), q["isl_count"]: _vec(2.0),
               q["osl_sum"]: _vec(16.0), q["prefix_hits"]: _vec(10.0), q["prefix_queries"]: _vec(100.0)}  # fmt: skip
    src.prom = FakeProm(answers)
    sig = await src.read()
    assert src.engine is VLLM
    assert sig.mean_isl == pytest.approx(80.0) and sig.mean_osl == pytest.approx(8.0)  # the histograms, not 250
    assert sig.prefix_hit_rate == pytest.approx(0.1)
    answers[q["isl_count"]] = _vec(0.0)  # histograms present, nothing finished in the window: unknown
    assert (await src.read()).mean_isl is None
    answers.pop(q["finish_rate"])  # vLLM creates its counters at start: a missing one is an error
    with pytest.raises(SignalError, match="finish_rate"):
        await src.read()

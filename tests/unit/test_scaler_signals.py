"""PodHistory: per-pod snapshots → pool rates (the path shared by the live scraper and the evaluator); PageParser:
the pods' metrics pages parsed in a worker process."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kvscale.engine_stats import EngineStats, ScrapeError, parse_metrics
from scaler.signals import PageParser, PodHistory, SignalPending


def stats(at: float, finished: float) -> EngineStats:
    return EngineStats(engine="vllm", at=at, running=2.0, waiting=0.0, kv_usage=0.3, requests_finished_total=finished,
                       prompt_tokens_total=finished * 100, generation_tokens_total=finished * 10)  # fmt: skip


def test_new_pods_do_not_inflate_the_rate():
    """4 pods at 2 req/s each, then 12 new pods appear: the pool rate of that interval is still 8 req/s (new pods
    served nothing of it), not 4 x 16 / 4 = 32 req/s (a phantom spike that fed back into more scale-up)."""
    h = PodHistory(30.0)
    with pytest.raises(SignalPending):
        h.update({i: stats(0.0, 0.0) for i in range(4)}, 0.0)
    assert h.update({i: stats(5.0, 10.0) for i in range(4)}, 5.0).arrival_rate == pytest.approx(8.0)
    reads = {i: stats(10.0, 20.0) for i in range(4)} | {i: stats(10.0, 0.0) for i in range(4, 16)}
    sig = h.update(reads, 10.0)
    assert sig.arrival_rate == pytest.approx(8.0) and sig.replicas == 16
    assert sig.running == pytest.approx(32.0)  # gauges: every pod that answered


def test_a_known_pod_that_fails_is_extrapolated():
    h = PodHistory(30.0)
    with pytest.raises(SignalPending):
        h.update({i: stats(0.0, 0.0) for i in range(4)}, 0.0)
    h.update({i: stats(5.0, 10.0) for i in range(4)}, 5.0)
    reads = {i: stats(10.0, 20.0) for i in range(3)} | {3: ScrapeError("timeout")}
    sig = h.update(reads, 10.0)
    assert sig.arrival_rate == pytest.approx(8.0) and sig.missing == 1


# -- parsing pods' pages off the event loop ------------------------------------------------------------------------
VLLM_PAGE = Path(__file__).parents[1] / "data" / "vllm_reference" / "metrics.txt"  # recorded from real vLLM (CPU)


def _full_parse(text: str) -> dict[str, float]:
    """Reference values from the library parser on the whole page (no pre-filter)."""
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def total(name: str, suffix: str) -> float:
        return sum(s.value for s in fams[name].samples if s.name == name + suffix)

    return {
        "prompt_tokens_total": total("vllm:prompt_tokens", "_total"),
        "requests_finished_total": total("vllm:request_success", "_total"),
        "prefix_hits_total": total("vllm:prefix_cache_hits", "_total"),
        "ttft_count": total("vllm:time_to_first_token_seconds", "_count"),
        "itl_sum": total("vllm:inter_token_latency_seconds", "_sum"),
        "isl_sum": total("vllm:request_prompt_tokens", "_sum"),
        "osl_count": total("vllm:request_generation_tokens", "_count"),
    }


async def test_the_parser_process_reads_what_the_whole_page_says():
    """A real vLLM page parsed in the worker process equals the in-line parse, and the pre-filter (which skips
    the series the scaler never reads) loses nothing: the values match a parse of the whole page."""
    text = VLLM_PAGE.read_text()
    want = _full_parse(text)
    assert want["requests_finished_total"] > 0 and want["ttft_count"] > 0  # the recorded page saw traffic
    worker = PageParser(workers=1)
    try:
        worker.start()
        got = await worker.parse("http://pod-0/metrics", text, at=12.5)
    finally:
        worker.close()
    assert got == await PageParser(workers=0).parse("http://pod-0/metrics", text, at=12.5)
    assert got.at == 12.5 and got.engine == "vllm" and got.block_size is not None
    assert got.prompt_tokens_total == want["prompt_tokens_total"]
    assert got.requests_finished_total == want["requests_finished_total"]
    assert got.prefix_hits_total == want["prefix_hits_total"]
    assert got.ttft.count == want["ttft_count"] and len(got.ttft.buckets) > 5
    assert got.itl.sum == pytest.approx(want["itl_sum"])
    assert got.prompt_len.sum == want["isl_sum"] and got.output_len.count == want["osl_count"]


async def test_parser_errors_name_the_pod_and_a_dead_worker_is_replaced():
    parser = PageParser(workers=1)
    try:
        parser.start()
        with pytest.raises(ScrapeError, match=r"http://pod-1/metrics: not an engine metrics page"):
            await parser.parse("http://pod-1/metrics", "<html>502 Bad Gateway</html>", at=1.0)
        assert parser._pool is not None
        for pid in list(parser._pool._processes):  # the worker is OOM-killed
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(ScrapeError, match=r"http://pod-2/metrics: the metrics parser process died"):
            await parser.parse("http://pod-2/metrics", VLLM_PAGE.read_text(), at=2.0)
        stats = await parser.parse("http://pod-2/metrics", VLLM_PAGE.read_text(), at=3.0)  # a new worker
        assert stats.at == 3.0 and stats.requests_finished_total > 0
    finally:
        parser.close()


# -- fuzz: a pod page with extreme values is a plausible read or a ScrapeError, never a decision input ------------
_EXTREME = st.sampled_from(["NaN", "+Inf", "-Inf", "-1", "0", "1e300", "-1e-300", "100", "1e12", "0.5", "3"])
_READ = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
         "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
         "vllm:prefix_cache_hits_total")  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(_READ), _EXTREME, min_size=1, max_size=4))
def test_fuzzed_pod_pages_parse_plausibly_or_fail(changes: dict[str, str]):
    page = VLLM_PAGE.read_text()
    for name, value in changes.items():
        page = re.sub(rf"^({re.escape(name)}\{{[^}}]*\}}) \S+$", rf"\g<1> {value}", page, flags=re.M)
    try:
        st_ = parse_metrics(page, at=1.0)
    except ScrapeError:
        return
    assert 0 <= st_.running <= 1e6 and 0 <= st_.waiting <= 1e6 and 0 <= st_.kv_usage <= 1.0 + 1e-6
    assert all(v >= 0 for v in (st_.prompt_tokens_total, st_.generation_tokens_total, st_.requests_finished_total))

"""PodHistory: per-pod snapshots → pool rates (the path shared by the live scraper and the evaluator)."""

from __future__ import annotations

import pytest

from kvscale.engine_stats import EngineStats, ScrapeError
from scaler.signals import PodHistory, SignalPending


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

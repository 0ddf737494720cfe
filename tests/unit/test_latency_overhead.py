"""A fitted model's per-request TTFT overhead (API-server time outside the engine step) in the virtual-clock driver:
it adds to every request's TTFT, and it does not occupy the engine (other requests keep stepping meanwhile)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from models_for_tests import LAT, least_request

from kvscale.latency import LatencyModel, LatencyModelError, latency_model_from_dict
from simulator.cluster import Cluster
from simulator.engine import EngineConfig, EngineCore
from simulator.request import Request
from simulator.workload import TraceRequest

OVERHEAD = 0.0375


def with_overhead(model: LatencyModel, overhead: float) -> LatencyModel:
    return dataclasses.replace(model, extra={**model.extra, "fit": {"ttft_overhead_s": overhead}})


def test_overhead_is_read_from_the_fit_section_and_validated() -> None:
    assert LAT.ttft_overhead_s == 0.0  # estimates carry none
    m = with_overhead(LAT, OVERHEAD)
    assert m.ttft_overhead_s == OVERHEAD
    assert latency_model_from_dict(json.loads(m.dumps())).ttft_overhead_s == OVERHEAD
    for bad in (-0.001, "5ms", float("nan")):
        d = json.loads(m.dumps())
        d["fit"]["ttft_overhead_s"] = bad
        with pytest.raises(LatencyModelError, match=r"fit\.ttft_overhead_s"):
            latency_model_from_dict(d)


def test_engine_counts_ttft_from_the_given_arrival() -> None:
    engine = EngineCore(EngineConfig(), LAT)
    req = Request("r", list(range(100, 164)), max_tokens=1, arrival_time=0.0)
    engine.add_request(req, 1.0, arrival_time=0.9)
    out = engine.step(1.0)
    assert out is not None and req.arrival_time == 0.9
    assert req.first_token_time - req.arrival_time == pytest.approx(0.1 + LAT.prefill_time(64))


@pytest.mark.parametrize("fast_forward", [True, False])
def test_cluster_adds_the_overhead_to_ttft_without_occupying_the_engine(fast_forward: bool) -> None:
    # A long decode starts at t=0; a short request arrives at t=0.5 while it decodes.
    trace = [TraceRequest(0.0, None, 128, 400), TraceRequest(0.5, None, 64, 3)]
    base = Cluster(LAT, fast_forward=fast_forward, dispatcher=least_request()).run(trace)
    over = Cluster(with_overhead(LAT, OVERHEAD), fast_forward=fast_forward, dispatcher=least_request()).run(trace)
    t_base, t_over = base.array("ttft_s"), over.array("ttft_s")
    # The first request meets an idle engine: its TTFT is exactly the overhead longer.
    assert t_over[0] == pytest.approx(t_base[0] + OVERHEAD, abs=1e-12)
    assert t_base[0] == pytest.approx(LAT.prefill_time(128), rel=1e-9)
    # The second joins a running batch after the overhead: TTFT grows by about the overhead (step alignment
    # moves it by less than one step), not by anything more.
    step = LAT.step_time(64, 64 * 32, 1, 128 + 200)
    assert t_base[1] + OVERHEAD - step <= t_over[1] <= t_base[1] + OVERHEAD + step
    # The engine kept decoding the first request during the overhead: its decode is not stretched.
    tpot_base, tpot_over = base.array("tpot_s"), over.array("tpot_s")
    assert tpot_over[0] == pytest.approx(tpot_base[0], rel=0.02)
    assert over.array("e2e_s")[0] - base.array("e2e_s")[0] == pytest.approx(OVERHEAD, rel=0.05)


def test_a_draining_replica_waits_for_requests_still_in_the_api_server() -> None:
    """Scaling to zero right after a dispatch must not delete the replica under a request in its overhead."""

    class ScaleDown:
        interval_s = 0.01

        def tick(self, now: float, cluster: Cluster) -> None:
            if now >= 0.01:
                cluster.set_replicas("aggregated", 0, now)

    cl = Cluster(with_overhead(LAT, 0.5), dispatcher=least_request())
    res = cl.run([TraceRequest(0.005, None, 64, 4)], controller=ScaleDown())
    assert res.array("ttft_s")[0] == pytest.approx(0.5 + LAT.prefill_time(64), rel=1e-9)
    assert res.replica_seconds["aggregated"] > 0.5


def test_client_overhead_adds_to_ttft_and_moves_the_engine_side_arrival() -> None:
    """``client_overhead_s`` (HTTP before vLLM's arrival_time) adds to TTFT like ``ttft_overhead_s``; the engine's
    own TTFT (what finish listeners, like vLLM's histogram, see) counts from after it."""
    m = dataclasses.replace(LAT, extra={"fit": {"ttft_overhead_s": OVERHEAD, "client_overhead_s": 0.011}})
    assert m.request_overhead_s == pytest.approx(OVERHEAD + 0.011)
    cluster = Cluster(m, dispatcher=least_request())
    engine_ttft: list[float] = []
    cluster.finish_listeners.append(lambda r, req: engine_ttft.append(req.first_token_time - req.arrival_time))
    res = cluster.run([TraceRequest(1.0, None, 64, 2)])
    assert res.array("ttft_s")[0] == pytest.approx(OVERHEAD + 0.011 + LAT.prefill_time(64), rel=1e-9)
    assert engine_ttft == [pytest.approx(OVERHEAD + LAT.prefill_time(64), rel=1e-9)]

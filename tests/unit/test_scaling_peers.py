"""The peers' autoscalers of ``kvscale eval scaling`` (scaler/evaluate/peers.py): each rule on hand-made signals,
then every peer on a short trace through the evaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest
from models_for_tests import least_request

from kvscale.latency import load_latency_model
from scaler.evaluate import PEER_POLICIES
from scaler.evaluate import peers as P
from scaler.evaluate.run import EvalConfig, Evaluation
from simulator.cluster import Cluster

MODEL = load_latency_model("llama-3.1-8b-h100")


def cluster_with(n: int) -> Cluster:
    return Cluster(MODEL, replicas={"aggregated": n}, dispatcher=least_request())


def set_load(cl: Cluster, loads: list[tuple[float, int]]) -> None:
    for r, (kv, waiting) in zip(cl.pool_replicas("aggregated"), loads, strict=True):
        r.view.kv_usage, r.view.waiting = kv, waiting


def test_wva_scales_up_when_spare_capacity_is_short_and_down_when_two_can_absorb_one() -> None:
    cl = cluster_with(3)
    wva = P.WvaProducer(cl, "aggregated")
    set_load(cl, [(0.85, 0), (0.75, 1), (0.2, 0)])  # one saturated; spare KV mean (0.05 + 0.6) / 2 = 0.325
    wva.gauges.scrape(0.0)
    assert wva.analyze(0.0) == (False, False)  # after removing one: load (0.8 - 0.325) x 2 = 0.95 > 0.7
    set_load(cl, [(0.85, 0), (0.75, 4), (0.78, 0)])  # spare queue (1 + 5) / 2 = 3 is not < 3; spare KV 0.035
    wva.gauges.scrape(5.0)
    up, _ = wva.analyze(5.0)
    assert up  # the 1-minute peaks: KV spare 0.035 < 0.10
    cl2 = cluster_with(3)
    wva2 = P.WvaProducer(cl2, "aggregated")
    set_load(cl2, [(0.1, 0), (0.1, 0), (0.1, 0)])
    wva2.gauges.scrape(0.0)
    assert wva2.analyze(0.0) == (False, True)
    wva2(60.0)  # a reconcile: ready == current, no target yet -> one fewer
    assert wva2.desired == 2
    wva2.next_t = 0.0
    wva2(61.0)  # the Deployment still has 3: the transition guard holds the target
    assert wva2.desired == 2 and wva2.trace[-1][2] == "transition"


def test_wva_all_saturated_forces_scale_up() -> None:
    cl = cluster_with(2)
    wva = P.WvaProducer(cl, "aggregated")
    set_load(cl, [(0.9, 0), (0.1, 7)])
    wva.gauges.scrape(0.0)
    assert wva.analyze(0.0)[0]


def test_kalman_predictor_follows_a_ramp_and_skips_leading_zeros() -> None:
    k = P.KalmanPredictor()
    k.add(0.0)
    assert k.x is None and k.next() == 0.0
    for i in range(1, 30):
        k.add(100.0 * i)
    assert k.next() == pytest.approx(3000.0, rel=0.02)  # level + trend
    c = P.ConstantPredictor()
    c.add(5.0)
    c.add(math.nan)
    assert c.next() == 0.0


def test_profile_best_decode_throughput_meets_the_itl_target() -> None:
    prof = P.PerfProfile(MODEL, max_num_seqs=256)
    cap = prof.kv_tokens // 2000  # the KV cache holds this many 2000-token sequences
    b = prof.best_decode_batch(0.05, 2000.0)
    assert b == cap and prof.itl(b, 2000.0) <= 0.05  # KV-bound at a loose target
    t = prof.itl(cap // 2, 2000.0)  # a target met at half the KV-bound batch, not above
    b = prof.best_decode_batch(t, 2000.0)
    assert b == cap // 2 and prof.itl(b + 1, 2000.0) > t
    assert prof.best_decode_batch(prof.itl(1, 2000.0) / 2, 2000.0) == 1  # unmeetable: one sequence
    assert prof.best_decode_thpt(t, 2000.0) == pytest.approx(b / prof.itl(b, 2000.0))
    assert prof.prefill_thpt(4000) > prof.prefill_thpt(100)  # the weight read amortizes over a longer prompt
    assert prof.ttft(20000) > prof.ttft(8192) > 0


def test_dynamo_planner_asks_for_more_when_the_load_doubles() -> None:
    cl = Cluster(MODEL, replicas={"aggregated": 1}, dispatcher=least_request())
    arrivals = np.sort(np.concatenate([np.linspace(0, 180, 9000, endpoint=False),
                                       np.linspace(180, 360, 18000, endpoint=False)]))  # fmt: skip
    fe = P.FrontendStats(cl, arrivals, ("aggregated",))
    fe.done = [(float(t) + 1.0, 0.2, 0.02, 1000, 200, 5.0) for t in arrivals if t < 359]
    planner = P.DynamoSlaPlanner(("aggregated",), P.PerfProfile(MODEL, 256), fe, 1.0, 0.05,
                                 P.DynamoConfig(predictor="constant"))  # fmt: skip
    planner.tick(180.0, cl)
    first = planner.trace[-1][1]["aggregated"]
    planner.tick(360.0, cl)
    second = planner.trace[-1][1]["aggregated"]
    assert second > first >= 1
    assert len(cl.pool_replicas("aggregated")) == second


@pytest.mark.parametrize("pools", ["aggregated", "pd"])
def test_every_peer_runs_in_the_evaluation(pools: str) -> None:
    cfg = EvalConfig(trace="step", workload="chat", pools=pools, duration_s=150.0, peak_replicas=2.0,
                     startup_s=20.0, policies=PEER_POLICIES)  # fmt: skip
    res = Evaluation(cfg).run()
    for name in PEER_POLICIES:
        p = res["policies"][name]
        assert p["gpu_hours"] > 0 and 0.0 <= p["slo_attainment"] <= 1.0, name
        assert p["requests_killed_by_scale_down"] >= 0
    assert res["hpa"]["peer:llm-d-wva"][cfg.pool_names()[0]].startswith("llm-d WVA chart")


def test_aibrix_apa_band_and_rate_limits() -> None:
    cl = cluster_with(4)
    apa = P.AibrixApa(cl, "aggregated")
    apa.samples.extend([(0.0, 4 * 0.45)])  # per pod 0.45 vs target 0.5: inside the band (-20 % / +10 %)
    assert apa.desired(0.0, 4) == 4
    apa.samples.clear()
    apa.samples.append((0.0, 4 * 0.95))  # ratio 1.9: ceil(4 x 1.9) = 8, at most 2 x 4
    assert apa.desired(0.0, 4) == 8
    apa.samples.clear()
    apa.samples.append((0.0, 4 * 0.05))  # ratio 0.1: ceil(0.4) = 1, but at least floor(4 / 2) = 2
    assert apa.desired(0.0, 4) == 2


def test_aibrix_kpa_panics_on_a_burst_and_holds_through_its_scale_down_delay() -> None:
    cl = cluster_with(1)
    kpa = P.AibrixKpa(cl, "aggregated", P.AibrixConfig(scale_down_delay_s=0.0))
    assert kpa.panic_since is None  # one pod at start: stable mode
    for t in range(0, 60, 10):
        kpa.samples.append((float(t), 0.4))
    kpa.samples.append((60.0, 1.5))  # the 10 s panic window: 1.5 total -> 3 pods >= 2 x 1 ready
    assert kpa.desired(60.0, 1) == 2 and kpa.panic_since == 60.0  # capped at ceil(2 x 1)
    kpa.samples.append((70.0, 0.1))
    assert kpa.desired(70.0, 1) == 2  # in panic: never below the highest count asked
    for t in range(80, 150, 10):
        kpa.samples.append((float(t), 0.1))
    assert kpa.desired(150.0, 2) == 1 and kpa.panic_since is None  # a stable window later: panic over
    # with the default 30-minute scale-down delay the same history keeps 2
    held = P.AibrixKpa(cl, "aggregated")
    held.samples.extend([(0.0, 1.5)])
    assert held.desired(0.0, 1) == 2
    held.samples.clear()
    held.samples.append((1000.0, 0.1))
    assert held.desired(1000.0, 2) == 2
    assert held.desired(1801.0, 2) == 1

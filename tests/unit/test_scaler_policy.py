"""The scaling policy as a plain object: demand / capacity, corrections, stability, missing data, scale to zero."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from kvscale.latency import load_latency_model
from predictor.capacity import SLO, aggregated_capacity_rps, decode_capacity, prefill_capacity_tokens_per_s
from scaler.forecast import HoltForecaster
from scaler.metadata import parse_scaler_metadata
from scaler.policy import ScalingPolicy
from scaler.signals import PoolSignals

MODEL = load_latency_model("llama-3.1-8b-h100")


def settings(pool: str = "aggregated", **kw: str):
    md = {"pool": pool, "model": "m", "podUrls": "http://x", "stableWindowSeconds": "60", "panicWindowSeconds": "10",
          "startupSeconds": "90", **kw}  # fmt: skip
    return parse_scaler_metadata(md)


def sig(at: float, rate: float, replicas: int = 2, isl: float = 1000, osl: float = 200, **kw) -> PoolSignals:
    base = dict(at=at, replicas=replicas, arrival_rate=rate, finish_rate=rate, prompt_tokens_per_s=rate * isl,
                generation_tokens_per_s=rate * osl, mean_isl=isl, mean_osl=osl, prefix_hit_rate=0.0, running=0.0,
                waiting=0.0, kv_usage=0.1, kv_usage_max=0.1)  # fmt: skip
    return PoolSignals(**{**base, **kw})


def run(policy: ScalingPolicy, rates, t0: float = 0.0, dt: float = 5.0, **kw):
    out = []
    for i, r in enumerate(rates):
        out.append(policy.decide(t0 + i * dt, sig(t0 + i * dt, r, **kw)))
    return out


@pytest.mark.parametrize("pool", ["aggregated", "prefill", "decode"])
def test_steady_demand_divided_by_capacity(pool: str):
    s = settings(pool)
    p = ScalingPolicy(s, MODEL)
    slo = SLO(s.ttft_slo_s, s.itl_slo_s, s.slo_percentile)
    rate = 40.0
    if pool == "aggregated":
        expect = rate / (aggregated_capacity_rps(MODEL, slo, 1000, 200) * 0.8)
    elif pool == "prefill":
        expect = rate * 1000 / (prefill_capacity_tokens_per_s(MODEL, slo, 1000) * 0.8)
    else:
        expect = rate * 200 / (decode_capacity(MODEL, slo, 1100, 256).tokens_per_s * 0.8)
    ds = run(p, [rate] * 30, replicas=math.ceil(expect))
    assert ds[-1].need == pytest.approx(expect, rel=0.05)
    assert ds[-1].desired == math.ceil(ds[-1].need - 1e-9)


def test_scale_up_is_immediate_and_panic_on_a_step():
    p = ScalingPolicy(settings(), MODEL)
    ds = run(p, [10.0] * 20, replicas=1)
    steady = ds[-1].desired
    step = p.decide(100.0, sig(100.0, 50.0, replicas=steady))
    assert step.desired > steady and step.reason in ("panic", "scale-up", "rate-limited")
    assert step.desired >= math.ceil(step.inputs["arrival_rate"] / step.inputs["capacity_per_replica"]) or (
        step.reason == "rate-limited"
    )


def test_scale_down_waits_for_the_stable_window_and_rate_limit():
    p = ScalingPolicy(settings(maxScaleDownRate="2"), MODEL)
    high = run(p, [60.0] * 20, replicas=6)
    top = high[-1].desired
    lows = run(p, [5.0] * 30, t0=100.0, replicas=top)
    times = [d.at for d in lows if d.desired < top]
    assert times and times[0] >= 100.0 + 60.0 - 1e-9  # not before the stable window passed
    first_down = next(d for d in lows if d.desired < top)
    assert first_down.desired >= math.ceil(top / 2)  # at most halved per decision
    assert lows[-1].desired < top


def test_no_two_one_oscillation_when_n_minus_one_breaks_kv():
    """Demand fits on 1 replica but KV usage at 2 replicas is 0.6 each: going to 1 would need 1.2 > 0.9, so the
    re-prediction with N-1 keeps 2 (Dynamo's 2<->1 bug)."""
    p = ScalingPolicy(settings(), MODEL)
    ds = run(p, [2.0] * 60, replicas=2, kv_usage=0.6)
    assert {d.desired for d in ds[12:]} == {2}
    assert any(d.reason in ("hold-slo-check", "hold-stable-window", "steady") for d in ds[12:])


def test_kv_pressure_adds_capacity():
    p = ScalingPolicy(settings(), MODEL)
    d = run(p, [2.0] * 3, replicas=2, kv_usage=0.99)[-1]
    assert d.desired >= 3 and d.reason == "kv-cache"


def test_sustained_queue_beyond_spare_capacity_adds_replicas():
    p = ScalingPolicy(settings(), MODEL)
    base = run(p, [20.0] * 5, replicas=2)[-1]
    qs = run(ScalingPolicy(settings(), MODEL), [20.0] * 5, replicas=2, waiting=2000.0)
    assert qs[-1].desired > base.desired and any(d.reason in ("queue", "panic") for d in qs)
    # once the planned replicas (ready + starting) can drain it within TTFT + cold start, it asks no more
    assert max(d.need for d in qs) > base.need and qs[-1].need == pytest.approx(base.need)
    # a queue present at only one read is not sustained
    p2 = ScalingPolicy(settings(), MODEL)
    run(p2, [20.0] * 4, replicas=2)
    blip = p2.decide(20.0, sig(20.0, 20.0, replicas=2, waiting=2000.0))
    assert blip.need == pytest.approx(p2.decide(25.0, sig(25.0, 20.0, replicas=2)).need, rel=0.2)


def test_missing_data_holds_never_zero():
    p = ScalingPolicy(settings(), MODEL)
    before = p.hold(0.0, "pods down", current=3)
    assert before.desired == 3 and before.reason == "hold-no-data" and before.active
    assert p.hold(1.0, "unknown").desired == -1  # unknown: the service answers an error, not 0
    good = run(p, [30.0] * 5, replicas=3)[-1]
    held = p.hold(100.0, "scrape failed", current=1)
    assert held.desired == good.desired and held.reason == "hold-signal-error" and not held.ok
    assert p.errors == 3


def test_scale_to_zero_only_when_enabled_and_idle_for_the_window():
    p = ScalingPolicy(settings(), MODEL)
    assert min(d.desired for d in run(p, [0.0] * 40, replicas=1)) == 1
    z = ScalingPolicy(settings(scaleToZero="true"), MODEL)
    ds = run(z, [0.0] * 40, replicas=1)
    assert not ds[-1].active and ds[-1].desired == 0 and ds[-1].reason == "scale-to-zero"
    assert all(d.desired >= 1 for d in ds if d.at < 60.0)
    wake = z.decide(300.0, sig(300.0, 1.0, replicas=1))
    assert wake.active and wake.desired >= 1


def test_holt_forecast_follows_a_ramp_and_ignores_flat_noise():
    f = HoltForecaster()
    for i in range(200):
        f.update(i * 5.0, 10.0 + 0.05 * i * 5.0)  # +0.05 req/s per second
    assert f.forecast(90.0) > f.level > 55.0
    g = HoltForecaster()
    for i in range(200):
        g.update(i * 5.0, 10.0 + (1 if i % 2 else -1))
    assert abs(g.forecast(90.0) - 10.0) < 1.0


def test_a_draining_queue_adds_nothing():
    """A backlog stuck in engines that shrinks read after read is being served: more replicas would not take it."""
    p = ScalingPolicy(settings(), MODEL)
    base = run(p, [20.0] * 5, replicas=2)[-1]
    p2 = ScalingPolicy(settings(), MODEL)
    ds = [p2.decide(i * 5.0, sig(i * 5.0, 20.0, replicas=2, waiting=2000.0 - 300.0 * i)) for i in range(5)]
    assert ds[-1].need == pytest.approx(base.need) and ds[-1].desired == base.desired


def test_no_undershoot_after_a_step_down():
    """Holt's level stays below the new value for minutes after a fall (the negative trend); the policy plans
    for the trend-free smoothed rate instead, so it does not size below the demand it sees."""
    p = ScalingPolicy(settings(), MODEL)
    run(p, [60.0] * 40, replicas=8)
    after = run(p, [15.0] * 40, t0=200.0, replicas=8)
    f = p.forecaster
    assert f.level is not None and f.level < 14.0  # Holt alone would undershoot here
    assert after[-1].inputs["forecast_rate"] >= 14.5
    steady = run(ScalingPolicy(settings(), MODEL), [15.0] * 40, replicas=3)[-1]
    assert after[-1].need == pytest.approx(steady.need, rel=0.05)


def bursty(policy: ScalingPolicy, pattern: list[tuple[float, float]], replicas: int = 1, dt: float = 5.0):
    """Feed ``(seconds, req/s)`` segments, one decision per ``dt`` (rates counted over ``dt``); ready replicas
    follow the previous decision (an HPA whose pods are up), so each burst meets the capacity the policy kept."""
    out, t = [], 0.0
    for length, rate in pattern:
        for _ in range(round(length / dt)):
            d = policy.decide(t, sig(t, rate, replicas=replicas, window_s=dt))
            replicas = max(d.desired, 1)
            out.append(d)
            t += dt
    return out


def between(ds, lo: float, hi: float):
    return [d for d in ds if lo <= d.at < hi]


QUIET, BURST = 8.0, 40.0  # req/s between and in bursts: ~0.5 vs ~3 replicas
RECURRING = [(120.0, QUIET)] + [(30.0, BURST), (120.0, QUIET)] * 4  # bursts start at 120 + 150 k


def test_recurring_bursts_hold_replicas_across_the_gap():
    """30 s bursts every 2.5 min (gaps of 120 s, twice the 60 s stable window): once the bursts have recurred,
    the replicas the last burst needed stay through the gap instead of being released and cold-started again.
    The same sequence with the hold disabled releases them (so this test can fail)."""
    held = bursty(ScalingPolicy(settings(), MODEL), RECURRING)
    released = bursty(ScalingPolicy(settings(maxBurstHoldSeconds="0"), MODEL), RECURRING)
    quiet_level = held[20].desired
    peaks = [max(d.desired for d in between(held, 120.0 + k * 150.0, 150.0 + k * 150.0)) for k in range(4)]
    assert min(peaks) >= quiet_level + 2  # the bursts are real bursts for this policy
    for k in (1, 2, 3):  # the gaps after the 2nd, 3rd and 4th bursts (one gap seen by then)
        late_gap = between(held, 150.0 + k * 150.0 + 70.0, 270.0 + k * 150.0)  # past the stable window
        assert min(d.desired for d in late_gap) >= peaks[k], k
        assert any(d.reason == "hold-burst" for d in late_gap) and late_gap[-1].inputs["burst_hold_s"] > 60.0
        free = between(released, 150.0 + k * 150.0 + 70.0, 270.0 + k * 150.0)
        assert min(d.desired for d in free) <= quiet_level + 1 < peaks[k]
    # each later burst starts on the kept replicas: no panic, no scale-up at its start
    for k in (2, 3):
        assert between(held, 120.0 + k * 150.0, 125.0 + k * 150.0)[0].desired >= peaks[k - 1]


def test_a_single_burst_then_quiet_scales_down_after_the_normal_window():
    pattern = [(120.0, QUIET), (30.0, BURST), (600.0, QUIET)]
    ds = bursty(ScalingPolicy(settings(), MODEL), pattern)
    ref = bursty(ScalingPolicy(settings(maxBurstHoldSeconds="0"), MODEL), pattern)
    quiet_level, top = ds[20].desired, max(d.desired for d in ds)
    assert top >= quiet_level + 2
    assert [d.desired for d in ds] == [d.desired for d in ref]  # one burst is not a pattern: nothing held
    first_down = next(d.at for d in ds if d.at > 150.0 and d.desired < top)
    assert first_down <= 150.0 + 60.0 + 5.0  # one stable window after the burst's last high need
    assert ds[-1].desired == quiet_level and all(d.inputs["burst_hold_s"] == 0.0 for d in ds)


def test_the_hold_ends_when_the_bursts_stop():
    """Bursts recur, then stop: the capacity goes once demand has stayed low for the hold (<= the cap)."""
    pattern = [(120.0, QUIET)] + [(30.0, BURST), (120.0, QUIET)] * 3 + [(900.0, QUIET)]
    ds = bursty(ScalingPolicy(settings(maxBurstHoldSeconds="240"), MODEL), pattern)
    last_burst_end = 120.0 + 2 * 150.0 + 30.0
    hold = max(d.inputs["burst_hold_s"] for d in ds)
    assert 60.0 < hold <= 240.0
    quiet_level = ds[20].desired
    assert min(d.desired for d in between(ds, last_burst_end, last_burst_end + hold - 10.0)) > quiet_level + 1
    assert ds[-1].desired == quiet_level
    assert max(d.desired for d in between(ds, last_burst_end + hold + 60.0, 1e9)) <= quiet_level + 1


def test_burst_hold_rule():
    """The rule on its own: gaps from last to first firing, firings merged within the stable window, the cap,
    a quiet spell longer than the cap, 0 disables."""
    from scaler.policy import BURST_GAP_FACTOR, BurstHold

    b = BurstHold(max_hold_s=300.0, merge_s=60.0)
    b.note(0.0)
    b.note(20.0)  # the same burst
    assert b.gaps() == [] and b.hold_s() == 0.0
    b.note(120.0)
    assert b.gaps() == [100.0] and b.hold_s() == pytest.approx(BURST_GAP_FACTOR * 100.0)
    b.note(400.0)  # gap 280 s: the hold is capped
    assert b.hold_s() == 300.0
    b.note(1000.0)  # a quiet spell longer than the cap: the pattern broke
    assert b.hold_s() == 0.0
    off = BurstHold(max_hold_s=0.0, merge_s=60.0)
    for t in (0.0, 100.0, 200.0):
        off.note(t)
    assert off.hold_s() == 0.0


# -- fuzz: whatever the signals, a decision is a count in [floor, maxReplicas] ------------------------------------
_num = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    pool=st.sampled_from(["aggregated", "prefill", "decode"]),
    s2z=st.booleans(),
    reads=st.lists(st.tuples(_num, st.integers(0, 10_000), st.floats(1.0, 1e6), st.floats(1.0, 1e5), _num,
                             st.floats(0.0, 1.0), st.one_of(st.none(), st.floats(0.0, 1.0))), min_size=1, max_size=25),
)  # fmt: skip
def test_fuzzed_signals_give_desired_within_bounds(pool, s2z, reads):
    p = ScalingPolicy(settings(pool, scaleToZero=str(s2z).lower(), maxReplicas="40"), MODEL)
    floor = 0 if s2z else 1
    for i, (rate, replicas, isl, osl, waiting, kv, hit) in enumerate(reads):
        d = p.decide(5.0 * i, sig(5.0 * i, rate, replicas=replicas, isl=isl, osl=osl, waiting=waiting, kv_usage=kv,
                                  kv_usage_max=kv, prefix_hit_rate=hit))  # fmt: skip
        assert isinstance(d.desired, int) and floor <= d.desired <= 40, (d, rate, replicas)

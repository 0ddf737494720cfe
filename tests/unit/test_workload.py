"""Synthetic workloads: determinism, arrival rates, length distributions, shared prefixes, trace files."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from simulator import workload as wl
from simulator.workload import TraceFormatError, TraceRequest, build_trace, load_trace, save_trace


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------------
# Determinism and basic shape


@pytest.mark.parametrize("arrivals", sorted(wl.ARRIVALS))
@pytest.mark.parametrize("workload", sorted(wl.WORKLOADS))
def test_same_seed_same_trace_other_seed_other_trace(arrivals: str, workload: str) -> None:
    a = build_trace(arrivals, workload, rate=5, duration_s=200, seed=7)
    b = build_trace(arrivals, workload, rate=5, duration_s=200, seed=7)
    c = build_trace(arrivals, workload, rate=5, duration_s=200, seed=8)
    assert len(a) > 100
    assert a == b
    assert a != c


@pytest.mark.parametrize("arrivals", sorted(wl.ARRIVALS))
def test_arrivals_sorted_and_inside_horizon(arrivals: str) -> None:
    t = wl.ARRIVALS[arrivals](10.0, 500.0, rng(3))
    assert t.dtype == np.float64
    assert t.size > 1000
    assert np.all(np.diff(t) >= 0)
    assert t[0] >= 0 and t[-1] < 500.0


def test_arrivals_do_not_depend_on_the_workload() -> None:
    chat = build_trace("bursty", "chat", rate=5, duration_s=300, seed=2)
    rag = build_trace("bursty", "rag", rate=5, duration_s=300, seed=2)
    assert [r.arrival_s for r in chat] == [r.arrival_s for r in rag]
    assert [r.input_len for r in chat] != [r.input_len for r in rag]


# --------------------------------------------------------------------------------------------------
# Arrival rates


def test_poisson_count_within_5_sigma() -> None:
    for seed in range(5):
        n = wl.poisson(20.0, 1000.0, rng(seed)).size
        assert abs(n - 20_000) < 5 * math.sqrt(20_000)


def test_poisson_gaps_are_exponential() -> None:
    gaps = np.diff(wl.poisson(50.0, 2000.0, rng(1)))
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.02)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.03)  # exponential: std == mean


def test_step_has_factor_times_the_rate_inside() -> None:
    t = wl.step(10.0, 3000.0, rng(4))  # step on [1000, 2000) at 5x
    inside = np.count_nonzero((t >= 1000) & (t < 2000)) / 1000
    before = np.count_nonzero(t < 1000) / 1000
    after = np.count_nonzero(t >= 2000) / 1000
    assert inside / before == pytest.approx(5.0, rel=0.06)
    assert inside / after == pytest.approx(5.0, rel=0.06)
    assert before == pytest.approx(10.0, rel=0.1)


def test_step_custom_window_and_factor() -> None:
    t = wl.step(20.0, 1000.0, rng(5), factor=0.5, at_s=100, until_s=5000)  # a dip lasting to the end
    assert np.count_nonzero(t >= 100) / 900 == pytest.approx(10.0, rel=0.1)
    assert np.count_nonzero(t < 100) / 100 == pytest.approx(20.0, rel=0.25)


def test_diurnal_trough_at_start_peak_in_the_middle() -> None:
    mean, dur, amp = 20.0, 4000.0, 0.6
    t = wl.diurnal(mean, dur, rng(6), amplitude=amp)
    assert abs(t.size - mean * dur) < 5 * math.sqrt(mean * dur)  # integral of the rate over one period
    w = 200.0
    trough = np.count_nonzero((t < w / 2) | (t >= dur - w / 2))  # the trough wraps around t = 0
    peak = np.count_nonzero(np.abs(t - dur / 2) < w / 2)
    # Average of 1 -/+ a*cos over a window of 1/20 period around the trough/peak.
    shape = math.sin(math.pi * w / dur) / (math.pi * w / dur)
    assert trough / w == pytest.approx(mean * (1 - amp * shape), rel=0.15)
    assert peak / w == pytest.approx(mean * (1 + amp * shape), rel=0.1)
    assert peak / trough > 3


def test_diurnal_period_shorter_than_the_trace() -> None:
    t = wl.diurnal(10.0, 4000.0, rng(7), period_s=1000.0, amplitude=0.9)
    per_period_peak = [np.count_nonzero(np.abs(t - (k * 1000 + 500)) < 50) for k in range(4)]
    per_period_trough = [np.count_nonzero(np.abs(t - k * 1000) < 50) for k in range(1, 4)]
    assert min(per_period_peak) > 3 * max(per_period_trough)


def test_bursty_keeps_the_mean_rate_and_is_overdispersed() -> None:
    counts = [wl.bursty(10.0, 3600.0, rng(s)).size for s in range(60)]
    assert np.mean(counts) == pytest.approx(36_000, rel=0.05)
    # Counts in 10 s windows: a Poisson process has variance == mean, the MMPP much more.
    b = np.histogram(wl.bursty(10.0, 20_000.0, rng(1)), bins=2000, range=(0, 20_000))[0]
    p = np.histogram(wl.poisson(10.0, 20_000.0, rng(1)), bins=2000, range=(0, 20_000))[0]
    assert p.var() / p.mean() == pytest.approx(1.0, abs=0.15)
    assert b.var() / b.mean() > 5


# --------------------------------------------------------------------------------------------------
# Lengths


@pytest.mark.parametrize(
    ("workload", "isl", "osl"),
    [("chat", 600, 250), ("rag", 4000, 200), ("reasoning", 500, 2000), ("shared-prefix", 2100, 150)],
)
def test_length_medians(workload: str, isl: int, osl: int) -> None:
    ins, outs = wl.WORKLOADS[workload].sample(50_000, rng(8))
    assert ins.dtype == outs.dtype == np.int64
    assert np.median(ins) == pytest.approx(isl, rel=0.05)
    assert np.median(outs) == pytest.approx(osl, rel=0.05)
    assert ins.min() >= 1 and ins.max() <= 8192
    assert outs.min() >= 1 and outs.max() <= 4096


def test_lengths_are_clipped_to_configured_maxima() -> None:
    trace = build_trace("poisson", "rag", rate=20, duration_s=200, max_input_len=3000, max_output_len=64)
    ins = np.array([r.input_len for r in trace])
    outs = np.array([r.output_len for r in trace])
    assert ins.max() == 3000 and outs.max() == 64  # most rag inputs exceed 3000, so the clip is hit
    assert all(r.prompt_tokens is None and r.prefix_group is None for r in trace)


# --------------------------------------------------------------------------------------------------
# Shared prefixes


def test_shared_prefix_requests_of_a_tenant_share_the_prefix_exactly() -> None:
    trace = build_trace("poisson", "shared-prefix", rate=10, duration_s=100, seed=3)
    spec = wl.WORKLOADS["shared-prefix"]
    p = spec.prefix_len
    by_tenant: dict[int, list[TraceRequest]] = {}
    for r in trace:
        assert r.prompt_tokens is not None and len(r.prompt_tokens) == r.input_len > p
        assert min(r.prompt_tokens) >= wl.TOKEN_ID_LOW and max(r.prompt_tokens) < wl.TOKEN_ID_HIGH
        by_tenant.setdefault(r.prefix_group, []).append(r)
    assert sorted(by_tenant) == list(range(spec.num_tenants))
    prefixes = {}
    for tenant, reqs in by_tenant.items():
        first = reqs[0].prompt_tokens[:p]
        assert all(r.prompt_tokens[:p] == first for r in reqs)
        prefixes[tenant] = tuple(first)
    assert len(set(prefixes.values())) == spec.num_tenants  # tenants do not share with each other
    suffixes = {tuple(r.prompt_tokens[p:]) for r in trace}
    assert len(suffixes) == len(trace)  # every query is unique


def test_shared_prefix_options_and_skew() -> None:
    trace = build_trace(
        "poisson", "shared-prefix", rate=20, duration_s=200, num_tenants=3, prefix_len=64, tenant_skew=2.0
    )
    groups = np.bincount([r.prefix_group for r in trace], minlength=3)
    assert groups.size == 3
    assert groups[0] > 2 * groups[1] > 0 and groups[1] > groups[2] > 0  # weights 1, 1/4, 1/9
    assert all(r.prompt_tokens[:64] == trace[0].prompt_tokens[:64] for r in trace if r.prefix_group == 0)


def test_prompts_need_a_shared_prefix_workload() -> None:
    with pytest.raises(ValueError, match="no shared prefixes"):
        wl.WORKLOADS["chat"].prompts(np.array([10, 20]), rng())


# --------------------------------------------------------------------------------------------------
# Argument validation


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda: wl.poisson(0, 10, rng()), "rate"),
        (lambda: wl.poisson(-1, 10, rng()), "rate"),
        (lambda: wl.poisson(float("nan"), 10, rng()), "rate"),
        (lambda: wl.poisson(1, 0, rng()), "duration_s"),
        (lambda: wl.poisson(1, -5, rng()), "duration_s"),
        (lambda: wl.diurnal(0, 10, rng()), "mean_rate"),
        (lambda: wl.diurnal(1, 10, rng(), amplitude=1.5), "amplitude"),
        (lambda: wl.diurnal(1, 10, rng(), period_s=0), "period_s"),
        (lambda: wl.step(-2, 10, rng()), "base_rate"),
        (lambda: wl.step(1, 10, rng(), factor=0), "factor"),
        (lambda: wl.step(1, 10, rng(), at_s=6, until_s=5), "until_s"),
        (lambda: wl.step(1, 10, rng(), at_s=10), "at_s"),
        (lambda: wl.bursty(0, 10, rng()), "mean_rate"),
        (lambda: wl.bursty(1, 10, rng(), burst_factor=0.5), "burst_factor"),
        (lambda: wl.bursty(1, 10, rng(), mean_gap_s=0), "mean_gap_s"),
        (lambda: build_trace("poisson", "chat", 0, 10), "rate"),
        (lambda: build_trace("poisson", "chat", 1, 10, max_input_len=0), "max_input_len"),
        (lambda: build_trace("poisson", "shared-prefix", 1, 10, prefix_len=9000), "prefix_len"),
        (lambda: wl.WorkloadSpec("x", 100, -1, 100, 0.5), "input_sigma"),
    ],
)
def test_bad_arguments_name_the_parameter(call, param: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{param}\b"):
        call()


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown arrivals 'gamma'.*bursty, diurnal, poisson, step"):
        build_trace("gamma", "chat", 1, 10)
    with pytest.raises(ValueError, match=r"unknown workload 'code'.*chat, rag, reasoning, shared-prefix"):
        build_trace("poisson", "code", 1, 10)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['amplitud'\].*'amplitude'"):
        build_trace("diurnal", "chat", 1, 10, amplitud=0.3)
    with pytest.raises(ValueError, match="factor"):  # a step option given to another process
        build_trace("poisson", "chat", 1, 10, factor=3)


# --------------------------------------------------------------------------------------------------
# Trace files


@pytest.mark.parametrize("workload", ["chat", "shared-prefix"])
def test_trace_jsonl_round_trip(tmp_path, workload: str) -> None:
    trace = build_trace("step", workload, rate=3, duration_s=60, seed=11)
    trace[0].session = "conv-1"
    path = tmp_path / "trace.jsonl"
    save_trace(trace, path)
    assert load_trace(path) == trace
    assert len(path.read_text().splitlines()) == len(trace)


def test_trace_file_format_is_plain_json_lines(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    save_trace([TraceRequest(0.5, None, 10, 20), TraceRequest(1.0, [101, 102], 2, 3, 4, "s")], path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [
        {"arrival_s": 0.5, "input_len": 10, "output_len": 20},
        {
            "arrival_s": 1.0,
            "input_len": 2,
            "output_len": 3,
            "prompt_tokens": [101, 102],
            "prefix_group": 4,
            "session": "s",
        },
    ]


GOOD = '{"arrival_s": 0.0, "input_len": 3, "output_len": 4}'


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"arrival_s": 1.0, "output_len": 4}', "'input_len': missing"),
        ('{"arrival_s": -1, "input_len": 3, "output_len": 4}', "'arrival_s'"),
        ('{"arrival_s": "soon", "input_len": 3, "output_len": 4}', "'arrival_s'"),
        ('{"arrival_s": 1, "input_len": 0, "output_len": 4}', "'input_len'"),
        ('{"arrival_s": 1, "input_len": 3, "output_len": 2.5}', "'output_len'"),
        ('{"arrival_s": 1, "input_len": 3, "output_len": true}', "'output_len'"),
        (
            '{"arrival_s": 1, "input_len": 3, "output_len": 4, "prompt_tokens": [1, 2]}',
            "'prompt_tokens': 2 tokens but input_len is 3",
        ),
        ('{"arrival_s": 1, "input_len": 2, "output_len": 4, "prompt_tokens": [1, "a"]}', "'prompt_tokens'"),
        ('{"arrival_s": 1, "input_len": 3, "output_len": 4, "prefix_group": "t1"}', "'prefix_group'"),
        ('{"arrival_s": 1, "input_len": 3, "output_len": 4, "session": 5}', "'session'"),
        ('{"arrival_s": 1, "input_len": 3, "output_len": 4, "isl": 3}', r"unknown field\(s\) \['isl'\]"),
    ],
)
def test_bad_trace_line_names_line_and_field(tmp_path, bad_line: str, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{bad_line}\n{GOOD}\n")  # the bad line is line 3 (blank line 2 is skipped)
    with pytest.raises(TraceFormatError, match=rf"bad\.jsonl:3: .*{expected}"):
        load_trace(path)


def test_out_of_order_arrivals_are_rejected(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 2.0, "input_len": 3, "output_len": 4}\n' + GOOD + "\n")
    with pytest.raises(TraceFormatError, match=r"t\.jsonl:2: field 'arrival_s'.*sorted"):
        load_trace(path)


# --------------------------------------------------------------------------------------------------
# Speed


@pytest.mark.parametrize("arrivals", sorted(wl.ARRIVALS))
def test_one_hour_at_50_rps_builds_fast(arrivals: str) -> None:
    rate = 50 * 3 / 7 if arrivals == "step" else 50  # step's rate is its base rate: mean 50 with the 5x third
    start = time.perf_counter()
    trace = build_trace(arrivals, "chat", rate=rate, duration_s=3600, seed=1)
    elapsed = time.perf_counter() - start
    assert len(trace) == pytest.approx(180_000, rel=0.3)
    assert elapsed < 2.0, f"{arrivals}: {len(trace)} requests took {elapsed:.2f} s"

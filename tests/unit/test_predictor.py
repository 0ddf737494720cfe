"""Predictor unit tests: capacity forms vs the simulator, fitting on synthetic profiles, artifact validation,
imports of vLLM bench results, and refusals with messages that say what is missing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kvscale.engine_stats import EngineStats, HistogramSnapshot
from kvscale.latency import LatencyModelError, latency_model_from_dict, load_latency_model, prefill_attn_term
from predictor.capacity import (
    SLO,
    aggregated_capacity_rps,
    decode_capacity,
    md1_wait_quantile,
    mg1_wait_quantile,
    predict_prefill_ttft_s,
    prefill_capacity_rps,
    prefill_capacity_tokens_per_s,
    prefill_service_moments,
)
from predictor.capacity_sim import CapacityCache, capacity
from predictor.dataset import DatasetError, read_requests, request_row, write_manifest, write_point
from predictor.fit import FitError, fit_profile, out_of_range
from predictor.importer import ImportError_, import_results
from predictor.profiler import ProfileConfig, build_points, steady_decode_window
from tests.unit.models_for_tests import LAT

H100 = load_latency_model("llama-3.1-8b-h100")


# -- capacity ----------------------------------------------------------------------------------------------------


def test_md1_quantile_matches_known_limits() -> None:
    assert md1_wait_quantile(0.05, 1.0, 0.9) == 0.0  # 95% of arrivals find the server idle
    assert md1_wait_quantile(1.0, 1.0, 0.9) == math.inf
    # The tail form keeps the exact M/D/1 mean: E[W] = rho*S / (2(1-rho)).
    rho, s = 0.8, 0.1
    qs = np.linspace(0.0005, 0.9995, 2000)
    mean = float(np.mean([md1_wait_quantile(rho, s, q) for q in qs]))
    assert mean == pytest.approx(rho * s / (2 * (1 - rho)), rel=0.05)


def test_mg1_keeps_the_pollaczek_khinchine_mean_and_prompt_spread_lowers_capacity() -> None:
    rho, s, scv = 0.8, 0.1, 0.9
    qs = np.linspace(0.0005, 0.9995, 2000)
    mean = float(np.mean([mg1_wait_quantile(rho, s, q, scv) for q in qs]))
    assert mean == pytest.approx(rho * s * (1 + scv) / (2 * (1 - rho)), rel=0.05)
    # No spread: exactly the M/D/1 forms at the mean prompt.
    assert prefill_service_moments(H100, 2048, 0.0, 0.0) == (H100.prefill_time(2048), 0.0)
    slo = SLO(1.0, 0.05)
    assert prefill_capacity_rps(H100, slo, 2048, 0.0, 0.0) == prefill_capacity_rps(H100, slo, 2048)
    # Log-normal prompts of the Azure code trace's spread (variance / mean^2 = 0.93): the service moments come
    # from the prompts: the fixed step cost narrows the spread, attention (quadratic) widens the long tail.
    m1, cs2 = prefill_service_moments(H100, 2048, 0.0, 0.93)
    assert H100.prefill_time(2048) < m1 and 0.6 < cs2 < 1.3
    spread, alike = prefill_capacity_rps(H100, slo, 2048, 0.0, 0.93), prefill_capacity_rps(H100, slo, 2048)
    assert 0 < spread < 0.95 * alike
    assert predict_prefill_ttft_s(H100, spread, 2048, 90, 0.0, 0.93) == pytest.approx(1.0, rel=1e-3)
    assert aggregated_capacity_rps(H100, slo, 2048, 27, isl_scv=0.93) < aggregated_capacity_rps(H100, slo, 2048, 27)
    with pytest.raises(ValueError, match="isl_scv"):
        prefill_service_moments(H100, 2048, 0.0, -1.0)


def test_prefill_capacity_is_monotone_in_the_slo_and_meets_it() -> None:
    tight = prefill_capacity_tokens_per_s(H100, SLO(0.2, 0.05), 1000)
    loose = prefill_capacity_tokens_per_s(H100, SLO(1.0, 0.05), 1000)
    assert 0 < tight < loose
    rate = tight / 1000
    assert predict_prefill_ttft_s(H100, rate, 1000, 90) <= 0.2 + 1e-6
    assert predict_prefill_ttft_s(H100, rate * 1.05, 1000, 90) > 0.2
    # An SLO below one prefill's service time leaves no capacity.
    assert prefill_capacity_tokens_per_s(H100, SLO(H100.prefill_time(1000) * 0.9, 0.05), 1000) == 0.0


def test_decode_capacity_is_the_largest_batch_meeting_the_itl_target() -> None:
    slo = SLO(1.0, 0.03)
    dc = decode_capacity(H100, slo, mean_context=1500, max_num_seqs=4096)
    assert dc.batch > 1
    assert H100.decode_step_time(dc.batch, dc.batch * 1500) <= 0.03
    assert H100.decode_step_time(dc.batch + 1, (dc.batch + 1) * 1500) > 0.03
    assert dc.tokens_per_s == pytest.approx(dc.batch / dc.step_s)
    assert decode_capacity(H100, SLO(1.0, H100.coefficients.base_s / 2), 1500).batch == 0


def test_simulated_and_analytic_capacity_agree_on_chat() -> None:
    slo = SLO(0.5, 0.05)
    for role in ("prefill", "aggregated"):
        r = capacity(H100, slo, "chat", role, min_requests=600, rel_tol=0.05)
        assert r.rate_rps > 0
        assert r.analytic_rps == pytest.approx(r.rate_rps, rel=0.35), r
        ok = [p for p in r.probes if p.ok]
        bad = [p for p in r.probes if not p.ok]
        assert ok and bad and max(p.rate_rps for p in ok) == r.rate_rps < min(p.rate_rps for p in bad)
    agg = aggregated_capacity_rps(H100, slo, 600, 250)
    assert agg > 0


def test_capacity_cache_computes_once() -> None:
    calls = []

    def fake(model, slo, workload, role, method, **kw):  # counts calls; returns a real analytic result
        calls.append(role)
        return capacity(model, slo, workload, role, "analytic")

    cache = CapacityCache(max_entries=2, compute=fake)
    slo = SLO(0.5, 0.05)
    assert cache.peek(H100, slo, "chat", "prefill") is None
    a = cache.get(H100, slo, "chat", "prefill")
    assert cache.get(H100, slo, "chat", "prefill") is a
    assert cache.peek(H100, slo, "chat", "prefill") is a
    cache.get(H100, slo, "chat", "decode")
    cache.get(H100, slo, "chat", "aggregated")
    assert len(cache) == 2 and calls == ["prefill", "decode", "aggregated"]


@pytest.mark.parametrize("bad", [dict(ttft_s=0, itl_s=0.05), dict(ttft_s=0.5, itl_s=-1),
                                 dict(ttft_s=0.5, itl_s=0.05, percentile=100)])  # fmt: skip
def test_slo_rejects_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError, match="SLO"):
        SLO(**bad)


# -- fitting -----------------------------------------------------------------------------------------------------


def synthetic_profile(
    root: Path, truth=LAT, overhead: float = 0.002, noise: float = 0.0, seed: int = 0,
    isls=(64, 256, 1024, 2048, 4096), batches=(1, 4, 16, 64), contexts=(256, 2048),
) -> None:  # fmt: skip
    """A profile whose latencies come from a known step-time model (optionally with multiplicative noise)."""
    rng = np.random.default_rng(seed)
    jitter = lambda: 1.0 + noise * rng.standard_normal()  # noqa: E731
    write_manifest(root, {"engine": "synthetic", "model": "m", "hardware": "none", "parameters": {}})
    for isl in isls:
        rows = [request_row(sweep="prefill", point_id=f"prefill-isl{isl}", isl_target=isl, osl_target=1,
                            concurrency=1, ok=True, status=200, prompt_tokens=isl, completion_tokens=1,
                            ttft_s=(overhead + truth.prefill_time(isl)) * jitter(), e2e_s=0.0)
                for _ in range(4)]  # fmt: skip
        write_point(root, f"prefill-isl{isl}", rows, [])
        cached = isl // 2
        rows = [request_row(sweep="prefix", point_id=f"prefix-isl{isl}", isl_target=isl, osl_target=1,
                            cached_target=cached, ok=True, status=200, prompt_tokens=isl, cached_tokens=cached,
                            completion_tokens=1,
                            ttft_s=(overhead + truth.prefill_time(isl - cached, cached)) * jitter())
                for _ in range(4)]  # fmt: skip
        write_point(root, f"prefix-isl{isl}", rows, [])
    osl = 32
    for ctx in contexts:
        for b in batches:
            step = truth.decode_step_time(b, round(b * (ctx + osl / 2)))
            rows = []
            for _ in range(b):
                ttft = 0.01
                itl = [step * jitter() for _ in range(osl - 1)]
                rows.append(request_row(sweep="decode", point_id=f"decode-c{b}-ctx{ctx}", isl_target=ctx,
                                        osl_target=osl, concurrency=b, ok=True, status=200, prompt_tokens=ctx,
                                        completion_tokens=osl, ttft_s=ttft, e2e_s=ttft + sum(itl),
                                        itl_s=itl))  # fmt: skip
            write_point(root, f"decode-c{b}-ctx{ctx}", rows, [])


def test_fit_recovers_a_known_model(tmp_path: Path) -> None:
    synthetic_profile(tmp_path)
    model, _ = fit_profile(tmp_path)
    c, t = model.coefficients, LAT.coefficients
    assert c.base_s == pytest.approx(t.base_s, rel=0.02)
    assert c.per_prefill_token_s == pytest.approx(t.per_prefill_token_s, rel=0.02)
    assert c.per_decode_seq_s == pytest.approx(t.per_decode_seq_s, rel=0.05)
    assert c.per_decode_ctx_s == pytest.approx(t.per_decode_ctx_s, rel=0.05)
    fit = model.extra["fit"]
    assert fit["ttft_overhead_s"] == pytest.approx(0.002, rel=0.05)
    assert fit["validation"]["ttft"]["mape"] < 0.01 and fit["validation"]["itl"]["mape"] < 0.01
    # The artifact round-trips through JSON and the simulator's loader, and flags queries outside its range.
    again = latency_model_from_dict(json.loads(model.dumps()))
    assert again.coefficients == model.coefficients and again.kind == "fitted"
    assert out_of_range(again, decode_batch=64) == []
    assert out_of_range(again, decode_batch=500) and "decode_batch=500" in out_of_range(again, decode_batch=500)[0]


def test_cross_validation_reports_noise(tmp_path: Path) -> None:
    synthetic_profile(tmp_path, noise=0.10, seed=3)
    model, _ = fit_profile(tmp_path)
    v = model.extra["fit"]["validation"]
    assert 0.005 < v["ttft"]["mape"] < 0.2 and 0.005 < v["itl"]["mape"] < 0.2
    assert v["ttft"]["p90_ape"] >= v["ttft"]["mape"] * 0.9


def test_fit_refuses_a_degenerate_profile_naming_what_is_missing(tmp_path: Path) -> None:
    synthetic_profile(tmp_path, isls=(512,), batches=(8,), contexts=(256,))
    with pytest.raises(FitError) as e:
        fit_profile(tmp_path)
    msg = str(e.value)
    assert "prefill sweep: 2 distinct prompt lengths measured" in msg
    assert "decode sweep: batches [8]" in msg and "--decode-concurrency" in msg
    empty = tmp_path / "empty"
    write_manifest(empty, {"model": "m"})
    with pytest.raises(FitError, match="no measured points"):
        fit_profile(empty)
    with pytest.raises(DatasetError, match=r"no manifest\.json"):
        fit_profile(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"version": 99}, "version"),
        ({"fit": {"range": {}, "validation": {"ttft": {"mape": "low", "p90_ape": 0.1}}}}, "fit.validation.ttft.mape"),
        ({"fit": {"range": {"decode_batch": [9, 1]}, "validation": {"ttft": {"mape": 0.1, "p90_ape": 0.1},
                                                                     "itl": {"mape": 0.1, "p90_ape": 0.1}}}},
         "fit.range.decode_batch"),  # fmt: skip
        ({"fit": None}, "fit"),
    ],
)
def test_malformed_fitted_artifacts_name_the_field(tmp_path: Path, patch: dict, field: str) -> None:
    synthetic_profile(tmp_path)
    model, _ = fit_profile(tmp_path)
    d = json.loads(model.dumps())
    d.update(patch)
    with pytest.raises(LatencyModelError, match=field.replace(".", r"\.")):
        latency_model_from_dict(d)


def test_fitted_attention_term_uses_cached_context(tmp_path: Path) -> None:
    # With a strong attention term, the prefix points (cached context) are what identify it.
    truth = latency_model_from_dict({**json.loads(LAT.dumps()), "step_time": {"form": "linear-v1", "coefficients": {
        **LAT.to_dict()["step_time"]["coefficients"], "per_prefill_attn_s": 2e-9}}})  # fmt: skip
    synthetic_profile(tmp_path, truth=truth)
    model, _ = fit_profile(tmp_path)
    assert model.coefficients.per_prefill_attn_s == pytest.approx(2e-9, rel=0.05)
    assert prefill_attn_term(10, 100) == 10 * 105


# -- profile grid ------------------------------------------------------------------------------------------------


def test_grid_drops_points_that_do_not_fit_context_or_kv_cache() -> None:
    cfg = ProfileConfig(endpoints=[], model="m", out=Path("."), prefill_isl=(128, 2048),
                        decode_concurrency=(1, 64), decode_context=(256,), decode_osl=64)  # fmt: skip
    points, dropped = build_points(cfg, max_model_len=1024, kv_tokens=8192)
    ids = {p.point_id for p in points}
    assert "prefill-isl128" in ids and "prefill-isl2048" not in ids
    assert "decode-c1-ctx256-osl64" in ids and "decode-c64-ctx256-osl64" not in ids
    assert any("max_model_len 1024" in d for d in dropped) and any("KV cache" in d for d in dropped)
    with pytest.raises(ValueError, match="unknown sweep"):
        build_points(ProfileConfig(endpoints=[], model="m", out=Path("."), sweeps=("prefil",)), None)


# -- import ------------------------------------------------------------------------------------------------------


def _bench_result(n: int = 5, **extra) -> dict:
    return {"date": "20261121-120000", "backend": "vllm", "model_id": "meta-llama/Llama-3.1-8B-Instruct",
            "request_rate": "inf", "max_concurrency": 4, "input_lens": [100 + i for i in range(n)],
            "output_lens": [10] * n, "ttfts": [0.05] * n, "itls": [[0.01] * 9] * n,
            "start_times": [1000.0 + i for i in range(n)], "errors": [""] * (n - 1) + ["boom"], **extra}  # fmt: skip


def test_import_vllm_bench_results(tmp_path: Path) -> None:
    f = tmp_path / "vllm-qps4.json"
    f.write_text(json.dumps(_bench_result()))
    out = tmp_path / "profile"
    assert import_results([f], out, hardware="1x H100") == ["import-vllm-qps4"]
    df = read_requests(out)
    assert len(df) == 5 and df.ok.sum() == 4
    assert df.prompt_tokens.tolist() == [100, 101, 102, 103, 104]
    assert df.e2e_s.iloc[0] == pytest.approx(0.05 + 0.09)
    assert import_results([f], out) == []  # idempotent


def test_import_refuses_files_without_per_request_detail(tmp_path: Path) -> None:
    f = tmp_path / "summary-only.json"
    d = _bench_result()
    for k in ("ttfts", "itls", "input_lens", "output_lens"):
        d.pop(k)
    f.write_text(json.dumps(d))
    with pytest.raises(ImportError_, match="--save-detailed"):
        import_results([f], tmp_path / "p")
    g = tmp_path / "bad.json"
    g.write_text("{not json")
    with pytest.raises(ImportError_, match="not JSON"):
        import_results([g], tmp_path / "p")
    h = tmp_path / "short.json"
    h.write_text(json.dumps(_bench_result(ttfts=[0.1])))
    with pytest.raises(ImportError_, match="'input_lens' has 5 entries"):
        import_results([h], tmp_path / "p")
    assert not (tmp_path / "p").exists()  # nothing half-imported


# -- engine-side statistics --------------------------------------------------------------------------------------


def _hist(values: list[float]) -> HistogramSnapshot:
    return HistogramSnapshot(((0.01, float(len(values))), (math.inf, float(len(values)))), sum(values), len(values))


def _stats(ttfts: list[float], itls: list[float], running: int, waiting: int, generated: float) -> EngineStats:
    return EngineStats(engine="vllm", at=0.0, running=running, waiting=waiting, kv_usage=0.0,
                       generation_tokens_total=generated, ttft=_hist(ttfts), itl=_hist(itls))  # fmt: skip


def test_steady_decode_window_needs_every_stream_decoding_throughout() -> None:
    start = _stats([0.1] * 5, [0.004] * 40, 0, 0, 100.0)
    a = _stats([0.1] * 5 + [0.02] * 4, [0.004] * 40 + [0.009] * 12, 4, 0, 100.0 + 4 * 4)  # 4 first tokens, mixed gaps
    z = _stats([0.1] * 5 + [0.02] * 4, [0.004] * 40 + [0.009] * 12 + [0.005] * 80, 4, 0, 116.0 + 80)
    w = steady_decode_window(start, a, z, batch=4, isl=256)
    assert w is not None and w["itl_count"] == 80 and w["itl_mean_s"] == pytest.approx(0.005)
    assert w["context_tokens"] == pytest.approx(4 * 256 + (16 + 96) / 2)
    # not all prefills done at the first snapshot; someone finished (or waits) at the second: no window
    assert steady_decode_window(start, _stats([0.1] * 8, [], 3, 1, 110.0), z, batch=4, isl=256) is None
    assert steady_decode_window(start, a, _stats([0.1] * 9, [0.004] * 132, 3, 0, 196.0), batch=4, isl=256) is None


def test_fit_uses_robust_engine_side_statistics(tmp_path: Path) -> None:
    """Per-request engine TTFTs and per-round steady decode windows, with one stalled request or round per point
    (the shared machine's scheduler), recover the model; client timings and per-point means would not."""
    synthetic_profile(tmp_path, noise=0.0)
    osl = 32
    for f in (tmp_path / "points").glob("*.parquet"):
        pid = f.stem
        rows = read_requests(tmp_path).query("point_id == @pid")
        if pid.startswith("decode"):
            b, ctx = int(rows.concurrency.iat[0]), int(rows.isl_target.iat[0])
            windows = []
            for k, stall in enumerate((1.0, 3.0, 1.0)):  # the second round was slowed 3x
                context = b * ctx + (b * (2 + k) + b * (20 + k)) / 2
                windows.append({"itl_mean_s": LAT.decode_step_time(b, round(context)) * stall, "itl_count": 18 * b,
                                "batch": b, "context_tokens": context})  # fmt: skip
            stats = {"engine_itl_mean_s": 1.0, "engine_steady_decode": windows}  # mean: polluted by prefills
        else:
            n, c = int(rows.prompt_tokens.iat[0] - rows.cached_tokens.iat[0]), int(rows.cached_tokens.iat[0])
            truth = 0.002 + LAT.prefill_time(n, c)
            stats = {"engine_ttft_mean_s": 1.0, "engine_ttft_s": [truth, truth, 5 * truth, truth]}
        corrupted = [{**r, "ttft_s": r["ttft_s"] * 1.5, "e2e_s": r["ttft_s"] * 1.5} for r in rows.to_dict("records")]
        write_point(tmp_path, pid, corrupted, [], stats)
    model, obs = fit_profile(tmp_path)
    c, t = model.coefficients, LAT.coefficients
    assert c.per_prefill_token_s == pytest.approx(t.per_prefill_token_s, rel=0.02)
    assert c.per_decode_seq_s == pytest.approx(t.per_decode_seq_s, rel=0.05)
    assert c.per_decode_ctx_s == pytest.approx(t.per_decode_ctx_s, rel=0.05)
    assert model.extra["fit"]["ttft_overhead_s"] == pytest.approx(0.002, rel=0.05)
    # clients saw 1.5x the engine's TTFT: the median gap is what sim serve adds for them
    pre = obs.meta[obs.meta.kind == "prefill"]
    assert model.extra["fit"]["client_overhead_s"] == pytest.approx(float(np.median(pre.y * 0.5)), rel=1e-6)
    assert set(obs.meta.source) == {"engine-median", "engine-steady"} and osl == 32
    assert model.extra["fit"]["validation"]["itl"]["mape"] < 0.01

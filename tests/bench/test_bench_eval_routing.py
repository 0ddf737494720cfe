"""Routing on real traces in virtual time (`kvscale eval routing`), and the virtual driver's fidelity.

* Every router policy (and every peer algorithm registered as ``peer:...``) on the Mooncake FAST'25 synthetic
  trace and on the Azure LLM 2023 code trace, 16 replicas of the built-in 8B-H100 model: TTFT/ITL/E2E
  percentiles, prefix-hit rate next to the trace's infinite-cache ceiling, load imbalance, wall seconds per
  simulated hour; goodput (highest --speed with P90 TTFT within the SLO) on Mooncake.
* Fidelity: the same trace slice and policies on 4 simulator pods in real time (`kvscale bench routing
  --trace-file`) and on the virtual clock with the same engine settings: P90 TTFT and hit rate side by side.

Figures are printed and written to bench-results/eval-routing-*.json; no timing assertions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from bench.routing import BenchConfig, scaled_latency_model
from bench.routing import run as run_real_time
from kvscale.latency import load_latency_model
from kvscale.traces import import_trace, rate_scale, window
from router.evaluate.cli import table
from router.evaluate.dispatch import policy_names
from router.evaluate.run import RoutingSetup, evaluate, goodput, run_policy
from simulator.engine import EngineConfig
from simulator.scheduler import SchedulerConfig

DATA = Path(__file__).resolve().parents[2] / "data" / "traces"
FULL = os.environ.get("KVSCALE_BENCH_FULL", "") not in ("", "0")
SLO_S = 3.0  # P90 TTFT target of the goodput search (the unloaded P90 on Mooncake's long prompts is ~1.9 s)


def _policies() -> list[str]:
    ours = ["round-robin", "random", "least-request", "prefix", "kv-events", "best"]
    return ours + [p for p in policy_names() if p.startswith("peer:")]


def _show(result: dict) -> None:
    Console(width=200).print(table(result))


@pytest.mark.timeout(5400)
def test_routing_on_mooncake_and_azure(record_bench, tmp_path) -> None:
    lat = load_latency_model("llama-3.1-8b-h100")
    setup = RoutingSetup(lat, replicas=16)
    mooncake = import_trace("mooncake", DATA / "mooncake-fast25-synthetic.jsonl")
    res = evaluate(mooncake, setup, _policies(), ttft_slo_s=SLO_S if FULL else None)
    res.update(trace="mooncake-fast25-synthetic", requests=len(mooncake), ttft_slo_s=SLO_S if FULL else None)
    span_h = (mooncake[-1].arrival_s - mooncake[0].arrival_s) / 3600
    for r in res["policies"].values():
        r["wall_s_per_simulated_hour"] = r["wall_s"] / span_h
    _show(res)
    record_bench("eval-routing-mooncake", res)
    azure = import_trace("azure", DATA / "azure-llm-2023-code.csv")
    az = evaluate(azure, setup, _policies())
    az.update(trace="azure-llm-2023-code", requests=len(azure))
    _show(az)
    record_bench("eval-routing-azure-code", az)
    for r in (*res["policies"].values(), *az["policies"].values()):
        assert r["completed"] > 0.99 * r["requests"]


@pytest.mark.timeout(3600)
def test_virtual_driver_matches_real_time_pods(record_bench, tmp_path) -> None:
    """4 simulator pods behind `kvscale router serve` (and the real SGLang gateway) vs the virtual cluster (our
    policy objects, and our implementation of SGLang's cache_aware), same trace slice and engine."""
    # minutes 14-16 of the trace (its most shared stretch: 0.51 infinite-cache reuse, 0.23 after thinning), thinned
    # to a quarter so that 4 pods (not 16) carry it
    trace = rate_scale(window(import_trace("mooncake", DATA / "mooncake-fast25-synthetic.jsonl"), 840, 960), 0.25)
    virtual_of = {"round-robin": "round-robin", "kv-events": "kv-events",
                  "sglang-router:cache_aware": "peer:sglang-cache-aware"}  # live name -> the virtual policy
    policies = list(virtual_of)
    blocks, mnbt, ctx = 25720, 2048, 131072
    cfg = BenchConfig(backends=4, policies=policies, slowdown=1.0, num_gpu_blocks=blocks, max_num_batched_tokens=mnbt,
                      trace=trace, max_model_len=ctx)  # fmt: skip
    real = run_real_time(cfg)
    lat = load_latency_model(str(scaled_latency_model(cfg, tmp_path)))
    engine = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=mnbt, max_model_len=ctx),
                          num_gpu_blocks=blocks, materialize_outputs=False)  # fmt: skip
    setup = RoutingSetup(lat, replicas=4, engine=engine)
    rows = {}
    for p in policies:
        v, r = run_policy(trace, virtual_of[p], setup), real["policies"][p]
        rows[p] = {"requests": len(trace), "real_ttft_p90_s": r.get("ttft_p90_s"),
                   "virtual_ttft_p90_s": v["ttft_p90_s"],
                   "real_hit_rate": r.get("prefix_hit_rate"), "virtual_hit_rate": v["prefix_hit_rate"],
                   "real_errors": r.get("errors"), "virtual_wall_s": v["wall_s"]}  # fmt: skip
        if r.get("ttft_p90_s"):
            rows[p]["ttft_p90_rel_diff"] = v["ttft_p90_s"] / r["ttft_p90_s"] - 1
        if r.get("prefix_hit_rate") is not None:
            rows[p]["hit_rate_abs_diff"] = v["prefix_hit_rate"] - r["prefix_hit_rate"]
    print(json.dumps(rows, indent=2))
    record_bench("eval-routing-fidelity", {"policies": rows, "pods": 4, "goal": "P90 TTFT within 15%, hit rate 0.05"})
    for p in policies:
        assert real["policies"][p].get("requests", 0) == len(trace)


# Each peer's documented knobs around its defaults (the first entry of each list is the default).
PEER_SWEEPS: dict[str, list[tuple[str, dict]]] = {
    "peer:sglang-cache-aware": [
        (f"cache_threshold={c},balance_abs={a},balance_rel={r}",
         {"picker": {"type": "sglang-cache-aware", "config": {"cache_threshold": c, "balance_abs_threshold": a,
                                                               "balance_rel_threshold": r}}})
        for c, a, r in ((0.3, 64, 1.5), (0.1, 64, 1.5), (0.5, 64, 1.5), (0.3, 8, 1.1), (0.3, 16, 1.2),
                        (0.1, 8, 1.1))
    ],  # fmt: skip
    "peer:llm-d": [
        (f"queue={q},kv={k},prefix={p}",
         {"scorers": [{"type": "llm-d-queue", "weight": q}, {"type": "llm-d-kv-utilization", "weight": k},
                      {"type": "llm-d-prefix", "weight": p}], "picker": {"type": "max-score"}})
        for q, k, p in ((2, 2, 3), (1, 1, 3), (2, 2, 6), (2, 1, 3), (1, 1, 1))
    ],  # fmt: skip
    "peer:llm-d-precise": [
        (f"prefix={p},kv={k},queue={q}",
         {"scorers": [{"type": "llm-d-precise-prefix", "weight": p}, {"type": "llm-d-kv-utilization", "weight": k},
                      {"type": "llm-d-queue", "weight": q}], "picker": {"type": "max-score"}})
        for p, k, q in ((2, 1, 1), (3, 2, 2), (4, 1, 1), (1, 1, 1))
    ],  # fmt: skip
    "peer:dynamo-kv": [
        (f"overlap_score_weight={w},temperature={t}",
         {"picker": {"type": "dynamo-kv", "config": {"overlap_score_weight": w, "temperature": t}}})
        for w, t in ((1.0, 0.0), (0.5, 0.0), (2.0, 0.0), (4.0, 0.0), (1.0, 0.5))
    ],  # fmt: skip
}


@pytest.mark.timeout(5400)
def test_peers_at_their_best_and_goodput(record_bench) -> None:
    """On a 4-replica slice (minutes 14-16 of Mooncake, its most shared stretch): every peer's knob sweep (default
    first), then the goodput (highest --speed with P90 TTFT <= the SLO) of ours and of each peer at its best."""
    lat = load_latency_model("llama-3.1-8b-h100")
    trace = window(import_trace("mooncake", DATA / "mooncake-fast25-synthetic.jsonl"), 840, 960)
    extra = {f"{peer}[{label}]": spec for peer, sweep in PEER_SWEEPS.items() for label, spec in sweep}
    setup = RoutingSetup(lat, replicas=4, extra_policies=extra)
    sweeps: dict[str, dict] = {}
    best: dict[str, str] = {}
    for peer, sweep in PEER_SWEEPS.items():
        rows = {label: run_policy(trace, f"{peer}[{label}]", setup) for label, _ in sweep}
        sweeps[peer] = {k: {m: v[m] for m in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "prefix_hit_rate")}
                        for k, v in rows.items()}  # fmt: skip
        best[peer] = f"{peer}[{min(rows, key=lambda k: rows[k]['ttft_p90_s'])}]"
        print(peer, json.dumps(sweeps[peer], indent=1))
    slo = 6.0  # unloaded P90 TTFT of this slice is ~3 s (18.6k-token mean prompts)
    names = ["round-robin", "least-request", "prefix", "kv-events", "best", *best.values()]
    good = {n: goodput(trace, n, setup, slo, lo=1 / 8, hi=8.0, steps=5) for n in names}
    for n, g in good.items():
        print(f"goodput {n}: speed {g['speed']:.3g}x = {g['rate_rps']:.2f} req/s")
    ours = max(good[n]["rate_rps"] for n in ("prefix", "kv-events", "best"))
    peers = max(good[n]["rate_rps"] for n in best.values())
    summary = {"kvscale_best_vs_best_peer": ours / peers if peers else None,
               "kvscale_best_vs_round_robin": ours / good["round-robin"]["rate_rps"]
               if good["round-robin"]["rate_rps"] else None}  # fmt: skip
    print(json.dumps(summary))
    record_bench("eval-routing-peers", {"sweeps": sweeps, "best_settings": best, "goodput": good, "slo_s": slo,
                                        "window": [840, 960], "replicas": 4, **summary})  # fmt: skip
    assert all(g["runs"] for g in good.values())

"""Predictor figures (issue "Profiler and predictor"), printed and written to bench-results/predictor.json:

* held-out MAPE / p90 error of TTFT and ITL on vLLM CPU, profiled and fitted in this run (goal <= 5% each);
* simulator-with-fitted-model vs vLLM CPU under the same load: relative error of TTFT/ITL p50/p90 (goal <= 15%);
* profiling wall time of the default grid on the simulator and on vLLM CPU;
* the same fidelity loop on the 41M-parameter "small" random model (``cached_tiny_model("small")``), whose vLLM CPU
  steps are mostly compute (~20 ms) instead of the tiny model's fixed per-step overhead (1.5-3.5 ms), written to
  bench-results/predictor_small_model.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from predictor.profiler import ProfileConfig, run_profile

# The session's one vLLM CPU server (tests/integration/conftest.py), shared with the other benchmarks that use it.
from tests.integration.conftest import tiny_model_dir, vllm_server  # noqa: F401
from tests.integration.test_profiler import VLLM_GRID, _sim, fidelity_loop


def _fidelity(fid: dict) -> dict:
    out = {k: fid[k] for k in ("validation", "vllm", "sim", "relative_error", "profile_wall_s")}
    fit = fid["artifact"]["fit"]
    out["overheads_s"] = {k: fit.get(k, 0.0) for k in ("ttft_overhead_s", "client_overhead_s")}
    out["coefficients"] = fid["artifact"]["step_time"]["coefficients"]
    return out


def _default_grid_wall(url: str, model: str, out: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    summary = run_profile(ProfileConfig(endpoints=[url], model=model, out=out))
    return time.perf_counter() - t0, len(summary.measured)


# The default grid's load sweep alone is up to 7 rates x 30 s per endpoint; on two shared cores the whole benchmark
# takes 15-30 minutes. Results are written after each phase, so a late failure keeps the earlier figures.
@pytest.mark.timeout(2700)
def test_bench_predictor(record_bench, vllm_server, tmp_path: Path) -> None:  # noqa: F811
    results: dict = {}
    default_grid = os.environ.get("KVSCALE_BENCH_DEFAULT_GRID", "1") == "1"
    results["fidelity"] = _fidelity(fidelity_loop(vllm_server, tmp_path / "fidelity", VLLM_GRID, rate=8.0, n=200))
    record_bench("predictor", results)
    _table(results, "tiny model")
    if default_grid:
        wall, n = _default_grid_wall(vllm_server.url, vllm_server.model, tmp_path / "default-vllm")
        results["default_grid_vllm_cpu"] = {"wall_s": wall, "points": n}
        record_bench("predictor", results)
        proc, url = _sim(tmp_path)
        try:
            wall, n = _default_grid_wall(url, "sim-model", tmp_path / "default-sim")
            results["default_grid_simulator"] = {"wall_s": wall, "points": n}
        finally:
            proc.stop()
        record_bench("predictor", results)
        _table(results, "tiny model")


@pytest.mark.timeout(1800)
def test_bench_predictor_small_model(record_bench, tmp_path: Path) -> None:
    """The fidelity loop on the small model: its own vLLM CPU server (the session's tiny-model server stays idle),
    a lower load (4 req/s: a small-model replica serves ~10x less than a tiny one)."""
    from harness.tinymodel import cached_tiny_model
    from harness.vllm_server import start_vllm_cpu

    model_dir = cached_tiny_model("small")
    server = start_vllm_cpu(model_dir, log_path=tmp_path / "vllm-small.log", num_gpu_blocks=512)
    try:
        fid = fidelity_loop(server, tmp_path / "fidelity", VLLM_GRID, rate=4.0, n=120)
    finally:
        server.stop()
    results = {"model": json.loads((model_dir / "config.json").read_text()), "fidelity": _fidelity(fid)}
    record_bench("predictor_small_model", results)
    _table(results, "small model (41M)")


def _table(results: dict, model: str) -> None:
    v = results["fidelity"]["validation"]
    t = Table(title=f"predictor, {model}: held-out error on vLLM CPU (goal <= 5%) and sim vs vLLM (goal <= 15%)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for kind in ("ttft", "itl"):
        t.add_row(f"{kind.upper()} held-out MAPE / p90", f"{v[kind]['mape']:.1%} / {v[kind]['p90_ape']:.1%}")
    for k, e in results["fidelity"]["relative_error"].items():
        t.add_row(f"sim vs vLLM {k}", f"{e:+.1%} (vLLM {results['fidelity']['vllm'][k] * 1e3:.1f} ms)")
    o = results["fidelity"].get("overheads_s", {})
    t.add_row("fitted TTFT overhead engine / client", f"{o.get('ttft_overhead_s', 0) * 1e3:.2f} / "
              f"{o.get('client_overhead_s', 0) * 1e3:.2f} ms")  # fmt: skip
    t.add_row("reduced-grid profile wall (vLLM CPU)", f"{results['fidelity']['profile_wall_s']:.1f} s")
    for key in ("default_grid_vllm_cpu", "default_grid_simulator"):
        if key in results:
            t.add_row(f"{key} wall", f"{results[key]['wall_s']:.1f} s ({results[key]['points']} points)")
    Console(width=120).print(t)

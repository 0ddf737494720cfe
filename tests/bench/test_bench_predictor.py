"""Predictor figures (issue "Profiler and predictor"), printed and written to bench-results/predictor.json:

* held-out MAPE / p90 error of TTFT and ITL on vLLM CPU, profiled and fitted in this run (goal <= 5% each);
* simulator-with-fitted-model vs vLLM CPU under the same load: relative error of TTFT/ITL p50/p90 (goal <= 15%);
* profiling wall time of the default grid on the simulator and on vLLM CPU.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvscale.testing.tinymodel import MODEL_VERSION, build_tiny_model
from kvscale.testing.vllm_server import start_vllm_cpu
from predictor.profiler import ProfileConfig, run_profile
from tests.integration.test_profiler import VLLM_GRID, _sim, fidelity_loop


def _default_grid_wall(url: str, model: str, out: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    summary = run_profile(ProfileConfig(endpoints=[url], model=model, out=out))
    return time.perf_counter() - t0, len(summary.measured)


def test_bench_predictor(record_bench, tmp_path: Path) -> None:
    results: dict = {}
    model_dir = build_tiny_model(Path(tempfile.gettempdir()) / "kvscale-tiny-model" / MODEL_VERSION)
    server = start_vllm_cpu(model_dir, log_path=tmp_path / "vllm.log", num_gpu_blocks=256)
    try:
        fid = fidelity_loop(server, tmp_path / "fidelity", VLLM_GRID, rate=8.0, n=200)
        results["fidelity"] = {k: fid[k] for k in ("validation", "vllm", "sim", "relative_error", "profile_wall_s")}
        if os.environ.get("KVSCALE_BENCH_DEFAULT_GRID", "1") == "1":
            wall, n = _default_grid_wall(server.url, server.model, tmp_path / "default-vllm")
            results["default_grid_vllm_cpu"] = {"wall_s": wall, "points": n}
    finally:
        server.stop()
    if os.environ.get("KVSCALE_BENCH_DEFAULT_GRID", "1") == "1":
        proc, url = _sim(tmp_path)
        try:
            wall, n = _default_grid_wall(url, "sim-model", tmp_path / "default-sim")
            results["default_grid_simulator"] = {"wall_s": wall, "points": n}
        finally:
            proc.stop()
    record_bench("predictor", results)

    v = results["fidelity"]["validation"]
    t = Table(title="predictor: held-out error on vLLM CPU (goal <= 5%) and sim vs vLLM (goal <= 15%)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for kind in ("ttft", "itl"):
        t.add_row(f"{kind.upper()} held-out MAPE / p90", f"{v[kind]['mape']:.1%} / {v[kind]['p90_ape']:.1%}")
    for k, e in results["fidelity"]["relative_error"].items():
        t.add_row(f"sim vs vLLM {k}", f"{e:+.1%} (vLLM {results['fidelity']['vllm'][k] * 1e3:.1f} ms)")
    t.add_row("reduced-grid profile wall (vLLM CPU)", f"{results['fidelity']['profile_wall_s']:.1f} s")
    for key in ("default_grid_vllm_cpu", "default_grid_simulator"):
        if key in results:
            t.add_row(f"{key} wall", f"{results[key]['wall_s']:.1f} s ({results[key]['points']} points)")
    Console(width=120).print(t)

"""``kvscale profile compare``: latency models side by side, the view a user takes before choosing hardware.

For each model: decode step time against batch size at two contexts, one prefill against its token count, the
KV-cache capacity, and the request rate one aggregated replica sustains under a TTFT/ITL SLO (the analytic
capacity of ``predictor.capacity``, which the scaler uses too). Printed as a table; ``--plot`` draws the curves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvscale.latency import LatencyModel, LatencyModelError, load_latency_model
from predictor.capacity import SLO, analytic_capacity_rps
from predictor.capacity_sim import workload_shape
from simulator.workload import WORKLOADS

BATCHES = (1, 8, 32, 64, 128, 256)
CONTEXTS = (1024, 4096)
PREFILL_TOKENS = (128, 512, 1024, 2048, 4096, 8192)


class CompareError(ValueError):
    """Bad models or arguments; the message says which."""


def figures(model: LatencyModel, slo: SLO, workload: str) -> dict[str, Any]:
    """The numbers ``compare`` shows for one model."""
    shape = workload_shape(workload)
    return {
        "name": model.name,
        "kind": model.kind,
        "hardware": model.hardware,
        "decode_step_s": {str(ctx): {str(b): model.decode_step_time(b, b * ctx) for b in BATCHES} for ctx in CONTEXTS},
        "prefill_s": {str(n): model.prefill_time(n) for n in PREFILL_TOKENS},
        "kv_cache_tokens": model.num_gpu_blocks() * model.block_size(),
        "capacity_rps": {role: analytic_capacity_rps(model, slo, shape, role) for role in ("aggregated", "prefill",
                                                                                            "decode")},
    }  # fmt: skip


def compare(specs: list[str], *, ttft_slo_s: float, itl_slo_s: float, workload: str = "chat",
            plot: str | None = None, json_out: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    from rich.console import Console
    from rich.table import Table

    if len(specs) < 2:
        raise CompareError("give at least two latency models to compare")
    if workload not in WORKLOADS:
        raise CompareError(f"unknown workload {workload!r} (known: {sorted(WORKLOADS)})")
    if ttft_slo_s <= 0 or itl_slo_s <= 0:
        raise CompareError("SLOs must be positive")
    try:
        models = [load_latency_model(s) for s in specs]
    except LatencyModelError as e:
        raise CompareError(str(e)) from e
    slo = SLO(ttft_slo_s, itl_slo_s, 90.0)
    rows = [figures(m, slo, workload) for m in models]
    table = Table(title=f"latency models compared (capacity: {workload}, TTFT p90 <= {1e3 * ttft_slo_s:g} ms, "
                        f"ITL p90 <= {1e3 * itl_slo_s:g} ms)")  # fmt: skip
    table.add_column("figure")
    for m in models:
        table.add_column(f"{m.name}\n({m.kind})", justify="right")
    for ctx in CONTEXTS:
        for b in (1, 32, 128):
            table.add_row(f"decode step, batch {b}, {ctx} ctx each",
                          *(f"{1e3 * r['decode_step_s'][str(ctx)][str(b)]:.2f} ms" for r in rows))  # fmt: skip
    for n in (128, 1024, 8192):
        table.add_row(f"prefill of {n} tokens", *(f"{1e3 * r['prefill_s'][str(n)]:.1f} ms" for r in rows))
    table.add_row("KV cache (tokens)", *(f"{r['kv_cache_tokens']:,}" for r in rows))
    for role in ("aggregated", "prefill", "decode"):
        table.add_row(f"capacity, {role} replica (req/s)", *(f"{r['capacity_rps'][role]:.2f}" for r in rows))
    Console(width=160).print(table)
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2) + "\n")
    if plot:
        _plot(rows, plot, f"{workload}, TTFT {1e3 * ttft_slo_s:g} ms / ITL {1e3 * itl_slo_s:g} ms")
    return rows


def _plot(rows: list[dict[str, Any]], path: str, slo_text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    for r in rows:
        for ctx, style in zip(CONTEXTS, ("-", "--"), strict=True):
            ax[0].plot(BATCHES, [1e3 * r["decode_step_s"][str(ctx)][str(b)] for b in BATCHES], style, marker="o",
                       label=f"{r['name']} ({ctx} ctx)")  # fmt: skip
        ax[1].plot(PREFILL_TOKENS, [1e3 * r["prefill_s"][str(n)] for n in PREFILL_TOKENS], marker="o",
                   label=r["name"])  # fmt: skip
    ax[0].set(xlabel="decode batch (sequences)", ylabel="step time (ms)", title="decode step", xscale="log")
    ax[1].set(xlabel="prompt tokens", ylabel="prefill time (ms)", title="one prefill", xscale="log", yscale="log")
    names = [r["name"] for r in rows]
    ax[2].barh(names, [r["capacity_rps"]["aggregated"] for r in rows])
    ax[2].set(xlabel="req/s per aggregated replica", title=f"capacity\n({slo_text})")
    for a in ax[:2]:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""What an evaluation's results say: the issue's goal check, the table, the load/replicas plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def goal_check(res: dict[str, Any]) -> dict[str, Any]:
    """The issue's goal: kvscale >= 99% attainment, GPU-hours <= 1.10 x oracle and >= 25% below the best baseline
    or peer autoscaler that also reaches 99%."""
    pol = res["policies"]
    k = pol.get("kvscale")
    if k is None:
        return {}
    out: dict[str, Any] = {"attainment_ok": k["slo_attainment"] >= 0.99}
    rb = res.get("reactive_bound")
    if rb:
        out["reactive_bound"] = rb["slo_attainment"]
        out["reachable"] = bool(rb["slo_attainment"] >= 0.99)
    if "oracle" in pol:
        out["vs_oracle"] = k["gpu_hours"] / pol["oracle"]["gpu_hours"]
        out["oracle_ok"] = out["vs_oracle"] <= 1.10
    others = [v for n, v in pol.items() if n in ("static-peak", "keda-queue", "hpa-kv") or n.startswith("peer:")]
    baselines = [v for v in others if v["slo_attainment"] >= 0.99]
    if baselines:
        best = min(b["gpu_hours"] for b in baselines)
        out["saving_vs_best_baseline"] = 1.0 - k["gpu_hours"] / best
        out["baseline_ok"] = out["saving_vs_best_baseline"] >= 0.25
    return out


def print_table(res: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title=f"kvscale eval scaling: {res['trace']} x {res['workload']} ({res['pools']}), {res['requests']} requests "
        f"at {res['rate_rps']:.2f} req/s mean, startup {res['startup_s']:.0f}s, SLO TTFT {res['slo']['ttft_s']:.2f}s "
        f"ITL {res['slo']['itl_s'] * 1000:.0f}ms"
    )
    cols = ("policy", "GPU-hours", "SLO attainment", "TTFT p90", "TTFT p99", "ITL p90", "scale events", "killed",
            "wall")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "policy" else "right")
    for name, p in res["policies"].items():
        table.add_row(
            name, f"{p['gpu_hours']:.2f}", f"{p['slo_attainment'] * 100:.2f}%", f"{p['ttft_p90_s']:.3f}s",
            f"{p['ttft_p99_s']:.3f}s", f"{p['itl_p90_s'] * 1000:.1f}ms", str(p["scale_events"]),
            str(p.get("requests_killed_by_scale_down", 0)), f"{p['wall_s']:.1f}s",
        )  # fmt: skip
    console.print(table)
    for name, pools in (res.get("hpa") or {}).items():
        for pool, text in pools.items():
            console.print(f"  HPA of {name} ({pool}): {text}", soft_wrap=True)
    g = res.get("goal") or {}
    if g:
        parts = [f"kvscale attainment >= 99%: {'yes' if g['attainment_ok'] else 'NO'}"]
        if "reactive_bound" in g:
            parts.append(f"reactive bound {g['reactive_bound'] * 100:.1f}%"
                         + ("" if g["reachable"] else " (99% out of reach without standing headroom)"))  # fmt: skip
        if "vs_oracle" in g:
            parts.append(f"GPU-hours / oracle = {g['vs_oracle']:.3f} ({'ok' if g['oracle_ok'] else 'over 1.10'})")
        if "saving_vs_best_baseline" in g:
            parts.append(f"saving vs best 99% baseline = {g['saving_vs_best_baseline'] * 100:.1f}% "
                         f"({'ok' if g['baseline_ok'] else 'under 25%'})")  # fmt: skip
        else:
            parts.append("no baseline reached 99%")
        console.print("goal: " + "; ".join(parts))


def plot(res: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    load = np.array(res["load"])
    ax1.plot(load[:, 0] / 60, load[:, 1], color="black")
    ax1.set_ylabel("arrivals (req/s, 1-min mean)")
    ax1.set_title(f"{res['trace']} x {res['workload']} ({res['pools']})")
    for name, series in res["timelines"].items():
        if not series:
            continue
        s = np.array(series, dtype=np.float64)
        ax2.step(s[:, 0] / 60, s[:, 1], where="post", label=name)
    ax2.set_xlabel("time (min)")
    ax2.set_ylabel("replicas (incl. starting)")
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

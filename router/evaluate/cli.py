"""``kvscale eval routing`` (registered by kvscale.cli under ``eval``): the arguments, the table, the plot.

Importing this module loads neither the simulator nor the router's policies; :func:`run_cli` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvscale.latency import DEFAULT_MODEL
from kvscale.traces.cli import positive_number, resized, window_arg

DEFAULT_POLICIES = "round-robin,random,least-request,prefix,kv-events,best"


def pools_arg(text: str) -> tuple[int, int]:
    try:
        p, d = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P:D (prefill and decode replicas), got {text!r}") from None
    if p < 1 or d < 1:
        raise argparse.ArgumentTypeError(f"P and D must be >= 1, got {text!r}")
    return p, d


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``routing`` to ``kvscale eval`` (``sub``: the eval group's subparsers)."""
    p = sub.add_parser("routing", help="replay a trace over a virtual cluster under each router policy")
    p.add_argument("--trace-file", required=True, type=Path, help="a trace (kvscale JSONL, or --format)")
    p.add_argument("--format", default="kvscale", choices=("kvscale", "mooncake", "azure", "burstgpt"))
    p.add_argument("--replicas", type=int, default=16)
    p.add_argument("--pools", type=pools_arg, metavar="P:D", help="P/D pools: P prefill and D decode replicas")
    p.add_argument("--latency-model", default=DEFAULT_MODEL, help="built-in name or a fitted artifact (JSON)")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated router policies (presets or "
                   "--policy-config names)")  # fmt: skip
    p.add_argument("--policy-config", type=Path, help='{"policies": {NAME: spec}}, as for kvscale router serve')
    p.add_argument("--window", type=window_arg, metavar="START:END", help="replay only [START, END) s of the trace")
    p.add_argument("--speed", type=positive_number, metavar="X", help="compress time X times")
    p.add_argument("--rate-scale", type=positive_number, metavar="X", help="X times the rate at the same span")
    p.add_argument("--sync-interval-s", type=positive_number, default=0.2, help="the router's scrape interval")
    p.add_argument("--kv-event-delay-ms", type=float, default=50.0, help="KV events reach the router this late")
    p.add_argument("--kv-event-drop", type=float, default=0.0, help="probability a replica's event batch is lost")
    p.add_argument("--goodput", action="store_true", help="also find each policy's highest speed within the SLO")
    p.add_argument("--ttft-slo-ms", type=positive_number, default=2000.0, help="P90 TTFT target of --goodput")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path, help="TTFT percentiles and prefix-hit rate per policy (PNG)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvscale.latency import load_latency_model
    from router.evaluate.dispatch import policy_names
    from router.evaluate.run import RoutingSetup, evaluate
    from router.policies import PluginConfigError, load_policy_file

    console = Console(stderr=True)
    try:
        extra = load_policy_file(args.policy_config) if args.policy_config else {}
        names = [n.strip() for n in args.policies.split(",") if n.strip()]
        unknown = sorted(set(names) - set(policy_names(extra)))
        if unknown or not names:
            raise ValueError(f"unknown router policy {unknown or names}; known: {', '.join(policy_names(extra))}")
        if args.replicas < 1:
            raise ValueError("--replicas must be >= 1")
        if args.kv_event_delay_ms < 0 or not 0 <= args.kv_event_drop <= 1:
            raise ValueError("--kv-event-delay-ms must be >= 0 and --kv-event-drop in [0, 1]")
        latency = load_latency_model(args.latency_model)
        trace = resized(args)
        if len(trace) < 2:
            raise ValueError("the trace (after --window) has fewer than 2 requests")
    except (ValueError, OSError, PluginConfigError) as e:
        print(f"kvscale eval routing: error: {e}", file=sys.stderr)
        return 2
    setup = RoutingSetup(latency, replicas=args.replicas, pools=args.pools, sync_interval_s=args.sync_interval_s,
                         kv_event_delay_s=args.kv_event_delay_ms / 1000, kv_event_drop=args.kv_event_drop,
                         seed=args.seed, extra_policies=extra)  # fmt: skip
    result = evaluate(trace, setup, names, ttft_slo_s=args.ttft_slo_ms / 1000 if args.goodput else None,
                      progress=lambda n: console.print(f"[dim]policy {n} ...[/dim]"))  # fmt: skip
    result.update(trace=str(args.trace_file), format=args.format, window=args.window, speed=args.speed,
                  rate_scale=args.rate_scale, requests=len(trace), seed=args.seed,
                  ttft_slo_ms=args.ttft_slo_ms if args.goodput else None)  # fmt: skip
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    Console(width=200).print(table(result))
    if args.plot:
        plot(result, args.plot)
    return 0


def table(result: dict[str, Any]):
    from rich.table import Table

    ceiling = result["prefix_reuse_ceiling"]
    size = f"{result['pools'][0]}P:{result['pools'][1]}D" if result.get("pools") else f"{result['replicas']}"
    t = Table(title=f"{result['trace']}: {result['requests']} requests, {size} replicas of "
                    f"{result['latency_model']} (prefix-reuse ceiling {ceiling:.1%})")  # fmt: skip
    cols = ["policy", "TTFT p50", "p90", "p99", "ITL p50", "p90", "E2E p90", "hit rate", "req/s", "imbalance"]
    goodput = any("goodput" in r for r in result["policies"].values())
    for c in [*cols, *(["goodput (x speed, req/s)"] if goodput else []), "wall s"]:
        t.add_column(c, justify="left" if c == "policy" else "right")
    for name, r in result["policies"].items():
        row = [name, *(f"{r[k]:.3f}" for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s")),
               *(f"{r[k] * 1000:.1f} ms" for k in ("itl_p50_s", "itl_p90_s")), f"{r['e2e_p90_s']:.2f}",
               f"{r['prefix_hit_rate']:.3f}", f"{r['throughput_rps']:.2f}", f"{r['load_imbalance']:.2f}"]  # fmt: skip
        if goodput:
            g = r.get("goodput", {})
            row.append(f"{g.get('speed', 0):.3g}x, {g.get('rate_rps', 0):.2f}")
        row.append(f"{r['wall_s']:.1f}")
        t.add_row(*row)
    return t


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(result["policies"])
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (k, label) in enumerate((("ttft_p50_s", "p50"), ("ttft_p90_s", "p90"), ("ttft_p99_s", "p99"))):
        a.bar(x + (i - 1) * 0.27, [result["policies"][n][k] for n in names], 0.27, label=label)
    a.set(xticks=x, ylabel="TTFT (s)", title="TTFT per policy")
    a.set_xticklabels(names, rotation=30, ha="right")
    a.legend()
    b.bar(x, [result["policies"][n]["prefix_hit_rate"] for n in names])
    b.axhline(result["prefix_reuse_ceiling"], color="k", ls="--", label="infinite-cache ceiling")
    b.set(xticks=x, ylabel="prompt tokens from cache", title="prefix-hit rate", ylim=(0, 1))
    b.set_xticklabels(names, rotation=30, ha="right")
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)

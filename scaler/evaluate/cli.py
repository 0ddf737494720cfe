"""``kvscale eval scaling`` (registered by kvscale.cli): the arguments, and the run behind them.

Importing this module loads neither the simulator nor the evaluation: building the parser reads the workload
names (``simulator.workload``), and :func:`run_cli` imports the evaluation when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvscale.latency import DEFAULT_MODEL
from scaler.evaluate import POLICIES, TRACES

if TYPE_CHECKING:
    from scaler.evaluate.run import EvalConfig


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``scaling`` to ``kvscale eval`` (``sub``: the eval group's subparsers)."""
    scaling = sub.add_parser("scaling", help="replay a trace under KEDA+HPA with kvscale and baseline policies")
    add_eval_args(scaling)
    scaling.set_defaults(func=run_cli)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from kvscale.traces.cli import positive_number, window_arg
    from kvscale.traces.importers import IMPORTERS
    from simulator.workload import WORKLOADS  # the workload names (numpy only; not the engine)

    p.add_argument("--trace", default="diurnal", choices=TRACES, help="a synthetic trace (with --workload)")
    p.add_argument("--trace-file", type=Path, default=None,
                   help="replay a recorded trace instead (any format of `kvscale trace import`); sized by "
                        "--peak-replicas unless --rate-scale is given")  # fmt: skip
    p.add_argument("--format", default="kvscale", choices=list(IMPORTERS), help="--trace-file's format")
    p.add_argument("--window", type=window_arg, metavar="START:END", help="--trace-file: keep [START, END) s")
    p.add_argument("--rate-scale", type=positive_number, metavar="X",
                   help="--trace-file: X times its rate (as `kvscale trace transform`), instead of --peak-replicas")
    p.add_argument("--speed", type=positive_number, metavar="X", help="--trace-file: compress time X times")
    p.add_argument("--workload", default="chat", choices=list(WORKLOADS))
    p.add_argument("--pools", default="aggregated", choices=("aggregated", "pd"))
    p.add_argument("--startup-seconds", type=float, default=90.0, help="pod cold start (s)")
    p.add_argument("--duration", type=float, default=None,
                   help="synthetic trace length (virtual s; default 3600); a trace file runs its whole span")
    p.add_argument("--rate", type=float, default=None, help="mean req/s (default: sized by --peak-replicas)")
    p.add_argument("--peak-replicas", type=float, default=6.0,
                   help="size the rate (synthetic: the default --rate; a trace file: its rate scale) so that the "
                        "busiest minute needs this many replicas")  # fmt: skip
    p.add_argument("--latency-model", default=DEFAULT_MODEL)
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--itl-slo-ms", type=float, default=50.0)
    p.add_argument("--slo-percentile", type=float, default=99.0, help="percentile the kvscale policy sizes for")
    p.add_argument("--gpus-per-replica", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="extra scalerMetadata for kvscale (repeatable), e.g. stableWindowSeconds=120")  # fmt: skip
    p.add_argument("--kvscale-hpa", default="committed", choices=("committed", "default"),
                   help="HPA behaviour of kvscale: the committed ScaledObject's (deploy/overlays) or the Kubernetes "
                        "defaults (kvscale-hpa-default always runs under the defaults)")  # fmt: skip
    p.add_argument("--router-policy", default="least-request", metavar="NAME",
                   help="the router policy (a `kvscale router serve --policy` preset, e.g. kv-events, best, "
                        "peer:llm-d) that dispatches on the virtual cluster; default: least-request, the router's "
                        "default")  # fmt: skip
    p.add_argument("--termination-grace-seconds", type=float, default=120.0, metavar="S",
                   help="the engine pods' terminationGracePeriodSeconds: requests a scaled-down replica still holds "
                        "S seconds later are killed (default 120, the committed Deployment's)")  # fmt: skip
    p.add_argument("--variants", default=None, metavar="SPEC:COST,...",
                   help="a mixed fleet of GPU variants (latency model or GPU shorthand such as h100, a100-40gb, "
                        "gh200 : price per replica-hour), evaluated as one variant group against fleets of each "
                        "variant alone and the oracle (aggregated pools)")  # fmt: skip
    p.add_argument("--start-time", type=_start_time, default=0.0, metavar="ISO8601",
                   help="the wall-clock time of the trace's start, e.g. 2026-12-01T08:00:00+01:00 (what the cron "
                        "windows of --metadata scheduleFloors=... see; default 1970-01-01T00:00:00Z)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=0,
                   help="policies run at once, each in a worker process (default 0: one per CPU core)")  # fmt: skip
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write a PNG of load and replicas over time here")


def _start_time(text: str) -> float:
    """An ISO 8601 time (without a zone: UTC) as Unix seconds."""
    from datetime import UTC, datetime

    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time such as 2026-12-01T08:00:00Z, got {text!r}") \
            from None
    return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp()


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    from scaler.evaluate.run import EvalConfig

    md: dict[str, str] = {}
    for item in args.metadata:
        if "=" not in item:
            raise ValueError(f"--metadata {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        md[k] = v
    requests = None
    if args.trace_file is not None:
        from kvscale.traces.cli import resized

        if args.duration is not None:
            raise ValueError("--duration applies to the synthetic traces; cut a trace file with --window")
        requests = resized(args)
    elif args.window or args.rate_scale or args.speed:
        raise ValueError("--window, --rate-scale and --speed apply to --trace-file")
    return EvalConfig(
        trace=args.trace, workload=args.workload, pools=args.pools, latency_model=args.latency_model,
        startup_s=args.startup_seconds, duration_s=3600.0 if args.duration is None else args.duration,
        rate=args.rate, peak_replicas=args.peak_replicas,
        ttft_slo_ms=args.ttft_slo_ms, itl_slo_ms=args.itl_slo_ms, slo_percentile=args.slo_percentile,
        seed=args.seed, gpus_per_replica=args.gpus_per_replica,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()), metadata=md,
        kvscale_hpa=args.kvscale_hpa, requests=requests, router_policy=args.router_policy,
        termination_grace_s=args.termination_grace_seconds,
        trace_name=args.trace_file.name if args.trace_file is not None else "", size_to_peak=args.rate_scale is None,
        start_epoch_s=args.start_time,
    )  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    from kvscale.latency import LatencyModelError
    from scaler.evaluate.report import goal_check, plot, print_table
    from scaler.evaluate.run import Evaluation
    from scaler.metadata import MetadataError

    if args.variants is not None:
        return _run_variants(args)
    try:
        ev = Evaluation(config_from_args(args))
    except (ValueError, LookupError, MetadataError, LatencyModelError, OSError) as e:
        print(f"kvscale eval scaling: {e}", file=sys.stderr)
        return 2
    jobs = args.jobs if args.jobs > 0 else (os.cpu_count() or 1)
    res = ev.run(progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True), jobs=jobs)
    res["goal"] = goal_check(res)
    print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in res.items() if k != "timelines"} | {
            "timelines": res["timelines"]}, indent=1, default=float) + "\n")  # fmt: skip
    if args.plot:
        plot(res, args.plot)
    return 0


def _run_variants(args: argparse.Namespace) -> int:
    """``--variants``: a mixed fleet against single-variant fleets and the oracle (scaler/evaluate/variants.py)."""
    from rich.console import Console
    from rich.table import Table

    from kvscale.latency import LatencyModelError
    from scaler.evaluate.variants import VariantEvaluation, parse_variants
    from scaler.metadata import MetadataError

    try:
        variants = parse_variants(args.variants)
        if args.policies != ",".join(POLICIES):
            raise ValueError("--policies does not apply with --variants (every mixed and single-variant policy runs)")
        ev = VariantEvaluation(config_from_args(args), variants)
    except (ValueError, LookupError, MetadataError, LatencyModelError, OSError) as e:
        print(f"kvscale eval scaling: {e}", file=sys.stderr)
        return 2
    res = ev.run(progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    names = [v["name"] for v in res["variants"]]
    fleet = ", ".join(f"{v['name']} ({v['cost_per_hour']:g}/h)" for v in res["variants"])
    table = Table(title=f"variants {fleet} — {res['trace']}, {res['requests']} requests, sized on {res['sized_on']}")
    for c in ("policy", "cost", *(f"GPU-h {n}" for n in names), "SLO attainment", "TTFT p90 (s)", "killed"):
        table.add_column(c, justify="left" if c == "policy" else "right")
    for name, f in res["policies"].items():
        table.add_row(name, f"{f['cost']:.2f}", *(f"{f['gpu_hours_per_variant'][n]:.2f}" for n in names),
                      f"{f['slo_attainment']:.1%}", f"{f['ttft_p90_s']:.3f}", str(f["requests_killed_by_scale_down"]))
    Console(width=160).print(table)
    print(f"wall {res['wall_s']:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float) + "\n")
    return 0

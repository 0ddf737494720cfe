"""``kvscale sim run``: replay one trace on N replicas on the virtual clock, routed by one router policy.

Registered by kvscale.cli under ``sim`` beside the simulator's ``serve``. It lives here, not in ``simulator/``,
because the virtual cluster has no dispatcher of its own: it routes with the router's policy ``Pipeline``
(:func:`router.evaluate.dispatch.cluster_dispatchers`, as ``kvscale eval routing`` and ``kvscale eval scaling``
do), and the router sits above the simulator. ``kvscale eval routing`` compares several policies on a recorded
trace; this command runs one, on a recorded trace or a synthetic arrival process, and prints the cluster's summary.

Importing this module loads neither the simulator nor the router's policies; :func:`run_main` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvscale.latency import DEFAULT_MODEL, LatencyModelError, load_latency_model
from router.evaluate.cli import pools_arg


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default="poisson", help="trace JSONL file, or an arrival process name "
                   "(poisson, diurnal, step, bursty)")  # fmt: skip
    p.add_argument("--workload", default="chat", help="chat, rag, reasoning, shared-prefix")
    p.add_argument("--rate", type=float, default=10.0, help="mean arrivals per second")
    p.add_argument("--duration", type=float, default=600.0, help="trace length in seconds (virtual)")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--pd", type=pools_arg, default=None, metavar="P:D",
                   help="P/D pools instead of aggregated, e.g. 2:4")  # fmt: skip
    p.add_argument("--policy", "--dispatcher", dest="policy", default="least-request",
                   help="the router policy that dispatches (a `kvscale router serve --policy` preset; default "
                        "least-request, the router's default). P/D: the prefill pod as the router's P/D handler "
                        "chooses it, the decode pod by least-request")  # fmt: skip
    p.add_argument("--latency-model", default=DEFAULT_MODEL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--itl-slo-ms", type=float, default=50.0)
    p.add_argument("--json", default=None, help="write the summary as JSON here")


def run_main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from router.evaluate.dispatch import cluster_dispatchers
    from router.evaluate.run import figures
    from simulator.cluster import Cluster
    from simulator.engine import EngineConfig
    from simulator.workload import build_trace, load_trace

    try:
        if args.replicas < 1:
            raise ValueError("--replicas must be >= 1")
        latency = load_latency_model(args.latency_model)
        if Path(args.trace).suffix in (".jsonl", ".json") or Path(args.trace).exists():
            trace = load_trace(args.trace)
        else:
            trace = build_trace(args.trace, args.workload, args.rate, args.duration, seed=args.seed)
        pools = {"prefill": args.pd[0], "decode": args.pd[1]} if args.pd else {"aggregated": args.replicas}
        config = EngineConfig(num_gpu_blocks=latency.num_gpu_blocks(), materialize_outputs=False)
        dispatchers, _, kv_events = cluster_dispatchers(args.policy, args.pd is not None, seed=args.seed,
                                                        block_size=config.block_size)  # fmt: skip
        cluster = Cluster(latency, config, replicas=pools, dispatcher=dispatchers, kv_events=kv_events)
    except (ValueError, LatencyModelError, OSError) as e:
        print(f"kvscale sim run: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    result = cluster.run(trace)
    wall = time.perf_counter() - t0
    summary = result.summary()
    summary["slo_attainment"] = result.slo_attainment(args.ttft_slo_ms / 1000, args.itl_slo_ms / 1000)
    summary["prefix_hit_rate"] = figures(result)["prefix_hit_rate"]  # prompt tokens served from cache
    summary["wall_s"] = wall
    summary["virtual_s"] = result.end_s
    table = Table(title=f"kvscale sim run: {len(trace)} requests, {pools}, policy {args.policy}, "
                        f"latency model {latency.name}")  # fmt: skip
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, f"{v:.4g}")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run`` to ``kvscale sim`` (``sub``: the sim group's subparsers)."""
    run = sub.add_parser("run", help="replay a trace on N replicas on a virtual clock, routed by a router policy")
    add_run_args(run)
    run.set_defaults(func=run_main)

"""`kvscale bench routing` (registered by kvscale.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvscale.traces.cli import positive_number, resized, window_arg


def _main(args: argparse.Namespace) -> int:
    from bench.routing import BenchConfig, print_table, run
    from bench.workloads import TINY_VLLM_BLOCKS, TINY_VLLM_SCALE, WORKLOADS, Scale

    if args.workload not in WORKLOADS:
        print(f"kvscale bench routing: --workload must be one of {WORKLOADS}", file=sys.stderr)
        return 2
    if args.backends < 1 or args.rate <= 0 or args.duration <= 0 or args.repeat < 1:
        print("kvscale bench routing: --backends, --rate, --duration and --repeat must be positive", file=sys.stderr)
        return 2
    if args.engine == "vllm-cpu" and args.workload != "shared-prefix":
        print("kvscale bench routing: --engine vllm-cpu runs the shared-prefix workload only", file=sys.stderr)
        return 2
    real = args.engine == "vllm-cpu"
    trace = None
    if args.trace_file:
        try:
            trace = resized(args)
        except (ValueError, OSError) as e:
            print(f"kvscale bench routing: error: {e}", file=sys.stderr)
            return 2
    cfg = BenchConfig(
        backends=args.backends, workload=args.workload, rate=args.rate, duration=args.duration, json_path=args.json,
        policies=[p.strip() for p in args.policies.split(",") if p.strip()] if args.policies else None,
        slowdown=args.slowdown, latency_model=args.latency_model,
        num_gpu_blocks=args.num_gpu_blocks or (TINY_VLLM_BLOCKS if real else 1000),
        max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed, pd=args.pd, keep_logs=args.keep_logs,
        engine=args.engine, model_dir=args.model_dir, repeat=args.repeat, scale=TINY_VLLM_SCALE if real else Scale(),
        trace=trace, max_model_len=args.max_model_len,
    )  # fmt: skip
    result = run(cfg)
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `bench` command group."""
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("routing", help="routing quality: simulator pods behind each router configuration")
    p.add_argument("--backends", type=int, default=4, help="pods per run")
    p.add_argument("--workload", default="shared-prefix",
                   help="shared-prefix | multi-turn | mixed-length | prefill-heavy")  # fmt: skip
    p.add_argument("--rate", type=float, default=16.0, help="requests per second (Poisson)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per configuration")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--policies", default=None,
                   help="comma list (kvscale policy names, vllm-router:NAME, sglang-router:NAME, pd:P:D); "
                        "default: all for the workload")  # fmt: skip
    p.add_argument("--slowdown", type=float, default=5.0, help="multiply the latency model's step times")
    p.add_argument("--latency-model", default="llama-3.1-8b-h100",
                   help="the slo scorer's model (a built-in name or a fitted artifact; with vllm-cpu pass the pods' "
                        "profile, e.g. tests/data/profile-vllm-cpu/fitted.json)")
    p.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV cache per pod in blocks (default: 1000 of 16 tokens on sim pods, 160 of 32 on vLLM)")
    p.add_argument("--engine", choices=("sim", "vllm-cpu"), default="sim",
                   help="sim: simulator pods (fresh per configuration); vllm-cpu: real vLLM CPU pods serving the "
                        "tiny test model (or --model-dir), shared, prefix caches reset between configurations")
    p.add_argument("--model-dir", default=None, help="vllm-cpu: model directory (default: build the tiny model)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--pd", default=None, metavar="P:D", help="also run P/D with P prefill and D decode pods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1,
                   help="interleaved rounds over the configurations (medians reported; use on a shared machine)")
    p.add_argument("--keep-logs", action="store_true", help="keep pod and router logs (path printed)")
    p.add_argument("--trace-file", type=Path, help="replay a recorded trace (instead of --workload/--rate)")
    p.add_argument("--format", default="kvscale", choices=("kvscale", "mooncake", "azure", "burstgpt"))
    p.add_argument("--window", type=window_arg, metavar="START:END", help="--trace-file: only [START, END) s")
    p.add_argument("--speed", type=positive_number, metavar="X", help="--trace-file: compress time X times")
    p.add_argument("--rate-scale", type=positive_number, metavar="X", help="--trace-file: X times the rate, same span")
    p.add_argument("--max-model-len", type=int, default=8192, help="sim pods' context limit")
    p.set_defaults(func=_main)

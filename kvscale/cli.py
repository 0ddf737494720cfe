"""The ``kvscale`` command: one CLI with sub-commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvscale import __version__


def build_parser() -> argparse.ArgumentParser:
    from simulator.cli import add_run_args, add_serve_args

    parser = argparse.ArgumentParser(
        prog="kvscale", description="SLO-driven autoscaling and KV-aware routing for LLM serving"
    )
    parser.add_argument("--version", action="version", version=f"kvscale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("sim", help="the vLLM-faithful engine simulator")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True)
    add_serve_args(sim_sub.add_parser("serve", help="serve vLLM's OpenAI API from the engine model (real time)"))
    add_run_args(sim_sub.add_parser("run", help="replay a trace on N replicas on a virtual clock"))

    demo = sub.add_parser("demo", help="start simulated pods, send a mixed workload, print TTFT/ITL and cache hits")
    from kvscale.demo import add_demo_args

    add_demo_args(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sim":
        from simulator.cli import run_main, serve_main

        return serve_main(args) if args.sim_command == "serve" else run_main(args)
    if args.command == "demo":
        from kvscale.demo import demo_main

        return demo_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())

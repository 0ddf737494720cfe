"""The ``kvscale`` command: one CLI with sub-commands.

Each part registers its own commands: a module listed in ``_PARTS`` exposes ``register(subparsers)`` and gives
every leaf parser ``set_defaults(func=...)``, a callable taking the parsed args and returning an exit code. Heavy
imports happen inside those callables, so ``kvscale --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvscale import __version__

# sim + demo, profile (predictor), scaler + eval (scaler), router, bench routing (router.bench)
_PARTS = ("simulator.cli", "kvscale.demo", "predictor.cli", "scaler.cli", "router.cli", "router.bench.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvscale", description="SLO-driven autoscaling and KV-aware routing for LLM serving"
    )
    parser.add_argument("--version", action="version", version=f"kvscale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _PARTS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

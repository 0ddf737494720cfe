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

# Top-level command -> the module that registers it.
_PARTS = {
    "demo": "demo.main",
    "profile": "predictor.cli",
    "scaler": "scaler.cli",
    "router": "router.cli",
    "bench": "bench.cli",
    "trace": "kvscale.traces.cli",
}
# Commands whose sub-commands come from several parts: (help, modules); each module's ``register`` receives the
# group's subparsers (``kvscale eval scaling`` from the scaler, ``kvscale eval routing`` from the router;
# ``kvscale sim serve`` from the simulator, ``kvscale sim run`` from the router, whose policies route it).
_GROUPS = {
    "sim": ("the vLLM-faithful engine simulator", ("simulator.cli", "router.evaluate.sim_run")),
    "eval": ("evaluations on the virtual-clock simulator", ("scaler.evaluate.cli", "router.evaluate.cli")),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only the part owning that command is imported (faster start)."""
    parser = argparse.ArgumentParser(
        prog="kvscale", description="SLO-driven autoscaling and KV-aware routing for LLM serving"
    )
    parser.add_argument("--version", action="version", version=f"kvscale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    known = command in _PARTS or command in _GROUPS
    for name, module in _PARTS.items():
        if not known or name == command:
            importlib.import_module(module).register(sub)
    for name, (help_text, modules) in _GROUPS.items():
        if not known or name == command:
            group = sub.add_parser(name, help=help_text).add_subparsers(dest=f"{name}_command", required=True)
            for module in modules:
                importlib.import_module(module).register(group)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

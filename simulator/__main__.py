"""``python -m simulator serve ARGS``: ``kvscale sim serve`` without the other parts' command lines, for the pod
processes that the demo, the benchmarks and the tests start."""

from __future__ import annotations

import argparse
import sys

from simulator.cli import add_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulator")
    add_commands(parser.add_subparsers(dest="sim_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

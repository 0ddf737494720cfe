"""``python -m router.bench.sim_proc ARGS``: ``kvscale sim serve`` with the simulator's own argument parser.

The benchmark starts pods this way so that it needs only the simulator part (not every part's CLI) to import.
"""

from __future__ import annotations

import argparse
import sys

from simulator.cli import add_serve_args, serve_main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kvscale sim serve")
    add_serve_args(parser)
    sys.exit(serve_main(parser.parse_args(sys.argv[1:])))

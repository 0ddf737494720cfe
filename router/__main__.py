"""``python -m router [serve flags]``: the same as ``kvscale router serve`` without loading the other parts' CLIs."""

from __future__ import annotations

import argparse
import sys

from router.cli import add_serve_args, serve_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router", description="kvscale router serve")
    add_serve_args(parser)
    return serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

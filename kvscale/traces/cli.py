"""``kvscale trace import | stats | transform``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def window_arg(text: str) -> tuple[float, float]:
    try:
        a, b = text.split(":")
        return float(a), float(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds, got {text!r}") from None


def positive_number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def register(sub: argparse._SubParsersAction) -> None:
    from kvscale.traces.importers import IMPORTERS

    p = sub.add_parser("trace", help="import, inspect and resize request traces")
    tsub = p.add_subparsers(dest="trace_command", required=True)

    imp = tsub.add_parser("import", help="convert a published trace (Mooncake, Azure, BurstGPT) to kvscale JSONL")
    imp.add_argument("input", type=Path)
    imp.add_argument("--format", required=True, choices=list(IMPORTERS))
    imp.add_argument("--out", required=True, type=Path)
    imp.add_argument("--keep-failed", action="store_true",
                     help="BurstGPT: keep failed requests (0 response tokens) as 1-token outputs")  # fmt: skip
    imp.set_defaults(func=_import)

    st = tsub.add_parser("stats", help="requests, span, rates, ISL/OSL and prefix reuse of a trace")
    st.add_argument("input", type=Path)
    st.add_argument("--format", default="kvscale", choices=list(IMPORTERS))
    st.add_argument("--json", type=Path, help="write the figures as JSON")
    st.add_argument("--plot", type=Path, help="draw arrivals per minute and the ISL/OSL distributions (PNG)")
    st.set_defaults(func=_stats)

    tr = tsub.add_parser("transform", help="compress time, scale the rate or cut a window")
    tr.add_argument("input", type=Path)
    tr.add_argument("--format", default="kvscale", choices=list(IMPORTERS))
    tr.add_argument("--window", type=window_arg, metavar="START:END", help="keep [START, END) s, shifted to 0")
    tr.add_argument("--rate-scale", type=positive_number, metavar="X",
                    help="same span, X times the rate (thinned below 1; copies in new prefix namespaces above)")
    tr.add_argument("--speed", type=positive_number, metavar="X", help="compress time X times (every request kept)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True, type=Path)
    tr.set_defaults(func=_transform)


def _fail(e: Exception) -> int:
    print(f"kvscale trace: error: {e}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace) -> list:
    """The trace of ``args.input`` (or ``args.trace_file``) read as ``args.format``."""
    from kvscale.traces.importers import import_trace

    path = getattr(args, "input", None) or args.trace_file
    opts = {"keep_failed": True} if getattr(args, "keep_failed", False) else {}
    return import_trace(args.format, path, **opts)


def resized(args: argparse.Namespace) -> list:
    """The trace of ``args.input`` or ``args.trace_file`` (``args.format``), resized by ``--window``,
    ``--rate-scale`` and ``--speed`` (each optional): one reading of these flags for every command that has them."""
    from kvscale.traces.transform import resize

    return resize(_load(args), window_s=args.window, rate=args.rate_scale,
                  speed_x=args.speed, seed=args.seed)  # fmt: skip


def _import(args: argparse.Namespace) -> int:
    from kvscale.traces.format import save_trace
    from kvscale.traces.stats import trace_stats

    try:
        trace = _load(args)
        save_trace(trace, args.out)
    except (ValueError, OSError) as e:
        return _fail(e)
    s = trace_stats(trace)
    print(f"{args.out}: {s['requests']} requests over {s['span_s']:.0f} s ({s['mean_rate']:.2f} req/s), "
          f"prefix information: {s['prefix_kind']}")  # fmt: skip
    return 0


def _stats(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvscale.traces.stats import plot_trace, trace_stats

    try:
        trace = _load(args)
        s = trace_stats(trace)
    except (ValueError, OSError) as e:
        return _fail(e)
    t = Table(title=str(args.input))
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("requests", f"{s['requests']:,}")
    t.add_row("span", f"{s['span_s']:,.1f} s")
    t.add_row("mean rate", f"{s['mean_rate']:.3f} req/s")
    t.add_row("peak (busiest minute)", f"{s['peak_rate_per_min']:.3f} req/s ({s['peak_requests_per_min']} requests)")
    for k in ("isl", "osl"):
        d = s[k]
        t.add_row(f"{k.upper()} mean / p50 / p99", f"{d['mean']:,.0f} / {d['p50']:,.0f} / {d['p99']:,.0f}")
    t.add_row("prefix reuse (infinite shared cache)", f"{s['prefix_reuse']:.1%} ({s['prefix_kind']})")
    Console().print(t)
    if args.json:
        args.json.write_text(json.dumps(s, indent=2) + "\n")
    if args.plot:
        plot_trace(trace, args.plot, title=args.input.name)
    return 0


def _transform(args: argparse.Namespace) -> int:
    from kvscale.traces.format import save_trace
    if args.window is None and args.rate_scale is None and args.speed is None:
        return _fail(ValueError("give at least one of --window, --rate-scale, --speed"))
    try:
        trace = resized(args)
        if not trace:
            raise ValueError("no request is left")
        save_trace(trace, args.out)
    except (ValueError, OSError) as e:
        return _fail(e)
    print(f"{args.out}: {len(trace)} requests")
    return 0

"""``kvscale profile steps``: forward-pass step times of a random-weight decoder, in plain PyTorch.

For a machine that has a GPU and PyTorch but neither vLLM nor a model hub: build a decoder with the shape of a
named model (``predictor.gpu_campaign.SHAPES``) from random weights (``predictor.gpu_model``), time prefill and
decode steps over a grid (``predictor.gpu_campaign``), and write them as a profile dataset (``predictor.dataset``)
that ``kvscale profile fit`` turns into a latency model. This module is the command line: its flags, the progress
bar, the summary table. ``predictor.cli`` registers it as ``kvscale profile steps``; run alone it is the same command
without the rest of the kvscale CLI::

    python -m predictor.gpu_steps --shape llama-3.1-8b --out profiles/llama-3.1-8b-h100-steps

This module and the two it drives import only the standard library (and the light ``predictor.roofline`` and
``predictor.cli_common``) at import time; torch, numpy, pandas, pyarrow and rich are imported when a measurement
runs, so ``python -m predictor.gpu_steps`` works on a box with just those installed (see docs/profiling.md,
"Measuring GPU step times").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from predictor.cli_common import number_list, progress_bar
from predictor.gpu_campaign import (
    CPU_DEFAULT_MEMORY_GIB,
    MIN_DECODE_STEPS,
    NOTE,
    SHAPES,
    StepsConfig,
    StepsError,
    StepsRunner,
)


def add_args(p: argparse.ArgumentParser) -> None:
    d = StepsConfig(shape="", out=Path("."))
    csv = lambda t: ",".join(map(str, t))  # noqa: E731
    p.add_argument("--shape", default="llama-3.1-8b", help=f"model shape ({', '.join(SHAPES)})")
    p.add_argument("--out", required=True, type=Path, help="profile directory (re-running resumes it)")
    p.add_argument("--device", default=d.device, help="auto | cuda | cuda:N | cpu")
    p.add_argument("--dtype", default=d.dtype, help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
    p.add_argument("--layers", type=int, default=None,
                   help="build and time only N layers and scale their time to the shape's layer count")
    p.add_argument("--prefill-tokens", type=number_list(int, "integers", 1), default=d.prefill_tokens,
                   help=f"new tokens per prefill step, batch 1 (default {csv(d.prefill_tokens)})")
    p.add_argument("--prefill-cached", type=number_list(int, "integers", 0), default=d.prefill_cached,
                   help=f"cached-prefix lengths, 0 = none (default {csv(d.prefill_cached)})")
    p.add_argument("--decode-batch", type=number_list(int, "integers", 1), default=d.decode_batch,
                   help=f"sequences per decode step (default {csv(d.decode_batch)})")
    p.add_argument("--decode-context", type=number_list(int, "integers", 1), default=d.decode_context,
                   help=f"KV-cache tokens per sequence (default {csv(d.decode_context)})")
    p.add_argument("--decode-steps", type=int, default=d.decode_steps,
                   help=f"decode steps per timed stream (>= {MIN_DECODE_STEPS})")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed repeats per point (median)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed iterations per point")
    p.add_argument("--max-memory-gib", type=float, default=None,
                   help="skip points whose KV cache + activations exceed this (default: 90%% of free GPU memory "
                        f"after the weights; {CPU_DEFAULT_MEMORY_GIB:g} GiB on CPU)")  # fmt: skip
    p.add_argument("--hardware", default="", help="hardware label (default: the GPU's name)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is steadiest on a shared CPU; default: torch's)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> StepsConfig:
    return StepsConfig(
        shape=args.shape, out=args.out, device=args.device, dtype=args.dtype, layers=args.layers,
        prefill_tokens=args.prefill_tokens, prefill_cached=args.prefill_cached, decode_batch=args.decode_batch,
        decode_context=args.decode_context, decode_steps=args.decode_steps, repeats=args.repeats,
        warmup=args.warmup, max_memory_gib=args.max_memory_gib, hardware=args.hardware, seed=args.seed,
        threads=args.threads,
    )  # fmt: skip


def steps_main(args: argparse.Namespace) -> int:
    """Measure, print a table, and say how to fit. Exit 2 on bad arguments, 1 if nothing could be measured."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    try:
        cfg = config_from_args(args)
        cfg.validate()
    except StepsError as e:
        print(f"kvscale profile steps: {e}", file=sys.stderr)
        return 2
    try:
        with progress_bar(console, "building the model", "measuring") as on_progress:
            summary = StepsRunner(cfg, on_progress).run()
    except StepsError as e:
        print(f"kvscale profile steps: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        console.print(f"interrupted; measured points are kept in {cfg.out} (re-run to resume)")
        return 130
    m = summary.manifest["measurement"]
    table = Table(title=f"{cfg.shape} on {summary.manifest['hardware']} ({m['dtype']}, torch {m['torch_version']}, "
                        f"CUDA {m['cuda_version']}, {m['timer']})")  # fmt: skip
    for c in ("kind", "batch", "new", "cached | ctx", "median ms", "min ms", "max ms"):
        table.add_column(c, justify="right")
    for r in summary.measured:
        p, st = r.point, r.stats
        table.add_row(p.kind, str(p.batch), str(p.new), str(p.cached), f"{st['step_median_s'] * 1e3:.3f}",
                      f"{st['step_min_s'] * 1e3:.3f}", f"{st['step_max_s'] * 1e3:.3f}")  # fmt: skip
    out = Console(soft_wrap=True)
    out.print(table)
    out.print(f"{m['layer_scaling']}.")
    out.print(f"note: {NOTE}.")
    out.print(f"measured {len(summary.measured)} points in {summary.wall_s:.1f} s, skipped {len(summary.skipped)} "
              f"already measured; profile in {cfg.out}")  # fmt: skip
    for reason in summary.dropped:
        out.print(f"  not measured: {reason}", markup=False)
    if not summary.measured and not summary.skipped:
        print("kvscale profile steps: no point could be measured (see the reasons above)", file=sys.stderr)
        return 1
    out.print(f"next: kvscale profile fit {cfg.out} --out kvscale/models/{cfg.shape}-<gpu>-measured.json",
              markup=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m predictor.gpu_steps ...``: the same command without the rest of the kvscale CLI."""
    parser = argparse.ArgumentParser(
        prog="python -m predictor.gpu_steps", description="forward-pass step times of a random-weight decoder"
    )
    add_args(parser)
    return steps_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

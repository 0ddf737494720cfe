"""``kvscale profile run | import | fit | steps | capacity`` (registered by kvscale.cli)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from predictor.cli_common import number_list, progress_bar

_ints = number_list(int, "integers")
_floats = number_list(float, "numbers")


def _positive_int(text: str) -> int:
    values = _ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected LO:HI, got {text!r}") from e
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO < HI, got {text!r}")
    return lo, hi


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"KVSCALE_PROFILE_{name}", default)


def add_run_args(p: argparse.ArgumentParser) -> None:
    from predictor.profiler import DEFAULT_SWEEPS, ProfileConfig

    d = ProfileConfig(endpoints=[], model="", out=Path("."))
    p.add_argument("--endpoint", action="append", required=True, metavar="URL",
                   help="OpenAI-compatible base URL (repeat for several pods of the same configuration)")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--out", required=True, type=Path, help="profile directory (re-running resumes it)")
    p.add_argument("--sweeps", default=",".join(DEFAULT_SWEEPS), help="prefill,prefix,decode,load")
    p.add_argument("--hardware", default=_env("HARDWARE", ""), help="hardware label, e.g. '1x H100 SXM 80GB'")
    p.add_argument("--prefill-isl", type=_ints, default=d.prefill_isl, help="prefill ISL grid")
    p.add_argument("--prefill-repeats", type=_positive_int, default=d.prefill_repeats)
    p.add_argument("--decode-concurrency", type=_ints, default=d.decode_concurrency)
    p.add_argument("--decode-context", type=_ints, default=d.decode_context)
    p.add_argument("--decode-osl", type=int, default=d.decode_osl)
    p.add_argument("--decode-rounds", type=_positive_int, default=d.decode_rounds,
                   help="rounds per decode point (medians); several run in passes over the grid")  # fmt: skip
    p.add_argument("--load-workload", default=d.load_workload, help="chat|rag|reasoning|shared-prefix lengths")
    p.add_argument("--load-rates", type=_floats, default=d.load_rates, help="Poisson rates (req/s), ascending")
    p.add_argument("--load-duration", type=float, default=d.load_duration_s, help="seconds per load point")
    p.add_argument("--token-range", type=_range, default=d.token_range, help="random prompt token ids LO:HI")
    p.add_argument("--max-model-len", type=int, default=None, help="default: read from /v1/models")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="per-request timeout (s)")
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests)  # fmt: skip


def run_main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from predictor.profiler import SWEEPS, ProfileConfig, ProfileError, run_profile

    console = Console(stderr=True)
    sweeps = tuple(s.strip() for s in args.sweeps.split(",") if s.strip())
    bad = [s for s in sweeps if s not in SWEEPS]
    if bad:
        console.print(f"kvscale profile run: unknown sweep(s) {bad}; valid: {', '.join(SWEEPS)}")
        return 2
    cfg = ProfileConfig(
        endpoints=args.endpoint, model=args.model, out=args.out, sweeps=sweeps, hardware=args.hardware,
        prefill_isl=args.prefill_isl, prefill_repeats=args.prefill_repeats,
        decode_concurrency=args.decode_concurrency, decode_context=args.decode_context, decode_osl=args.decode_osl,
        decode_rounds=args.decode_rounds, load_workload=args.load_workload, load_rates=args.load_rates,
        load_duration_s=args.load_duration,
        token_range=args.token_range, max_model_len=args.max_model_len, timeout_s=args.timeout,
        warmup_requests=args.warmup_requests,
    )  # fmt: skip
    try:
        with progress_bar(console, "profiling", "profiling") as on_progress:
            summary = run_profile(cfg, on_progress)
    except ProfileError as e:
        console.print(f"[red]kvscale profile run: {e}[/red]")
        return 1
    except KeyboardInterrupt:
        console.print(f"interrupted; measured points are kept in {cfg.out} (re-run to resume)")
        return 130
    console.print(
        f"measured {len(summary.measured)} points in {summary.wall_s:.1f} s, skipped {len(summary.skipped)} "
        f"already measured; profile in {cfg.out}"
    )
    for reason in summary.dropped:
        console.print(f"  not measured: {reason}")
    return 0


def import_main(args: argparse.Namespace) -> int:
    from predictor.dataset import DatasetError
    from predictor.importer import ImportError_, import_results

    if args.format == "llm-inference-bench":
        return import_public_main(args)
    try:
        written = import_results(args.files, args.out, hardware=args.hardware, model=args.model)
    except (ImportError_, DatasetError) as e:
        print(f"kvscale profile import: {e}", file=sys.stderr)
        return 2
    print(f"imported {len(written)} result file(s) into {args.out}: {', '.join(written) or 'nothing new'}")
    return 0


def import_public_main(args: argparse.Namespace) -> int:
    """Fit one latency model per group of the public tables; write those that pass, say why the others do not."""
    from rich.console import Console
    from rich.table import Table

    from predictor.public import PublicImportError, fit_tables

    frameworks = None if args.framework == "all" else {args.framework}
    models = {m.strip() for m in args.models.split(",") if m.strip()} if args.models else None
    try:
        results = fit_tables(args.files, frameworks=frameworks, models=models, max_mape=args.max_mape)
    except PublicImportError as e:
        print(f"kvscale profile import: {e}", file=sys.stderr)
        return 2
    if not results:
        print("kvscale profile import: no group matches --framework/--models", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"LLM-Inference-Bench groups ({len(results)}), held-out MAPE over whole rows")
    for c in ("group", "rows used", "excluded", "held-out MAPE", "p90 APE", "TTFT rows", "result"):
        table.add_column(c, justify="left" if c in ("group", "result") else "right")
    for r in results:
        if r.latency_model is not None:
            (args.out / f"{r.name}.json").write_text(r.latency_model.dumps())
        table.add_row(f"{r.hardware} x{r.count} / {r.model}", str(r.used), str(len(r.excluded)),
                      "" if r.heldout_mape != r.heldout_mape else f"{r.heldout_mape:.1%}",
                      "" if r.heldout_p90 != r.heldout_p90 else f"{r.heldout_p90:.1%}", str(r.ttft_rows),
                      f"[red]refused: {r.refused}[/red]" if r.refused else f"wrote {r.name}.json")  # fmt: skip
    Console(width=200).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    ok = sum(r.latency_model is not None for r in results)
    print(f"{ok} model(s) written to {args.out}, {len(results) - ok} group(s) refused")
    return 0 if ok else 1


def predict_main(args: argparse.Namespace) -> int:
    """What a latency model predicts for an offline batch and for single prefills."""
    from rich.console import Console
    from rich.table import Table

    from kvscale.latency import LatencyModelError, load_latency_model
    from predictor.offline import predict_offline

    try:
        model = load_latency_model(args.latency_model)
        p = predict_offline(model, args.batch, args.input_len, args.output_len, args.max_num_batched_tokens)
    except (LatencyModelError, ValueError) as e:
        print(f"kvscale profile predict: {e}", file=sys.stderr)
        return 2
    prefills = {n: model.prefill_time(n) for n in args.prefill_tokens}
    table = Table(title=f"{model.name} ({model.kind}): offline batch B={args.batch}, input {args.input_len}, "
                        f"output {args.output_len}")  # fmt: skip
    table.add_column("figure")
    table.add_column("predicted", justify="right")
    table.add_row("TTFT of the batch (prefill phase)", f"{p.ttft_s:.4f} s ({p.prefill_steps} prefill steps)")
    table.add_row("mean ITL (decode step)", f"{1e3 * p.mean_itl_s:.2f} ms")
    table.add_row("end-to-end", f"{p.e2e_s:.3f} s")
    for n, t in prefills.items():
        table.add_row(f"single prefill of {n} tokens", f"{1e3 * t:.2f} ms")
    Console().print(table)
    if args.json:
        out = {"model": model.name, "kind": model.kind, "batch": args.batch, "input_len": args.input_len,
               "output_len": args.output_len, **p.as_dict(),
               "single_prefill_s": {str(n): t for n, t in prefills.items()}}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def compare_main(args: argparse.Namespace) -> int:
    """Two or more latency models side by side: step times, prefill times and capacity under an SLO."""
    from predictor.compare import CompareError, compare

    try:
        compare(args.models, ttft_slo_s=args.ttft_slo_ms / 1000.0, itl_slo_s=args.itl_slo_ms / 1000.0,
                workload=args.workload, plot=args.plot, json_out=args.json)  # fmt: skip
    except CompareError as e:
        print(f"kvscale profile compare: {e}", file=sys.stderr)
        return 2
    return 0


def fit_main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from predictor.dataset import DatasetError
    from predictor.fit import FitError, fit_profile

    try:
        model, _ = fit_profile(args.profile, name=args.name, folds=args.folds)
    except (FitError, DatasetError) as e:
        print(f"kvscale profile fit: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(model.dumps())
    fit = model.extra["fit"]
    table = Table(title=f"{model.name}: {model.hardware} / {model.engine}")
    table.add_column("coefficient")
    table.add_column("value", justify="right")
    for k, v in model.to_dict()["step_time"]["coefficients"].items():
        table.add_row(k, f"{v:.4g}")
    table.add_row("ttft_overhead_s", f"{fit['ttft_overhead_s']:.4g}")
    table.add_row("client_overhead_s", f"{fit.get('client_overhead_s', 0.0):.4g}")
    val = Table(title=f"held-out error ({fit['validation']['method']})")
    for c in ("latency", "MAPE", "p90 APE", "points"):
        val.add_column(c, justify="right")
    for kind in ("ttft", "itl"):
        v = fit["validation"][kind]
        val.add_row(kind.upper(), f"{v['mape']:.1%}", f"{v['p90_ape']:.1%}", str(v["n"]))
    console = Console()
    console.print(table)
    console.print(val)
    console.print(f"fitted range: {json.dumps(fit['range'])}")
    console.print(f"wrote {args.out}")
    return 0


def capacity_main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvscale.latency import LatencyModelError, load_latency_model
    from predictor.capacity import SLO
    from predictor.capacity_sim import capacity
    from simulator.workload import WORKLOADS, load_trace

    try:
        model = load_latency_model(args.model)
        slo = SLO(args.ttft_slo_ms / 1000.0, args.itl_slo_ms / 1000.0, args.percentile)
        workload = args.workload
        if workload not in WORKLOADS:
            workload = _workload_from_trace(load_trace(workload), Path(workload).stem)
    except (LatencyModelError, ValueError, OSError) as e:
        print(f"kvscale profile capacity: {e}", file=sys.stderr)
        return 2
    roles = ["prefill", "decode", "aggregated"] if args.role == "all" else [args.role]
    table = Table(title=f"capacity of one replica — {model.name}, TTFT p{slo.percentile:g} ≤ {args.ttft_slo_ms:g} ms, "
                        f"ITL p{slo.percentile:g} ≤ {args.itl_slo_ms:g} ms")  # fmt: skip
    for c in ("role", "workload", f"max req/s ({args.method})", "analytic (M/G/1)", "prefill tok/s", "decode tok/s"):
        table.add_column(c, justify="right")
    results = []
    for role in roles:
        r = capacity(model, slo, workload, role, method=args.method)
        results.append(r.as_dict())
        table.add_row(role, r.workload, f"{r.rate_rps:.3g}", f"{r.analytic_rps:.3g}",
                      f"{r.prefill_tokens_per_s:.4g}", f"{r.decode_tokens_per_s:.4g}")  # fmt: skip
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


def _workload_from_trace(trace: list, name: str):
    """A WorkloadSpec whose length distribution matches a trace file (log-normal fit of its lengths)."""
    import numpy as np

    from simulator.workload import WorkloadSpec

    if not trace:
        raise ValueError(f"trace {name!r} is empty")
    isl = np.log(np.array([t.input_len for t in trace], dtype=float))
    osl = np.log(np.array([t.output_len for t in trace], dtype=float))
    return WorkloadSpec(name, float(np.exp(isl.mean())), float(isl.std()), float(np.exp(osl.mean())),
                        float(osl.std()), max_input_len=int(np.exp(isl.max())) + 1,
                        max_output_len=int(np.exp(osl.max())) + 1)  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kvscale profile run|import|fit|steps|capacity``."""
    prof = sub.add_parser("profile", help="benchmark engine pods, fit latency models, compute capacity")
    ps = prof.add_subparsers(dest="profile_command", required=True)

    run = ps.add_parser("run", help="drive endpoints through prefill/decode/load sweeps into a profile directory")
    add_run_args(run)
    run.set_defaults(func=run_main)

    imp = ps.add_parser("import", help="import `vllm bench serve --save-result --save-detailed` files into a "
                        "profile, or fit latency models to public tables (--format llm-inference-bench)")  # fmt: skip
    imp.add_argument("files", nargs="+", type=Path)
    imp.add_argument("--format", default="vllm-bench", choices=["vllm-bench", "llm-inference-bench"],
                     help="vllm-bench: result JSON into a profile directory; llm-inference-bench: the "
                     "LLM-Inference-Bench CSV tables (end-to-end and TTFT), one fitted model per group into --out")
    imp.add_argument("--out", required=True, type=Path, help="profile directory (vllm-bench) or the directory "
                     "the fitted models are written to (llm-inference-bench)")  # fmt: skip
    imp.add_argument("--model", default=None, help="vllm-bench: default model_id from the files")
    imp.add_argument("--hardware", default="", help="vllm-bench: hardware label")
    imp.add_argument("--framework", default="vLLM", help="llm-inference-bench: framework rows to fit (or 'all')")
    imp.add_argument("--models", default="", help="llm-inference-bench: comma-separated model ids (default all)")
    imp.add_argument("--max-mape", type=float, default=0.10,
                     help="llm-inference-bench: refuse a group whose held-out end-to-end MAPE exceeds this")
    imp.add_argument("--json", default=None, help="llm-inference-bench: write the per-group report here")
    imp.set_defaults(func=import_main)

    pred = ps.add_parser("predict", help="what a latency model predicts for an offline batch and single prefills")
    pred.add_argument("--latency-model", required=True, help="latency-model JSON or a built-in name")
    pred.add_argument("--batch", type=_positive_int, required=True)
    pred.add_argument("--input-len", type=_positive_int, required=True)
    pred.add_argument("--output-len", type=_positive_int, required=True)
    pred.add_argument("--max-num-batched-tokens", type=_positive_int, default=8192,
                      help="vLLM's prefill token budget per step (its default: max(max_model_len, 2048))")
    pred.add_argument("--prefill-tokens", type=_ints, default=(128, 1000, 4096), help="single prefills to show")
    pred.add_argument("--json", default=None)
    pred.set_defaults(func=predict_main)

    cmp_ = ps.add_parser("compare", help="latency models side by side: step time, prefill time, capacity")
    cmp_.add_argument("models", nargs="+", help="two or more latency-model JSON files or built-in names")
    cmp_.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    cmp_.add_argument("--itl-slo-ms", type=float, default=50.0)
    cmp_.add_argument("--workload", default="chat", help="chat|rag|reasoning|shared-prefix (capacity rows)")
    cmp_.add_argument("--plot", default=None, help="write the comparison plot (PNG) here")
    cmp_.add_argument("--json", default=None)
    cmp_.set_defaults(func=compare_main)

    fit = ps.add_parser("fit", help="fit the step-time latency model to a profile (with held-out validation)")
    fit.add_argument("profile", type=Path)
    fit.add_argument("--out", required=True, type=Path, help="latency-model JSON to write")
    fit.add_argument("--name", default=None)
    fit.add_argument("--folds", type=int, default=5)
    fit.set_defaults(func=fit_main)

    from predictor.gpu_steps import add_args as add_steps_args
    from predictor.gpu_steps import steps_main

    steps = ps.add_parser("steps", help="time forward steps of a random-weight model in PyTorch (on a GPU) into a "
                          "profile that `profile fit` reads")  # fmt: skip
    add_steps_args(steps)
    steps.set_defaults(func=steps_main)

    cap = ps.add_parser("capacity", help="max request rate per replica under a TTFT/ITL SLO")
    cap.add_argument("model", help="latency-model JSON (or a built-in name)")
    cap.add_argument("--ttft-slo-ms", type=float, required=True)
    cap.add_argument("--itl-slo-ms", type=float, required=True)
    cap.add_argument("--workload", default="chat", help="chat|rag|reasoning|shared-prefix or a trace JSONL file")
    cap.add_argument("--percentile", type=float, default=90.0)
    cap.add_argument("--role", default="all", choices=["prefill", "decode", "aggregated", "all"])
    cap.add_argument("--method", default="simulate", choices=["simulate", "analytic"])
    cap.add_argument("--json", default=None, help="write the results here")
    cap.set_defaults(func=capacity_main)

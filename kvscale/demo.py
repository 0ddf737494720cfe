"""``kvscale demo`` (stage 1): two simulated vLLM pods, a short mixed workload, a table of what clients saw.

Later stages (router, scaler, KEDA-like controller) grow this into the full local stack.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from pathlib import Path

import aiohttp
import numpy as np
from rich.console import Console
from rich.table import Table

from kvscale.loadgen import Sample, run_open_loop
from kvscale.testing.procs import ManagedProcess, free_port


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pods", type=int, default=2, help="simulated vLLM pods to start")
    p.add_argument("--requests", type=int, default=120, help="requests to send")
    p.add_argument("--rate", type=float, default=8.0, help="arrivals per second (Poisson)")
    p.add_argument("--latency-model", default="llama-3.1-8b-h100")
    p.add_argument("--out", default=None, help="directory for pod logs (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)


def _workload(n: int, rate: float, urls: list[str], seed: int) -> list[tuple[float, str, dict, bool]]:
    """Mixed: chat turns sharing one of 4 long system prompts (prefix-cache hits) and unique completions."""
    rng = random.Random(seed)
    systems = [" ".join(f"tenant{t} policy clause {i}." for i in range(300)) for t in range(4)]
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate)
        url = urls[i % len(urls)]
        if rng.random() < 0.6:
            tenant = rng.randrange(4)
            body = {
                "model": "sim-model",
                "messages": [{"role": "system", "content": systems[tenant]},
                             {"role": "user", "content": f"question {i}: what does clause {rng.randrange(300)} say?"}],
                "max_tokens": rng.randint(32, 160),
            }  # fmt: skip
            out.append((t, url, body, True))
        else:
            words = " ".join(f"w{rng.randrange(10**6)}" for _ in range(rng.randint(50, 800)))
            out.append((t, url, {"model": "sim-model", "prompt": words, "max_tokens": rng.randint(16, 256)}, False))
    return out


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def _report(samples: list[Sample], urls: list[str], console: Console) -> None:
    table = Table(title="kvscale demo: what clients saw (simulated Llama-3.1-8B on H100, roofline estimate)")
    for col in ("pod", "reqs", "errors", "TTFT p50 ms", "TTFT p90 ms", "ITL p50 ms", "ITL p90 ms",
                "prompt tok", "cached tok", "hit"):  # fmt: skip
        table.add_column(col, justify="right")
    pods = [(f"pod-{i}", [s for s in samples if s.endpoint == u]) for i, u in enumerate(urls)]
    for name, group in [*pods, ("all", samples)]:
        ok = [s for s in group if s.ok]
        itls = [x for s in ok for x in s.itls_s]
        prompt = sum(s.prompt_tokens for s in ok)
        cached = sum(s.cached_tokens for s in ok)
        table.add_row(
            name, str(len(group)), str(len(group) - len(ok)),
            f"{_pct([s.ttft_s for s in ok], 50):.1f}", f"{_pct([s.ttft_s for s in ok], 90):.1f}",
            f"{_pct(itls, 50):.1f}", f"{_pct(itls, 90):.1f}",
            str(prompt), str(cached), f"{cached / prompt:.0%}" if prompt else "-",
        )  # fmt: skip
    console.print(table)


async def _drive(urls: list[str], work: list[tuple[float, str, dict, bool]]) -> list[Sample]:
    async with aiohttp.ClientSession() as session:
        return await run_open_loop(session, work)


def demo_main(args: argparse.Namespace) -> int:
    console = Console(width=max(Console().width, 110))
    out = Path(args.out or tempfile.mkdtemp(prefix="kvscale-demo-"))
    procs: list[ManagedProcess] = []
    urls: list[str] = []
    try:
        for i in range(args.pods):
            port = free_port()
            cmd = [sys.executable, "-m", "kvscale.cli", "sim", "serve", "--port", str(port),
                   "--latency-model", args.latency_model]  # fmt: skip
            procs.append(ManagedProcess(cmd, log_path=out / f"pod{i}.log", name=f"sim-pod-{i}").start())
            urls.append(f"http://127.0.0.1:{port}")
        for p, u in zip(procs, urls, strict=True):
            p.wait_http_ready(f"{u}/health", timeout=60)
        console.print(f"[bold]{args.pods} simulated vLLM pods up[/]: {', '.join(urls)} (logs in {out})")
        work = _workload(args.requests, args.rate, urls, args.seed)
        with console.status(f"sending {len(work)} streaming requests at ~{args.rate}/s ..."):
            samples = asyncio.run(_drive(urls, work))
        _report(samples, urls, console)
        failed = [s for s in samples if not s.ok]
        if failed:
            console.print(f"[red]{len(failed)} requests failed[/], e.g. {failed[0].error}")
            return 1
        return 0
    finally:
        for p in procs:
            p.stop()


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="start simulated pods, send a mixed workload, print TTFT/ITL and cache hits")
    add_demo_args(demo)
    demo.set_defaults(func=demo_main)

"""Simulator figures (issue "Foundation"):

* HTTP driver: 500 concurrent streaming requests against one `kvscale sim serve` process pinned to one core;
  how late tokens reach the socket versus the engine model's schedule (server-side, p50/p99), plus errors.
* Virtual clock: a 1-hour Poisson chat trace at 50 req/s over 20 replicas, wall time on one core.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time

import aiohttp
from rich.console import Console
from rich.table import Table

from harness.procs import ManagedProcess, free_port
from kvscale.latency import load_latency_model
from kvscale.loadgen import stream_completion
from router.evaluate.dispatch import PipelineDispatcher
from simulator.cluster import Cluster
from simulator.engine import EngineConfig
from simulator.workload import build_trace

LEVELS = [int(x) for x in os.environ.get("KVSCALE_BENCH_STREAMS", "100,250,500").split(",")]


def _pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


async def _streams(url: str, n: int) -> tuple[list, dict]:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        bodies = [
            {"model": "sim-model", "prompt": [1000 + (i * 7 + j) % 20000 for j in range(256)], "max_tokens": 64}
            for i in range(n)
        ]
        samples = await asyncio.gather(*(stream_completion(session, url, b) for b in bodies))
        async with session.get(f"{url}/kvscale/stats") as resp:
            stats = await resp.json()
    return samples, stats


def test_http_driver_concurrent_streams(tmp_path, record_bench):
    rows = [_http_level(tmp_path, n) for n in LEVELS]
    for r in rows:
        _print(f"HTTP driver: {r['concurrent_streams']} concurrent streams (server on one core)", r)
    record_bench("simulator_http", {"levels": rows, "goal": "p99 lateness <= 5 ms at >= 500 streams"})
    for r in rows:
        assert r["errors"] == 0, r
        assert r["tokens"] == r["concurrent_streams"] * 64


def _http_level(tmp_path, concurrency: int) -> dict:
    port = free_port()
    cmd = [*_pin(0), sys.executable, "-m", "kvscale.cli", "sim", "serve", "--port", str(port),
           "--latency-model", "llama-3.1-8b-h100", "--max-num-seqs", "1024"]  # fmt: skip
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the client gets the other core
    try:
        with ManagedProcess(cmd, log_path=tmp_path / f"sim-{concurrency}.log", name="sim") as proc:
            proc.wait_http_ready(f"http://127.0.0.1:{port}/health", timeout=60)
            t0 = time.perf_counter()
            samples, stats = asyncio.run(_streams(f"http://127.0.0.1:{port}", concurrency))
            wall = time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    errors = sum(not s.ok for s in samples)
    tokens = sum(s.completion_tokens for s in samples)
    return {
        "concurrent_streams": concurrency,
        "first_error": next((s.error for s in samples if not s.ok), ""),
        "errors": errors,
        "tokens": tokens,
        "wall_s": wall,
        "engine_steps": stats["steps"],
        "lateness_p50_ms": stats["lateness_p50_s"] * 1000,
        "lateness_p99_ms": stats["lateness_p99_s"] * 1000,
        "server_cores": 1,
    }


def test_virtual_clock_hour_trace(record_bench):
    hours = float(os.environ.get("KVSCALE_BENCH_HOURS", "1"))
    t0 = time.perf_counter()
    trace = build_trace("poisson", "chat", rate=50.0, duration_s=3600.0 * hours, seed=1)
    t_trace = time.perf_counter() - t0
    latency = load_latency_model("llama-3.1-8b-h100")
    cluster = Cluster(
        latency,
        EngineConfig(num_gpu_blocks=latency.num_gpu_blocks(), materialize_outputs=False),
        replicas={"aggregated": 20},
        dispatcher=PipelineDispatcher("least-request"),  # the router's default policy
    )
    t1 = time.perf_counter()
    res = cluster.run(trace)
    wall = time.perf_counter() - t1
    s = res.summary()
    result = {
        "trace_hours": hours,
        "requests": len(trace),
        "replicas": 20,
        "engine_steps": res.wall_steps,
        "trace_build_s": t_trace,
        "simulate_wall_s": wall,
        "goal_wall_s": 60.0 * hours,
        "speedup_vs_real_time": 3600.0 * hours / wall,
        "ttft_p50_ms": s["ttft_p50_s"] * 1000,
        "ttft_p99_ms": s["ttft_p99_s"] * 1000,
        "itl_p50_ms": s["itl_p50_s"] * 1000,
        "completed": s["completed"],
    }
    _print("Virtual clock: 1-hour trace, 50 req/s, 20 replicas (one core)", result)
    record_bench("simulator_virtual", result)
    assert s["completed"] >= 0.99 * len(trace)


def _print(title: str, data: dict) -> None:
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in data.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console(width=100).print(table)

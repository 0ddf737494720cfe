"""Scaler benchmarks (``make bench``): the scaling evaluation table, reaction to a 5x step, GetMetrics latency.

``KVSCALE_BENCH_SCALING_CASES`` picks the trace:workload cases of the evaluation (default: the ones that fit in a
few minutes on two cores; ``all`` = every trace x workload), ``KVSCALE_BENCH_SCALING_DURATION`` the trace length.
"""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from kvscale.testing.procs import free_port
from protos import externalscaler_pb2 as pb
from protos import externalscaler_pb2_grpc as pb_grpc
from scaler.evaluate import EvalConfig, Evaluation, KvscaleProducer, VirtualSource, goal_check, print_table
from scaler.policy import ScalingPolicy
from scaler.service import ScalerApp, ScalerService
from scaler.testing import pods, poisson_load, write_latency_model

DEFAULT_CASES = "diurnal:reasoning,step:reasoning"
ALL_CASES = ",".join(f"{t}:{w}" for t in ("diurnal", "step", "bursty") for w in ("chat", "rag", "reasoning"))


def test_bench_scaling_evaluation(record_bench):
    spec = os.environ.get("KVSCALE_BENCH_SCALING_CASES", DEFAULT_CASES)
    cases = [c.split(":") for c in (ALL_CASES if spec == "all" else spec).split(",") if c]
    duration = float(os.environ.get("KVSCALE_BENCH_SCALING_DURATION", "1800"))
    results = {}
    summary = Table(title="kvscale vs oracle and baselines (GPU-hours, SLO attainment)")
    for col in ("case", "kvscale", "oracle", "static-peak", "keda-queue", "hpa-kv", "kvscale/oracle", "vs best 99%"):
        summary.add_column(col, justify="left" if col == "case" else "right")
    for trace, workload in cases:
        ev = Evaluation(EvalConfig(trace=trace, workload=workload, duration_s=duration))
        res = ev.run()
        res["goal"] = goal_check(res)
        print_table(res, Console(width=160))
        res.pop("timelines")
        res.pop("load")
        results[f"{trace}:{workload}"] = res
        p, g = res["policies"], res["goal"]

        def cell(name: str, p=p) -> str:
            return f"{p[name]['gpu_hours']:.2f} / {p[name]['slo_attainment'] * 100:.1f}%" if name in p else "-"

        summary.add_row(
            f"{trace} x {workload}", cell("kvscale"), cell("oracle"), cell("static-peak"), cell("keda-queue"),
            cell("hpa-kv"), f"{g.get('vs_oracle', float('nan')):.2f}",
            f"{g['saving_vs_best_baseline'] * 100:.0f}%" if "saving_vs_best_baseline" in g else "none at 99%",
        )  # fmt: skip
        assert p["kvscale"]["gpu_hours"] > 0 and 0 <= p["kvscale"]["slo_attainment"] <= 1
    Console(width=160).print(summary)
    record_bench("scaler_evaluation", {"duration_s": duration, "cases": results})


def test_bench_reaction_to_a_5x_step(record_bench):
    """Virtual clock: signals every 5 s (default); how long after a 5x step the desired count changes."""
    ev = Evaluation(EvalConfig(trace="step", workload="chat", duration_s=900, peak_replicas=6))
    step_at = 300.0
    cluster = ev._cluster(ev.initial())
    s = ev.settings["aggregated"]
    producer = KvscaleProducer(ScalingPolicy(s, ev.model), VirtualSource(cluster, "aggregated", s, ev.max_model_len),
                               cluster)  # fmt: skip

    class Ctl:
        interval_s = s.signal_interval_s

        def tick(self, now, cluster):
            producer(now)

    cluster.run([r for r in ev.trace if r.arrival_s < step_at + 60], controller=Ctl(), until_s=step_at + 60)
    before = [d for t, d, _ in producer.trace if t <= step_at]
    after = [(t, d) for t, d, _ in producer.trace if t > step_at and d != before[-1]]
    reaction = after[0][0] - step_at if after else float("inf")
    table = Table(title="reaction to a 5x load step (virtual clock, signal interval 5 s)")
    table.add_column("desired before")
    table.add_column("first change")
    table.add_column("reaction (s)", justify="right")
    table.add_row(str(before[-1]), f"{after[0][1]} at t={after[0][0]:.0f}s" if after else "none",
                  f"{reaction:.1f}")  # fmt: skip
    Console().print(table)
    record_bench("scaler_reaction", {"step_at_s": step_at, "desired_before": before[-1], "reaction_s": reaction,
                                     "signal_interval_s": s.signal_interval_s, "trace": producer.trace[:120]})
    assert after, "the desired count never changed after the step"


def test_bench_getmetrics_latency_20_scaledobjects(record_bench, tmp_path):
    """GetMetrics p50/p99 over real gRPC with 20 ScaledObjects registered (each scraping 2 simulator pods every
    signal interval), while the pods serve load."""

    async def main() -> dict[str, float]:
        model = write_latency_model(tmp_path / "model.json")
        async with pods(2) as sims:
            app = ScalerApp(ScalerService(), host="127.0.0.1", grpc_port=free_port(), metrics_port=None)
            await app.start()
            try:
                refs = [
                    pb.ScaledObjectRef(name=f"so-{i}", namespace="bench", scalerMetadata={
                        "pool": "aggregated", "model": "sim-model", "latencyModel": str(model),
                        "podUrls": ",".join(p.metrics_url for p in sims), "signalIntervalSeconds": "1"})
                    for i in range(20)
                ]  # fmt: skip
                import aiohttp

                async with grpc.aio.insecure_channel(f"127.0.0.1:{app.bound_grpc_port}") as ch, \
                        aiohttp.ClientSession() as http:  # fmt: skip
                    stub = pb_grpc.ExternalScalerStub(ch)
                    for r in refs:
                        await stub.GetMetricSpec(r)
                    load = asyncio.create_task(poisson_load(http, sims, 6.0, 14.0))
                    await asyncio.sleep(3.0)
                    lat = []
                    for i in range(2000):
                        req = pb.GetMetricsRequest(scaledObjectRef=refs[i % 20], metricName="m")
                        t0 = time.perf_counter()
                        await stub.GetMetrics(req)
                        lat.append(time.perf_counter() - t0)
                    await load
            finally:
                await app.stop()
        a = np.array(lat) * 1000
        return {"calls": len(a), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
                "max_ms": float(a.max())}  # fmt: skip

    res = asyncio.run(main())
    table = Table(title="GetMetrics latency, 20 ScaledObjects, 2 pods under load (goal p99 <= 5 ms)")
    for k in res:
        table.add_column(k, justify="right")
    table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in res.values()))
    Console().print(table)
    record_bench("scaler_getmetrics_latency", res)

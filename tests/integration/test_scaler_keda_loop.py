"""A KEDA-like loop over the real gRPC service scales real simulator pods up under a 5x load step and back down.

The loop does what KEDA + the HPA do: every polling interval, GetMetrics (and IsActive), then the HPA's
AverageValue math (desired = ceil(metric / target 1), tolerance 0.1, scale-down stabilization), then it starts or
stops simulator pods. Pod discovery is the list of pods the loop runs (a static pod list passed as the
service's discovery factory; no Kubernetes API server exists here).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from pathlib import Path

import aiohttp
import grpc

from harness.load import LoadStats, poisson_load
from harness.procs import free_port
from harness.simpods import Pod, slow_latency_model, start_sim_pod, write_latency_model
from protos import externalscaler_pb2 as pb
from protos import externalscaler_pb2_grpc as pb_grpc
from scaler.app import ScalerApp
from scaler.service import ScalerService


class PoolDiscovery:
    """The loop's running pods, as pod discovery would list them."""

    def __init__(self, pods: list[Pod]) -> None:
        self.pods = pods
        self.last_error = None

    def urls(self) -> list[str]:
        return [p.metrics_url for p in self.pods]

    def close(self) -> None:
        pass


async def test_keda_like_loop_scales_up_on_a_step_and_back_down(tmp_path: Path):
    model = write_latency_model(tmp_path / "model.json")
    pool: list[Pod] = [await start_sim_pod(slow_latency_model(), max_model_len=2048)]
    service = ScalerService(discovery_factory=lambda s: PoolDiscovery(pool))
    app = ScalerApp(service, host="127.0.0.1", grpc_port=free_port(), metrics_port=None, grace_s=0.5)
    await app.start()
    md = {"pool": "aggregated", "model": "sim-model", "latencyModel": str(model), "ttftSloMs": "500",
          "itlSloMs": "100", "podSelector": "app=sim", "signalIntervalSeconds": "1", "latencyWindowSeconds": "5",
          "stableWindowSeconds": "6", "panicWindowSeconds": "2", "startupSeconds": "1"}  # fmt: skip
    ref = pb.ScaledObjectRef(name="sim", namespace="default", scalerMetadata=md)
    history: list[tuple[float, int, int]] = []  # (t, metric, replicas)
    recs: list[tuple[float, int]] = []
    stop = asyncio.Event()

    t0 = time.monotonic()

    async def keda_loop(stub: pb_grpc.ExternalScalerStub) -> None:
        while not stop.is_set():
            m = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName="s0-kvscale"))
            assert (await stub.IsActive(ref)).result is True
            metric = m.metricValues[0].metricValueFloat
            current = len(pool)
            proposal = current if abs(1 - metric / current) <= 0.1 else math.ceil(metric)
            now = time.monotonic() - t0
            recs.append((now, proposal))
            # HPA scale-down stabilization, 8 s here (compressed like the 1 s signal interval; the committed
            # ScaledObject has 30 s). At 4 s, CI once passed the scaler's need wobbling 4/3/4 under the step
            # (5 sim pods + load on 2 cores) straight through as replica flaps.
            window = [p for t, p in recs if t >= now - 8.0]
            desired = max(1, proposal if proposal >= current else min(current, max(window)))
            while len(pool) < desired:
                pool.append(await start_sim_pod(slow_latency_model(), max_model_len=2048))
            while len(pool) > desired:
                await pool.pop().stop()
            history.append((now, int(metric), len(pool)))
            await asyncio.sleep(1.0)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.bound_grpc_port}") as ch, \
                aiohttp.ClientSession() as http:  # fmt: skip
            loop = asyncio.create_task(keda_loop(pb_grpc.ExternalScalerStub(ch)))
            stats = LoadStats()
            await poisson_load(http, lambda: pool, 3.0, 10.0, seed=1, stats=stats)
            step_at = time.monotonic() - t0
            await poisson_load(http, lambda: pool, 15.0, 18.0, seed=2, stats=stats)
            end_step = len(history)
            await poisson_load(http, lambda: pool, 1.0, 20.0, seed=3, stats=stats)
            stop.set()
            await loop
    finally:
        await app.stop()
        for p in pool:
            await p.stop()

    replicas = [r for _, _, r in history]
    trail = f"metric {[m for _, m, _ in history]}, replicas {replicas}"  # one per KEDA poll (1 s)
    assert stats.failed == 0 and stats.ok > 200
    assert max(replicas[:end_step]) >= 3, trail  # scaled up under the 5x step (~15 / 5.2 per replica)
    assert replicas[-1] <= 2, trail  # and back down after it
    # without oscillation: the replica count changes direction at most once (up..., then down...)
    moves = [b - a for a, b in itertools.pairwise(replicas) if b != a]
    reversals = sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))
    assert reversals <= 1, trail
    # the scaler's metric reacted to the step within a few signal intervals (1 s each; KEDA polls every 1 s)
    first_up = next(t for t, m, _ in history if m >= 3 or (t >= step_at and m >= 2))
    print(f"\nstep at {step_at:.1f}s, metric rose at {first_up:.1f}s; history (t, metric, replicas): {history}")
    assert first_up - step_at <= 4.0, trail

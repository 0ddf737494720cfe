"""Two scaler replicas behind one Service (deploy/base/scaler): losing the one KEDA talks to changes nothing.

KEDA keeps one gRPC connection per scalerAddress, so only one replica hears a ScaledObject until that replica
goes away; then KEDA reconnects through the Service to the other, which meets the ScaledObject cold. Over real
gRPC against real simulator pods under steady load, this checks what the failover relies on: the cold replica
answers the current pod count at once (never 0: no scale-down, no idle) and decides from signals within a couple
of intervals. That the two then answer the same decision for the same pods is checked deterministically on the
virtual clock (tests/unit/test_scaler_replicas_agree.py): here two replicas' scrapes land at different moments.

Under steady load, that is. During a ramp the replicas differ for longer: the demand forecast's trend has a 120 s
time constant (scaler/forecast.py), so a replica that met the pool mid-ramp under-forecasts the trend for a few
minutes (it still sizes for the demand it measures: never below the smoothed present); and the recurring-burst
memory (``maxBurstHoldSeconds``, off here) is per replica, so a replica that has not seen the last bursts may scale
down up to that much earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc

from harness.load import poisson_load
from harness.procs import free_port
from harness.simpods import sim_pods, slow_latency_model, write_latency_model
from protos import externalscaler_pb2 as pb
from protos import externalscaler_pb2_grpc as pb_grpc
from scaler.app import ScalerApp
from scaler.service import ScalerService

STABLE_S = 4.0


@contextlib.asynccontextmanager
async def replica() -> AsyncIterator[tuple[pb_grpc.ExternalScalerStub, ScalerService]]:
    service = ScalerService()
    app = ScalerApp(service, host="127.0.0.1", grpc_port=free_port(), metrics_port=None, grace_s=0.5)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.bound_grpc_port}") as ch:
            yield pb_grpc.ExternalScalerStub(ch), service
    finally:
        await app.stop()


async def desired(stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef) -> int:
    r = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName="s0-kvscale"))
    return int(r.metricValues[0].metricValue)


async def test_a_cold_replica_answers_the_current_pods_then_decides(tmp_path: Path) -> None:
    model = write_latency_model(tmp_path / "model.json")
    async with sim_pods(2, slow_latency_model(), max_model_len=2048) as sims, aiohttp.ClientSession() as http:
        md = {"pool": "aggregated", "model": "sim-model", "latencyModel": str(model), "ttftSloMs": "500",
              "itlSloMs": "100", "sloPercentile": "90", "podUrls": ",".join(p.metrics_url for p in sims),
              "signalIntervalSeconds": "0.5", "latencyWindowSeconds": "5", "stableWindowSeconds": str(STABLE_S),
              "panicWindowSeconds": "1"}  # fmt: skip
        ref = pb.ScaledObjectRef(name="vllm", namespace="llm", scalerMetadata=md)
        load = asyncio.create_task(poisson_load(http, sims, rate=12.0, duration_s=2 * STABLE_S + 4))
        async with replica() as (warm, _):
            await desired(warm, ref)  # KEDA's first call registers the ScaledObject on the warm replica
            await asyncio.sleep(STABLE_S)
            async with replica() as (cold, cold_service):
                assert await desired(cold, ref) == len(sims)  # before any decision: the current pods, never 0
                tracker = cold_service.trackers[("llm", "vllm")]
                for _ in range(40):  # its first decision from signals comes within a couple of intervals
                    if tracker.decision is not None and tracker.decision.reason != "hold-no-data":
                        break
                    await asyncio.sleep(0.1)
                assert tracker.decision is not None and tracker.decision.reason != "hold-no-data", tracker.decision
                assert 1 <= await desired(cold, ref) <= 100
                assert 1 <= await desired(warm, ref) <= 100
        stats = await load
    assert stats.ok > 40 and stats.failed == 0

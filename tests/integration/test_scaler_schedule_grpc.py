"""Scheduled floors over real gRPC (generated stubs) against the real ScalerApp and a real (idle) simulator pod:
GetMetrics answers the window's desiredReplicas from a cold start before its start until its end, /metrics says
why, and a bad window is INVALID_ARGUMENT. The scaler's wall clock is injected (``ScalerService(wall_clock=...)``)
so that the test does not wait for 08:00; everything else is the production path."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

import aiohttp
import grpc
import pytest
from scalers_for_tests import scaler

from harness.simpods import sim_pods
from protos import externalscaler_pb2 as pb

WALL = {"now": datetime(2026, 12, 1, 7, 0, tzinfo=UTC).timestamp()}


async def desired(stub, ref: pb.ScaledObjectRef, want: int, within_s: float = 5.0) -> int:
    """GetMetrics until it answers ``want`` (or the time is up); the last answer."""
    got = -1
    for _ in range(int(within_s / 0.25)):
        resp = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref), timeout=10)
        got = resp.metricValues[0].metricValue
        if got == want:
            break
        await asyncio.sleep(0.25)
    return got


@pytest.mark.timeout(120)
async def test_a_scheduled_window_raises_the_answer_ahead_of_its_start() -> None:
    async with sim_pods(1) as pods, scaler(wall_clock=lambda: WALL["now"]) as (app, stub), \
            aiohttp.ClientSession() as http:  # fmt: skip
        md = {"pool": "aggregated", "model": "sim-model", "podUrls": pods[0].metrics_url,
              "signalIntervalSeconds": "0.3", "latencyWindowSeconds": "1", "stableWindowSeconds": "1",
              "panicWindowSeconds": "0.5", "startupSeconds": "120",
              "scheduleFloors": '- {start: "0 8 * * *", end: "0 9 * * *", desiredReplicas: 3}'}  # fmt: skip
        ref = pb.ScaledObjectRef(name="so", namespace="llm", scalerMetadata=md)
        await stub.GetMetricSpec(ref, timeout=10)
        assert await desired(stub, ref, 1) == 1  # 07:00, an idle pod: the usual floor of 1
        WALL["now"] = datetime(2026, 12, 1, 7, 58, 30, tzinfo=UTC).timestamp()  # 90 s before: inside the lead
        assert await desired(stub, ref, 3) == 3
        async with http.get(f"http://127.0.0.1:{app.metrics_port}/metrics") as r:
            page = await r.text()
        assert re.search(r"kvscale_scaler_schedule_floor_replicas{[^}]*} 3.0", page), page[:2000]
        assert re.search(r'kvscale_scaler_decision_reason{[^}]*reason="schedule-floor"[^}]*} 1.0', page)
        WALL["now"] = datetime(2026, 12, 1, 9, 0, 1, tzinfo=UTC).timestamp()  # after the end: back to demand
        assert await desired(stub, ref, 1, within_s=10) == 1
        bad = {**md, "scheduleFloors": '- {start: "0 8 * * *", end: "0 9 * * *", desiredReplicas: 3, '
                                       'timezone: Mars/Olympus}'}  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.GetMetricSpec(pb.ScaledObjectRef(name="bad", namespace="llm", scalerMetadata=bad), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "scalerMetadata.scheduleFloors: window 1: unknown time zone" in (e.value.details() or "")

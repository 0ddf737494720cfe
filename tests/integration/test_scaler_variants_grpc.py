"""A variant group over real gRPC: two ScaledObjects of one pool on different "hardware" (simulator pods with a
fast and a slow latency model, each variant's ScaledObject naming its own model and price), generated client
stubs against ``ScalerApp``. Each GetMetrics answers its variant's share of the group's least-cost split, and the
split published on /metrics is the least-cost cover of the published requirement (checked here by enumeration).
"""

from __future__ import annotations

import asyncio
import itertools
import re
from dataclasses import replace
from pathlib import Path

import aiohttp
import grpc
from test_scaler_grpc import metadata, scaler

from harness.load import poisson_load
from harness.simpods import sim_pods, slow_latency_model, write_latency_model
from kvscale.latency import StepCoefficients
from protos import externalscaler_pb2 as pb
from protos import externalscaler_pb2_grpc as pb_grpc
from scaler.variants import KEEP_WITHIN


def fast_model():
    slow = slow_latency_model()
    c = slow.coefficients
    return replace(slow, name="test-fast", coefficients=StepCoefficients(
        c.base_s / 2, c.per_prefill_token_s / 2, 0.0, c.per_decode_seq_s / 2, c.per_decode_ctx_s / 2))  # fmt: skip


def gauge(text: str, name: str, so: str) -> float:
    m = re.search(rf'^{name}{{[^}}]*scaledobject="{so}"[^}}]*}} (\S+)$', text, flags=re.M)
    assert m, (name, so)
    return float(m.group(1))


async def test_variant_group_splits_at_least_cost(tmp_path: Path) -> None:
    fast_path = write_latency_model(tmp_path / "fast.json", fast_model())
    slow_path = write_latency_model(tmp_path / "slow.json")
    # The fast variant has twice the capacity at 3x the price: the slow one is cheaper per unit, up to its max.
    costs, bounds = {"fast": 3.0, "slow": 1.0}, {"fast": (1, 6), "slow": (0, 1)}
    async with (sim_pods(1, fast_model(), max_model_len=2048) as fast, sim_pods(1, max_model_len=2048) as slow,
                scaler() as app, aiohttp.ClientSession() as http):  # fmt: skip
        pods = {"fast": (fast, fast_path), "slow": (slow, slow_path)}
        refs = {name: pb.ScaledObjectRef(name=name, namespace="llm", scalerMetadata=metadata(
                    path, [p.metrics_url for p in sims], variantGroup="fleet", costPerHour=str(costs[name]),
                    minReplicas=str(bounds[name][0]), maxReplicas=str(bounds[name][1])))
                for name, (sims, path) in pods.items()}  # fmt: skip
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.bound_grpc_port}") as ch:
            stub = pb_grpc.ExternalScalerStub(ch)
            for r in refs.values():
                await stub.GetMetricSpec(r)
            load = asyncio.create_task(poisson_load(http, [*fast, *slow], rate=20.0, duration_s=8.0))
            snapshots = []
            for _ in range(16):
                await asyncio.sleep(0.5)
                shares = {n: (await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=r, metricName="m")))
                          .metricValues[0].metricValue for n, r in refs.items()}  # fmt: skip
                async with http.get(f"http://127.0.0.1:{app.metrics_port}/metrics") as resp:
                    snapshots.append((shares, await resp.text()))
            stats = await load
        assert stats.ok > 50 and stats.failed == 0
    checked = filled = 0
    for _shares, text in snapshots:
        if "kvscale_scaler_variant_group_requirement{" not in text or not all(
                re.search(rf'^kvscale_scaler_capacity_per_replica{{[^}}]*scaledobject="{n}"', text, flags=re.M)
                for n in refs):
            continue  # before every member's first decision (the group's requirement comes with the first one)
        req = gauge(text, "kvscale_scaler_variant_group_requirement", "fast")
        cap = {n: gauge(text, "kvscale_scaler_capacity_per_replica", n) for n in refs}
        desired = {n: int(gauge(text, "kvscale_scaler_desired_replicas", n)) for n in refs}
        assert gauge(text, "kvscale_scaler_variant_group_requirement", "slow") == req  # one requirement
        for n in refs:
            lo, hi = bounds[n]
            assert lo <= desired[n] <= hi
        assert sum(desired[n] * cap[n] for n in refs) >= req - 1e-6  # the split covers the requirement
        covers = [c for c in itertools.product(*(range(bounds[n][0], bounds[n][1] + 1) for n in refs))
                  if sum(k * cap[n] for k, n in zip(c, refs, strict=True)) >= req - 1e-6]  # fmt: skip
        best = min(sum(k * costs[n] for k, n in zip(c, refs, strict=True)) for c in covers)
        got = sum(desired[n] * costs[n] for n in refs)
        assert got <= best * (1 + KEEP_WITHIN) + 1e-9, (desired, cap, req)  # the optimum, or a kept mix
        assert cap["fast"] > 1.5 * cap["slow"]  # each variant is sized by its own latency model
        if req > cap["slow"] * bounds["slow"][1]:
            filled += desired["slow"] == bounds["slow"][1]  # the cheap one is full before the dear one grows
        checked += 1
    assert checked >= 5
    # under this load the cheap variant is used up to its maximum before the dear one grows
    assert filled >= 5, [s for s, _ in snapshots]
    assert re.search(r'kvscale_scaler_decision_reason{[^}]*reason="variant-split"[^}]*} 1.0', snapshots[-1][1])
    assert "kvscale_scaler_variant_own_desired_replicas{" in snapshots[-1][1]

"""Real Prometheus (the Debian package's binary) scraping real simulator pods every second.

The scaler in prometheus mode and in pods mode reaches the same decision under the same load; killing the
metrics source (Prometheus, or the pods themselves) holds the replicas and counts signal errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from harness.load import poisson_load
from harness.prometheus import Prometheus
from harness.simpods import sim_pods, slow_latency_model, write_latency_model
from protos import externalscaler_pb2 as pb
from scaler.service import ScalerService

pytestmark = pytest.mark.skipif(not Prometheus.available(), reason="/usr/bin/prometheus is not installed")


@pytest.fixture(scope="module")
def prom_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("prometheus")


def md(model: Path, **kw: str) -> dict[str, str]:
    return {"pool": "aggregated", "model": "sim-model", "latencyModel": str(model), "ttftSloMs": "500",
            "itlSloMs": "100", "signalIntervalSeconds": "2", "latencyWindowSeconds": "10", "stableWindowSeconds": "4",
            "panicWindowSeconds": "2", "startupSeconds": "5", **kw}  # fmt: skip


async def test_prometheus_and_pods_modes_agree_and_hold_when_the_source_dies(prom_dir: Path):
    model = write_latency_model(prom_dir / "model.json")
    async with sim_pods(2, slow_latency_model(), max_model_len=2048) as sims, aiohttp.ClientSession() as http:
        prom = Prometheus(prom_dir, [f"127.0.0.1:{p.port}" for p in sims], scrape_interval_s=1.0).start()
        service = ScalerService()
        await service.start()
        try:
            pods_ref = pb.ScaledObjectRef(name="by-pods", namespace="llm", scalerMetadata=md(
                model, podUrls=",".join(p.metrics_url for p in sims)))
            prom_ref = pb.ScaledObjectRef(name="by-prom", namespace="llm", scalerMetadata=md(
                model, metricsSource="prometheus", prometheusUrl=prom.url, prometheusSelector='job="vllm"'))
            by_pods, by_prom = service.tracker(pods_ref), service.tracker(prom_ref)
            # 8 req/s on a pool whose planned capacity is ~5.2 req/s per replica: 2 replicas
            await poisson_load(http, sims, rate=8.0, duration_s=22.0, seed=3)
            dp, dq = by_pods.decision, by_prom.decision
            assert dp is not None and dq is not None and dp.ok and dq.ok, (dp, dq)
            assert dp.desired == dq.desired == 2, (dp, dq)
            ip, iq = dp.inputs, dq.inputs
            assert ip["isl"] == pytest.approx(iq["isl"], rel=0.05)
            assert iq["arrival_rate"] == pytest.approx(8.0, rel=0.3)  # rate() over 10 s
            assert ip["arrival_rate"] == pytest.approx(8.0, rel=0.6)  # one 2-s window: Poisson noise
            assert ip["observed_ttft_s"] == pytest.approx(iq["observed_ttft_s"], rel=0.35)

            # kill Prometheus: prometheus mode holds its decision and counts errors
            prom.stop()
            await asyncio.sleep(5)
            held = by_prom.decision
            assert held.reason == "hold-signal-error" and held.desired == dq.desired and not held.ok
            assert service.metrics.errors.labels("llm", "by-prom", "aggregated", "sim-model")._value.get() >= 1
            # kill the pods: pods mode holds its last good decision too (a failed read is never "idle"); the pool
            # has been idle for seconds, so that decision may already be a scale-down from dp
            last = by_pods.decision
            assert last is not None and last.ok, last
            for p in sims:
                await p.stop()
            await asyncio.sleep(5)
            held = by_pods.decision
            assert held.reason == "hold-signal-error" and held.desired == last.desired and held.active
        finally:
            prom.stop()
            await service.stop()


async def test_prometheus_and_pods_modes_scale_sglang_pods(prom_dir: Path):
    """SGLang pods (the simulator's ``--metrics-flavor sglang`` names): Prometheus mode finds the engine by its
    running-requests series and reads the same quantities from SGLang's names; SGLang exports no request-length
    histograms, so both modes take the mean ISL/OSL from the token counters over the finished requests. Under
    load both decide (no hold) on sizes close to the load's 40-token prompts and 8-token outputs."""
    model = write_latency_model(prom_dir / "model-sglang.json")
    async with (
        sim_pods(2, slow_latency_model(), max_model_len=2048, metrics_flavor="sglang") as sims,
        aiohttp.ClientSession() as http,
    ):
        prom = Prometheus(prom_dir / "sglang", [f"127.0.0.1:{p.port}" for p in sims], scrape_interval_s=1.0).start()
        service = ScalerService()
        await service.start()
        try:
            pods_ref = pb.ScaledObjectRef(name="sgl-pods", namespace="llm", scalerMetadata=md(
                model, podUrls=",".join(p.metrics_url for p in sims)))
            prom_ref = pb.ScaledObjectRef(name="sgl-prom", namespace="llm", scalerMetadata=md(
                model, metricsSource="prometheus", prometheusUrl=prom.url, prometheusSelector='job="vllm"'))
            by_pods, by_prom = service.tracker(pods_ref), service.tracker(prom_ref)
            load = asyncio.create_task(poisson_load(http, sims, rate=8.0, duration_s=16.0, seed=5))
            seen: dict[str, set[str]] = {"pods": set(), "prom": set()}
            while not load.done():
                for mode, tr in (("pods", by_pods), ("prom", by_prom)):
                    if tr.decision is not None:
                        seen[mode].add(tr.decision.reason)
                await asyncio.sleep(0.25)
            await load
            assert by_prom.source.engine is not None and by_prom.source.engine.engine == "sglang"
            for mode, tr in (("pods", by_pods), ("prom", by_prom)):
                d = tr.decision
                # decided from good signals: neither "no data" (no sizes) nor a failed read
                assert d is not None and d.ok and d.reason not in ("hold-no-data", "hold-signal-error"), (mode, d)
                assert any(not r.startswith("hold") for r in seen[mode]), (mode, seen[mode])
                assert d.desired >= 1, d
                assert d.inputs["isl"] == pytest.approx(40.0, rel=0.2), (mode, d.inputs)
                assert d.inputs["osl"] == pytest.approx(8.0, rel=0.25), (mode, d.inputs)
            assert by_prom.decision.inputs["arrival_rate"] == pytest.approx(8.0, rel=0.35)
        finally:
            prom.stop()
            await service.stop()

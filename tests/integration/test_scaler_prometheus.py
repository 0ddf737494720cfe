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
            # kill the pods: pods mode holds too (a failed read is never "idle")
            for p in sims:
                await p.stop()
            await asyncio.sleep(5)
            held = by_pods.decision
            assert held.reason == "hold-signal-error" and held.desired == dp.desired and held.active
        finally:
            prom.stop()
            await service.stop()

"""What a bad ScaledObject, a broken pod exporter and a second scaler did to the scaler (issue "Hardening", scaler
items 7-11), over real gRPC (generated stubs) against the real ScalerApp and real simulator pods.

One stand-in: :func:`exporter`, a minimal HTTP server serving a *recorded real vLLM metrics page* with one value
changed (a broken exporter cannot be asked of a real engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web
from routers_for_tests import serve_app
from scalers_for_tests import scaler

from harness.load import poisson_load
from harness.simpods import sim_pods, slow_latency_model, write_latency_model
from protos import externalscaler_pb2 as pb
from scaler.app import ScalerApp
from scaler.service import ScalerService

VLLM_PAGE = Path(__file__).parents[1] / "data" / "vllm_reference" / "metrics.txt"


def ref(md: dict[str, str], name: str = "so") -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name=name, namespace="llm", scalerMetadata=md)


BASE = {"pool": "aggregated", "model": "sim-model", "podUrls": "http://127.0.0.1:1/metrics"}


async def code_of(stub, md: dict[str, str]) -> tuple[grpc.StatusCode, str]:
    try:
        await stub.GetMetricSpec(ref(md), timeout=10)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def test_bad_metadata_is_invalid_argument_never_unknown() -> None:
    async with scaler() as (_, stub):
        cases = {
            "itlSloMs": "5",  # below the 8B model's unloaded decode step
            "ttftSloMs": "1e-320",
            "targetUtilization": "1e-320",
            "kvUsageThreshold": "1e-320",
            "podUrls": "http://[::1",
            "maxReplicas": "0",
            "metricsPort": "\uff11\uff10",  # full-width digits
            "stableWindowSeconds": "1_000",
            "model": "m" * 1_000_000,
        }
        for key, value in cases.items():
            code, details = await code_of(stub, {**BASE, key: value})
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (key, code, details[:200])
            assert f"scalerMetadata.{key}" in details and len(details) < 1200, (key, details[:300])
        code, details = await code_of(stub, {**BASE, "itlSloMs": "5"})
        assert re.search(r"below the latency model's unloaded decode step \([0-9.]+ ms", details), details
        for ok in ({"stableWindowSeconds": "1000", "targetUtilization": "0.5", "maxReplicas": "8"},
                   {"ttftSloMs": "250.5", "itlSloMs": "1e2"}):  # fmt: skip
            assert (await code_of(stub, {**BASE, **ok}))[0] == grpc.StatusCode.OK, ok


async def test_an_unreachable_slo_holds_instead_of_growing(tmp_path: Path) -> None:
    """Long prompts against a TTFT SLO a bit above one idle prefill of a short prompt: the capacity model finds no
    count that meets it, so the scaler holds (reason slo-unattainable, its gauge 1) instead of doubling each
    interval; and whatever the signals, no decision exceeds maxReplicas."""
    model = write_latency_model(tmp_path / "m.json")
    async with sim_pods(1, slow_latency_model(), max_model_len=2048) as pods, scaler() as (app, stub), \
            aiohttp.ClientSession() as http:  # fmt: skip
        md = {"pool": "aggregated", "model": "sim-model", "latencyModel": str(model), "ttftSloMs": "60",
              "itlSloMs": "100", "podUrls": pods[0].metrics_url, "signalIntervalSeconds": "0.5",
              "latencyWindowSeconds": "3", "stableWindowSeconds": "2", "panicWindowSeconds": "1",
              "maxReplicas": "3"}  # fmt: skip
        await stub.GetMetricSpec(ref(md), timeout=10)
        await poisson_load(http, pods, rate=4.0, duration_s=4.0, prompt_tokens=400, max_tokens=4)
        tr = app.service.trackers[("llm", "so")]
        seen = set()
        for _ in range(8):
            d = app.service.trackers[("llm", "so")].decision
            seen.add((d.reason, d.desired))
            assert d.desired <= 3
            await asyncio.sleep(0.5)
        assert tr.decision.reason == "slo-unattainable", seen
        async with http.get(f"http://127.0.0.1:{app.metrics_port}/metrics") as r:
            text = await r.text()
        assert 'kvscale_scaler_slo_unattainable{model="sim-model",namespace="llm",pool="aggregated",' \
               'scaledobject="so"} 1.0' in text  # fmt: skip


@contextlib.asynccontextmanager
async def exporter(**replace: str) -> AsyncIterator[str]:
    """A recorded real vLLM /metrics page with the named series' values replaced."""
    page = VLLM_PAGE.read_text()
    for name, value in replace.items():
        page, n = re.subn(rf"^({re.escape(name)}(\{{[^}}]*\}})?) \S+$", rf"\g<1> {value}", page, flags=re.M)
        assert n, name
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=page)

    app.router.add_get("/metrics", metrics)
    async with serve_app(app) as url:
        yield url + "/metrics"


@pytest.mark.parametrize("series", [{"vllm:kv_cache_usage_perc": "100"}, {"vllm:num_requests_waiting": "1e12"},
                                    {"vllm:num_requests_running": "-3"}])  # fmt: skip
async def test_implausible_pod_gauges_are_a_failed_read(series: dict[str, str]) -> None:
    async with exporter(**series) as bad, scaler() as (app, stub):
        md = {**BASE, "model": "kvscale-tiny", "podUrls": bad, "signalIntervalSeconds": "0.3",
              "latencyWindowSeconds": "1"}  # fmt: skip
        await stub.GetMetricSpec(ref(md), timeout=10)
        await asyncio.sleep(1.5)
        tr = app.service.trackers[("llm", "so")]
        assert tr.decision is not None and tr.decision.reason.startswith("hold"), tr.decision
        assert "implausible" in (tr.last_error or ""), tr.last_error
        assert app.service.metrics.pod_errors.labels(*tr.labels)._value.get() >= 2
        # nothing good was ever read: the current pod count is held (the value alone would have asked for 112)
        resp = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(md)), timeout=10)
        assert resp.metricValues[0].metricValue == 1


@pytest.mark.timeout(60)
async def test_an_open_stream_keeps_its_scaledobject_alive(tmp_path: Path) -> None:
    """A ScaledObject whose only caller is a StreamIsActive stream (scale from zero by push) outlives
    --expire-after and still pushes: idle → False, load → True, with expiry at 2 s."""
    model = write_latency_model(tmp_path / "m.json")
    async with sim_pods(1, slow_latency_model(), max_model_len=2048) as pods, \
            scaler(expire_after_s=2.0) as (app, stub), aiohttp.ClientSession() as http:  # fmt: skip
        md = {"pool": "aggregated", "model": "sim-model", "latencyModel": str(model), "ttftSloMs": "500",
              "itlSloMs": "100", "podUrls": pods[0].metrics_url, "scaleToZero": "true",
              "signalIntervalSeconds": "0.5", "latencyWindowSeconds": "2", "stableWindowSeconds": "1",
              "panicWindowSeconds": "0.5"}  # fmt: skip
        stream = stub.StreamIsActive(ref(md))
        got: list[tuple[float, bool]] = []
        t0 = time.monotonic()

        async def read() -> None:
            async for msg in stream:
                got.append((time.monotonic() - t0, msg.result))

        reader = asyncio.create_task(read())
        try:
            deadline = time.monotonic() + 20
            while not (got and got[-1][1] is False) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert got and got[-1][1] is False, got
            await asyncio.sleep(4.0)  # twice the expiry with no call but the open stream
            assert ("llm", "so") in app.service.trackers
            await poisson_load(http, pods, rate=4.0, duration_s=3.0)
            deadline = time.monotonic() + 10
            while got[-1][1] is not True and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert got[-1][1] is True, got
        finally:
            stream.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader


async def test_a_second_scaler_cannot_take_the_same_port() -> None:
    async with scaler() as (first, _):
        second = ScalerApp(ScalerService(), host="127.0.0.1", grpc_port=first.bound_grpc_port, metrics_port=None)
        with pytest.raises(OSError, match="cannot bind the gRPC port"):
            await second.start()
        await second.service.stop()


async def test_pod_selector_without_kubernetes_is_unavailable_with_a_reason(monkeypatch) -> None:
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    async with scaler() as (_, stub):
        md = {"pool": "aggregated", "model": "m", "podSelector": "app=vllm"}
        await stub.GetMetricSpec(ref(md), timeout=10)
        await asyncio.sleep(1.0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(md)), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "pod discovery" in err.value.details() and "config" in err.value.details().lower()

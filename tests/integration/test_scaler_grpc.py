"""The KEDA external scaler over real gRPC: generated client stubs against `ScalerApp`, real simulator pods.

Covers every RPC of KEDA's contract, INVALID_ARGUMENT on bad metadata, health and reflection, TLS and mTLS with
certificates generated here, the /metrics page, and a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness.certs import generate_certs
from harness.load import poisson_load
from harness.procs import free_port
from harness.simpods import sim_pods, slow_latency_model, write_latency_model
from protos import externalscaler_pb2 as pb
from protos import externalscaler_pb2_grpc as pb_grpc
from scaler.app import ScalerApp, TLSFiles
from scaler.service import ScalerService


def metadata(model_path: Path, urls: list[str], **extra: str) -> dict[str, str]:
    return {
        "pool": "aggregated", "model": "sim-model", "latencyModel": str(model_path), "ttftSloMs": "500",
        "itlSloMs": "100", "sloPercentile": "90", "podUrls": ",".join(urls), "signalIntervalSeconds": "0.5",
        "latencyWindowSeconds": "5", "stableWindowSeconds": "5", "panicWindowSeconds": "1", **extra,
    }  # fmt: skip


@contextlib.asynccontextmanager
async def scaler(tls: TLSFiles | None = None) -> AsyncIterator[ScalerApp]:
    app = ScalerApp(ScalerService(), host="127.0.0.1", grpc_port=free_port(), metrics_port=free_port(), tls=tls,
                    grace_s=1.0)  # fmt: skip
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def ref(md: dict[str, str], name: str = "decode-pool") -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name=name, namespace="llm", scalerMetadata=md)


async def test_every_rpc_against_simulator_pods(tmp_path: Path):
    model = write_latency_model(tmp_path / "model.json")
    pods = sim_pods(2, slow_latency_model(), max_model_len=2048)
    async with pods as sims, scaler() as app, aiohttp.ClientSession() as http:
        md = metadata(model, [p.metrics_url for p in sims])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.bound_grpc_port}") as ch:
            stub = pb_grpc.ExternalScalerStub(ch)
            spec = await stub.GetMetricSpec(ref(md))
            assert [(s.metricName, s.targetSize, s.targetSizeFloat) for s in spec.metricSpecs] == [
                ("kvscale-desired-replicas-aggregated", 1, 1.0)
            ]
            # Before any decision: the current pod count (2), not 0.
            first = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(md), metricName="s0-x"))
            assert first.metricValues[0].metricName == "s0-x"
            assert first.metricValues[0].metricValue == 2 and first.metricValues[0].metricValueFloat == 2.0
            assert (await stub.IsActive(ref(md))).result is True
            stream = stub.StreamIsActive(ref(md))
            assert (await stream.read()).result is True
            stream.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.StreamMetricSpec(ref(md)).read()
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

            # Load above one replica's capacity: the desired count rises above 2 within a few signal intervals.
            load = asyncio.create_task(poisson_load(http, sims, rate=16.0, duration_s=6.0))
            desired = []
            for _ in range(24):
                await asyncio.sleep(0.5)
                m = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(md), metricName="m"))
                desired.append(m.metricValues[0].metricValue)
                assert m.metricValues[0].metricValueFloat == float(m.metricValues[0].metricValue)
            stats = await load
            assert stats.ok > 50 and stats.failed == 0
            assert max(desired) >= 3, desired
            # health + reflection
            h = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="externalscaler.ExternalScaler")
            )
            assert h.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = {s.name async for r in refl for s in r.list_services_response.service}
            assert "externalscaler.ExternalScaler" in names and "grpc.health.v1.Health" in names
        async with http.get(f"http://127.0.0.1:{app.metrics_port}/metrics") as r:
            text = await r.text()
        labels = 'model="sim-model",namespace="llm",pool="aggregated",scaledobject="decode-pool"'
        for name in ("kvscale_scaler_desired_replicas", "kvscale_scaler_arrival_rate",
                     "kvscale_scaler_observed_ttft_seconds", "kvscale_scaler_predicted_ttft_seconds",
                     "kvscale_scaler_predicted_itl_seconds", "kvscale_scaler_observed_itl_seconds",
                     "kvscale_scaler_kv_usage_ratio", "kvscale_scaler_queue_requests",
                     "kvscale_scaler_mean_input_tokens"):  # fmt: skip
            assert f"{name}{{{labels}}}" in text, name
        assert "kvscale_scaler_decision_reason{" in text
        assert f"kvscale_scaler_signal_errors_total{{{labels}}} 0.0" in text  # all reads succeeded


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"pool": "mixed"}, "pool"),
        ({"pool": ""}, "pool"),
        ({"ttftSloMs": "fast"}, "ttftSloMs"),
        ({"sloPercentile": "100"}, "sloPercentile"),
        ({"metricsSource": "statsd"}, "metricsSource"),
        ({"latencyModel": "/nope.json"}, "latencyModel"),
        ({"ttftSLOms": "5"}, "ttftSLOms"),
    ],
)
async def test_bad_metadata_is_invalid_argument(tmp_path: Path, change: dict[str, str], key: str):
    model = write_latency_model(tmp_path / "model.json")
    async with scaler() as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.bound_grpc_port}") as ch:
        stub = pb_grpc.ExternalScalerStub(ch)
        md = {**metadata(model, ["http://127.0.0.1:1/metrics"]), **change}
        for call in (stub.GetMetricSpec(ref(md)), stub.IsActive(ref(md)),
                     stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(md), metricName="m"))):  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"scalerMetadata.{key}" in err.value.details(), err.value.details()
        # the server is fine afterwards
        assert (await stub.GetMetricSpec(ref(metadata(model, ["http://127.0.0.1:1/metrics"])))).metricSpecs


async def test_unknown_before_any_read_is_unavailable_not_zero(tmp_path: Path):
    """Pods that never answer: GetMetrics must not say 0 (that would scale down); it answers the pod count known
    from discovery, and signal errors are counted."""
    model = write_latency_model(tmp_path / "model.json")
    dead = [f"http://127.0.0.1:{free_port()}/metrics" for _ in range(3)]
    async with scaler() as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.bound_grpc_port}") as ch:
        stub = pb_grpc.ExternalScalerStub(ch)
        md = metadata(model, dead)
        for _ in range(4):
            m = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(md), metricName="m"))
            assert m.metricValues[0].metricValue == 3
            await asyncio.sleep(0.4)
        assert (await stub.IsActive(ref(md))).result is True
        tr = next(iter(app.service.trackers.values()))
        assert tr.decision is not None and tr.decision.reason == "hold-no-data"
        assert app.service.metrics.errors.labels("llm", "decode-pool", "aggregated", "sim-model")._value.get() >= 2


async def test_tls_and_mtls(tmp_path: Path):
    certs = generate_certs(tmp_path / "certs")
    model = write_latency_model(tmp_path / "model.json")
    md = metadata(model, ["http://127.0.0.1:1/metrics"])
    ca = certs["ca"].read_bytes()
    # server TLS: a client trusting our CA (KEDA's caCert) connects; a plaintext client does not
    async with scaler(TLSFiles(certs["server_cert"], certs["server_key"])) as app:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(f"localhost:{app.bound_grpc_port}", creds) as ch:
            assert (await pb_grpc.ExternalScalerStub(ch).GetMetricSpec(ref(md))).metricSpecs
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.bound_grpc_port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.ExternalScalerStub(ch).GetMetricSpec(ref(md), timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # mTLS: the client certificate (KEDA's tlsClientCert/tlsClientKey) is required and must chain to the CA
    async with scaler(TLSFiles(certs["server_cert"], certs["server_key"], certs["ca"])) as app:
        good = grpc.ssl_channel_credentials(ca, certs["client_key"].read_bytes(), certs["client_cert"].read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{app.bound_grpc_port}", good) as ch:
            assert (await pb_grpc.ExternalScalerStub(ch).IsActive(ref(md))).result is True
        for creds in (
            grpc.ssl_channel_credentials(ca),  # no client certificate
            grpc.ssl_channel_credentials(ca, certs["rogue_key"].read_bytes(), certs["rogue_cert"].read_bytes()),
        ):
            async with grpc.aio.secure_channel(f"localhost:{app.bound_grpc_port}", creds) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pb_grpc.ExternalScalerStub(ch).IsActive(ref(md), timeout=3)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_graceful_shutdown_reports_not_serving_and_ends_streams(tmp_path: Path):
    model = write_latency_model(tmp_path / "model.json")
    md = metadata(model, ["http://127.0.0.1:1/metrics"])
    app = ScalerApp(ScalerService(), host="127.0.0.1", grpc_port=free_port(), metrics_port=None, grace_s=0.5)
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.bound_grpc_port}") as ch:
        stream = pb_grpc.ExternalScalerStub(ch).StreamIsActive(ref(md))
        assert (await stream.read()).result is True
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(app.stop())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.wait_for(stopping, 10)
        with pytest.raises(grpc.aio.AioRpcError):
            await stream.read()
    assert not app.service.trackers

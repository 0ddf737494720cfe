"""Drain-safe scale-down, live: while the scaler asks for fewer pods than are ready, it sets each pod's
``controller.kubernetes.io/pod-deletion-cost`` to its running + waiting requests, through the real ``kubernetes``
client, so the ReplicaSet deletes the idlest pods first.

No Kubernetes API server can run here: the client talks to the minimal fake one of test_scaler_discovery (list,
watch, merge-patch of annotations). The pods' /metrics pages are the recorded vLLM page
(tests/data/vllm_reference/metrics.txt) with each pod's running and waiting counts written in, served on
127.0.0.1-3 (one loopback address per pod IP, as pods share the metrics port).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web
from kubernetes import client
from test_scaler_discovery import FakeApiServer, wait_for

from harness.procs import free_port
from protos import externalscaler_pb2 as pb
from scaler.discovery import DELETION_COST
from scaler.service import ScalerService, ServeOptions

PAGE = (Path(__file__).resolve().parents[1] / "data" / "vllm_reference" / "metrics.txt").read_text()


def page(running: int, waiting: int) -> str:
    text = re.sub(r"^(vllm:num_requests_running\{[^}]*\}) .*$", rf"\g<1> {running}.0", PAGE, flags=re.M)
    return re.sub(r"^(vllm:num_requests_waiting\{[^}]*\}) .*$", rf"\g<1> {waiting}.0", text, flags=re.M)


async def serve_pages(port: int, loads: dict[str, tuple[int, int]]) -> list[web.AppRunner]:
    runners = []
    for ip, (running, waiting) in loads.items():
        app = web.Application()
        text = page(running, waiting)

        async def metrics(_request: web.Request, text: str = text) -> web.Response:
            return web.Response(text=text, content_type="text/plain")

        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, ip, port).start()
        runners.append(runner)
    return runners


LABELS = {"namespace": "llm", "scaledobject": "llm", "pool": "aggregated", "model": "tiny-llama"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def pool(loads: dict[str, tuple[int, int]], patch: Handler | None = None
               ) -> AsyncIterator[tuple[FakeApiServer, int, client.ApiClient]]:  # fmt: skip
    """The fake API server (``patch``: its PATCH handler, default the merge-patch), one pod per loopback address
    of ``loads`` (running, waiting) serving its metrics page; yields (api, metrics port, a client of the API)."""
    api = FakeApiServer()
    runner, api_client = await api.serve(patch, access_log=None, shutdown_timeout=0.5)  # open watches end at once
    metrics_port = free_port()
    for i, ip in enumerate(loads):
        api.put(api.pod(f"vllm-{i}", ip, {"app": "vllm"}))
    pages = await serve_pages(metrics_port, loads)
    try:
        yield api, metrics_port, api_client
    finally:
        for r in pages:
            await r.cleanup()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def scaler(api_client: client.ApiClient) -> AsyncIterator[ScalerService]:
    service = ScalerService(kube_api_client=api_client, options=ServeOptions(parse_workers=0))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def metadata(port: int, **extra: str) -> dict[str, str]:
    return {"pool": "aggregated", "model": "tiny-llama", "podSelector": "app=vllm", "metricsPort": str(port),
            "signalIntervalSeconds": "0.2", "latencyWindowSeconds": "1", "stableWindowSeconds": "0",
            "panicWindowSeconds": "0", **extra}  # fmt: skip


def ref(md: dict[str, str]) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name="llm", namespace="llm", scalerMetadata=md)


async def test_scaler_marks_idle_pods_cheapest_before_a_scale_down() -> None:
    loads = {"127.0.0.1": (5, 2), "127.0.0.2": (0, 0), "127.0.0.3": (3, 0)}
    async with pool(loads) as (api, metrics_port, api_client), scaler(api_client) as service:
        tr = service.tracker(ref(metadata(metrics_port)))
        # idle counters: the policy asks for fewer than the 3 pods, and the pods get their costs
        await wait_for(lambda: tr.decision is not None and 0 <= tr.decision.desired < 3, timeout=15)
        await wait_for(lambda: len(api.patches) >= 3, timeout=10)
        costs = {n: p["metadata"]["annotations"][DELETION_COST] for n, p in api.pods.items()}
        assert costs == {"vllm-0": "7", "vllm-1": "0", "vllm-2": "3"}
        # unchanged loads: the annotations are not rewritten every interval
        n = len(api.patches)
        await asyncio.sleep(1.0)
        assert len(api.patches) == n
        assert service.metrics.registry.get_sample_value("kvscale_scaler_pod_deletion_cost_patches_total",
                                                         LABELS) == 3  # fmt: skip


async def test_without_patch_rights_the_scale_down_still_happens_and_the_error_is_counted() -> None:
    async def forbidden(_request: web.Request) -> web.Response:
        return web.json_response({"kind": "Status", "code": 403, "reason": "Forbidden",
                                  "message": 'pods "vllm-0" is forbidden: cannot patch resource "pods"'},
                                 status=403)  # fmt: skip

    def errors(service: ScalerService) -> float:
        return service.metrics.registry.get_sample_value("kvscale_scaler_pod_deletion_cost_errors_total",
                                                         LABELS) or 0  # fmt: skip

    loads = {"127.0.0.1": (1, 0), "127.0.0.2": (0, 0)}
    async with pool(loads, forbidden) as (_api, metrics_port, api_client):
        async with scaler(api_client) as service:
            tr = service.tracker(ref(metadata(metrics_port)))
            await wait_for(lambda: errors(service) >= 1, timeout=15)
            assert tr.decision is not None and tr.decision.desired == 1  # the decision itself is unaffected
        # podDeletionCost "false": no annotation is attempted at all
        async with scaler(api_client) as service2:
            tr2 = service2.tracker(ref(metadata(metrics_port, podDeletionCost="false")))
            await wait_for(lambda: tr2.decision is not None and tr2.decision.desired == 1, timeout=15)
            await asyncio.sleep(0.6)
            assert errors(service2) == 0

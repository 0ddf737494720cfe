"""Kubernetes discovery against a **minimal fake Kubernetes API server** written here with aiohttp.

No Kubernetes API server can run on this machine, so this fake serves only what the router's discovery uses:
``GET /api/v1/namespaces/{ns}/pods`` as a list (``PodList`` with a resourceVersion) and as a watch
(``?watch=true``: newline-delimited JSON events ``{"type", "object"}``), with equality label selectors. The
router talks to it with the real ``kubernetes`` Python client; the pods point at real in-process simulators, and
requests go through the router to them. The test also drops a DELETE event on purpose (a pod vanishes from the
list without a watch event, as in vLLM production-stack #1091) and checks the periodic relist repairs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kubernetes import client as k8s
from routers_for_tests import serve_router

from harness.procs import free_port
from harness.simpods import sim_pod
from router.discovery import KubernetesDiscovery

MODEL = "sim-model"


class FakeKubeApi:
    """Pods of one namespace, a resourceVersion counter and live watch streams."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.rv = 100
        self.watchers: list[asyncio.Queue] = []
        self.list_calls = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self.pods_endpoint)
        return app

    @staticmethod
    def _matches(pod: dict, selector: str) -> bool:
        labels = pod["metadata"].get("labels", {})
        for term in filter(None, selector.split(",")):
            k, v = term.split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        return True

    async def pods_endpoint(self, request: web.Request) -> web.StreamResponse:
        selector = request.query.get("labelSelector", "")
        if request.query.get("watch") in ("true", "1", "True"):
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            q: asyncio.Queue = asyncio.Queue()
            self.watchers.append(q)
            deadline = time.monotonic() + float(request.query.get("timeoutSeconds", "30"))
            try:
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        kind, pod = await asyncio.wait_for(q.get(), left)
                    except TimeoutError:
                        break
                    if self._matches(pod, selector):
                        await resp.write(json.dumps({"type": kind, "object": pod}).encode() + b"\n")
            finally:
                self.watchers.remove(q)
            return resp
        self.list_calls += 1
        items = [p for p in self.pods.values() if self._matches(p, selector)]
        return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": str(self.rv)}, "items": items})  # fmt: skip

    def put(self, name: str, port: int, *, ready: bool = True, labels: dict | None = None, event: bool = True):
        self.rv += 1
        kind = "MODIFIED" if name in self.pods else "ADDED"
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": str(self.rv),
                         "labels": {"app": "vllm", **(labels or {})}, "annotations": {"kvscale.io/port": str(port)}},
            "status": {"phase": "Running", "podIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
        }  # fmt: skip
        self.pods[name] = pod
        if event:
            self._emit(kind, pod)

    def delete(self, name: str, *, event: bool = True) -> None:
        self.rv += 1
        pod = self.pods.pop(name)
        if event:
            self._emit("DELETED", pod)

    def _emit(self, kind: str, pod: dict) -> None:
        for q in self.watchers:
            q.put_nowait((kind, pod))


@contextlib.asynccontextmanager
async def fake_api() -> AsyncIterator[tuple[FakeKubeApi, str]]:
    api = FakeKubeApi()
    port = free_port()
    runner = web.AppRunner(api.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield api, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def wait_for(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.timeout(90)
async def test_watch_and_relist_against_fake_api_server():
    async with fake_api() as (api, api_url), sim_pod() as s1, sim_pod() as s2, sim_pod() as s3:
        api.put("pod-a", _port(s1.url), labels={"kvscale.io/role": "both", "group": "long"})
        api.put("pod-b", _port(s2.url))
        api.put("pod-c", _port(s3.url), ready=False)  # not Ready: never routed to
        api.put("other", _port(s3.url), labels={"app": "something-else"})  # not selected
        cfg = k8s.Configuration()
        cfg.host = api_url
        discovery = KubernetesDiscovery("app=vllm", "ns", relist_s=2.0, api_client=k8s.ApiClient(cfg))
        async with serve_router(discovery=discovery, health_interval_s=0.2) as r:
            pool = r.state.pool
            urls = lambda: {b.url for b in pool}  # noqa: E731
            await wait_for(lambda: urls() == {s1.url, s2.url}, 5, "the two Ready pods")
            assert pool.get(s1.url).labels["group"] == "long"
            await wait_for(lambda: all(b.models for b in pool), 5, "model lists")
            async with aiohttp.ClientSession() as http:
                body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
                async with http.post(r.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200

                # watch: pod-c turns Ready -> joins well before the next relist
                await wait_for(lambda: len(api.watchers) == 1, 5, "the watch connection")
                api.put("pod-c", _port(s3.url), ready=True)
                assert await wait_for(lambda: s3.url in urls(), 1.5, "pod-c via the watch") < 1.0
                # watch: a DELETE event removes at once
                api.delete("pod-b")
                await wait_for(lambda: s2.url not in urls(), 1.5, "pod-b removed via the watch")

                # a missed DELETE: pod-a disappears from the API without an event; the relist repairs it
                relists = discovery.relists
                api.delete("pod-a", event=False)
                await asyncio.sleep(0.3)
                assert s1.url in urls()  # the watch alone cannot know
                await wait_for(lambda: s1.url not in urls(), 4.0, "the relist to drop pod-a")
                assert discovery.relists > relists
                # traffic only reaches pods that still exist
                for _ in range(4):
                    async with http.post(r.url + "/v1/completions",
                                         json={"model": MODEL, "prompt": "x", "max_tokens": 1}) as resp:  # fmt: skip
                        assert resp.status == 200 and resp.headers["x-kvscale-backend"] == s3.url

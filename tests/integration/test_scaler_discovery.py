"""Pod discovery through the real ``kubernetes`` client (list + watch + periodic relist).

No Kubernetes API server can run here, so the client talks to a minimal fake one (aiohttp, below): it serves
``GET /api/v1/namespaces/{ns}/pods`` as a list (with a resourceVersion) and, with ``watch=true``, as a stream of
JSON watch events, filtering on equality label selectors; and a merge-patch of a pod's annotations (the scaler's
pod-deletion-cost). Only what discovery and that patch use is implemented.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from kubernetes import client

from harness.procs import free_port
from scaler.discovery import KubernetesPods


class FakeApiServer:
    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.rv = 1
        self.watchers: list[asyncio.Queue] = []
        self.lists = 0
        self.patches: list[tuple[str, dict]] = []

    def pod(self, name: str, ip: str, labels: dict[str, str], ready: bool = True, ns: str = "llm") -> dict:
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels, "resourceVersion": str(self.rv)},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
        }  # fmt: skip

    def put(self, pod: dict, notify: bool = True) -> None:
        kind = "MODIFIED" if pod["metadata"]["name"] in self.pods else "ADDED"
        self.rv += 1
        pod["metadata"]["resourceVersion"] = str(self.rv)
        self.pods[pod["metadata"]["name"]] = pod
        if notify:
            for q in self.watchers:
                q.put_nowait({"type": kind, "object": pod})

    def expire_watches(self) -> None:
        """What an API server sends a watch whose resourceVersion is too old (then it ends the watch)."""
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410,
                  "message": "too old resource version"}  # fmt: skip
        for q in self.watchers:
            q.put_nowait({"type": "ERROR", "object": status})

    def delete(self, name: str) -> None:
        self.rv += 1
        pod = self.pods.pop(name)
        for q in self.watchers:
            q.put_nowait({"type": "DELETED", "object": pod})

    async def serve(self, patch: Any = None, **runner_kw: Any) -> tuple[web.AppRunner, client.ApiClient]:
        """Serve the pods API on a free loopback port (``patch``: the PATCH handler, default :meth:`patch`);
        returns the runner (``cleanup()`` stops it) and a ``kubernetes`` client of it."""
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self.handle)
        app.router.add_patch("/api/v1/namespaces/{ns}/pods/{name}", patch or self.patch)
        runner = web.AppRunner(app, **runner_kw)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{port}"
        return runner, client.ApiClient(cfg)

    @staticmethod
    def matches(pod: dict, ns: str, selector: str) -> bool:
        if pod["metadata"]["namespace"] != ns:
            return False
        labels = pod["metadata"].get("labels", {})
        return all(labels.get(k) == v for k, v in (r.split("=", 1) for r in selector.split(",") if r))

    async def patch(self, request: web.Request) -> web.Response:
        """``PATCH /api/v1/namespaces/{ns}/pods/{name}``: a JSON merge patch of the pod's annotations only."""
        name = request.match_info["name"]
        pod = self.pods.get(name)
        if pod is None or pod["metadata"]["namespace"] != request.match_info["ns"]:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        if request.content_type != "application/merge-patch+json":
            return web.json_response({"kind": "Status", "code": 415, "message": request.content_type}, status=415)
        body = await request.json()
        self.patches.append((name, body))
        notes = pod["metadata"].setdefault("annotations", {})
        for k, v in (body.get("metadata", {}).get("annotations") or {}).items():
            if v is None:
                notes.pop(k, None)
            else:
                notes[k] = v
        self.put(pod)
        return web.json_response(pod)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ns, sel = request.match_info["ns"], request.query.get("labelSelector", "")
        if request.query.get("watch") not in ("true", "1", "True"):
            self.lists += 1
            items = [p for p in self.pods.values() if self.matches(p, ns, sel)]
            return web.json_response({"apiVersion": "v1", "kind": "PodList",
                                      "metadata": {"resourceVersion": str(self.rv)}, "items": items})  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue()
        self.watchers.append(q)
        try:
            deadline = asyncio.get_running_loop().time() + float(request.query.get("timeoutSeconds", "30"))
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    ev = await asyncio.wait_for(q.get(), left)
                except TimeoutError:
                    break
                if ev["type"] == "ERROR" or self.matches(ev["object"], ns, sel):
                    await resp.write((json.dumps(ev) + "\n").encode())
                if ev["type"] == "ERROR":  # the API server ends a watch after its ERROR event
                    break
        finally:
            self.watchers.remove(q)
        return resp


async def wait_for(cond, timeout: float = 8.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.05)


async def test_list_watch_relist_and_api_outage():
    api = FakeApiServer()
    runner, api_client = await api.serve()
    sel = {"app": "vllm", "role": "decode"}
    api.put(api.pod("d-0", "10.0.0.1", sel))
    api.put(api.pod("d-1", "10.0.0.2", sel))
    api.put(api.pod("d-2", "10.0.0.3", sel, ready=False))  # not ready: not a target
    api.put(api.pod("p-0", "10.0.1.1", {"app": "vllm", "role": "prefill"}))  # other pool
    api.put(api.pod("d-x", "10.0.2.1", sel, ns="other"))  # other namespace
    disc = KubernetesPods("llm", "app=vllm,role=decode", 8000, api_client=api_client, relist_s=2,
                          retry_s=0.2)  # fmt: skip
    try:
        # the fake server does not replay from a resourceVersion: change pods once the watch is open
        await wait_for(lambda: disc.urls() is not None and len(api.watchers) == 1)
        assert disc.urls() == ["http://10.0.0.1:8000/metrics", "http://10.0.0.2:8000/metrics"]
        # watch events: a pod becomes ready, one is added, one deleted
        api.put(api.pod("d-2", "10.0.0.3", sel, ready=True))
        api.put(api.pod("d-3", "10.0.0.4", sel))
        api.delete("d-0")
        await wait_for(lambda: disc.urls() == [f"http://10.0.0.{i}:8000/metrics" for i in (2, 3, 4)])
        assert disc.events >= 3
        # an event the watch never delivers is repaired by the periodic relist
        api.put(api.pod("d-1", "10.0.0.2", sel, ready=False), notify=False)
        await wait_for(lambda: disc.urls() == [f"http://10.0.0.{i}:8000/metrics" for i in (3, 4)])
        assert disc.lists >= 2
        # API server down: the last known pods are kept and the error is reported
        await runner.cleanup()
        await wait_for(lambda: disc.last_error is not None, timeout=10)
        assert disc.urls() == [f"http://10.0.0.{i}:8000/metrics" for i in (3, 4)]
    finally:
        disc.close()
        await runner.cleanup()


async def test_an_expired_watch_relists_at_once_and_terminating_pods_leave():
    """410 Gone on the watch: list again at once (not after relist_s, not counted as an error); a pod with a
    deletionTimestamp is no target even while its Ready condition is still True (as for an Endpoints controller)."""
    api = FakeApiServer()
    runner, api_client = await api.serve()
    sel = {"app": "vllm"}
    api.put(api.pod("a", "10.0.0.1", sel))
    disc = KubernetesPods("llm", "app=vllm", 8000, api_client=api_client, relist_s=8, retry_s=5)
    try:
        await wait_for(lambda: disc.urls() == ["http://10.0.0.1:8000/metrics"] and len(api.watchers) == 1)
        lists = disc.lists
        api.put(api.pod("b", "10.0.0.2", sel), notify=False)  # only a list can see it
        api.expire_watches()
        await wait_for(lambda: disc.lists > lists, timeout=3)
        assert disc.urls() == ["http://10.0.0.1:8000/metrics", "http://10.0.0.2:8000/metrics"]
        assert disc.last_error is None
        await wait_for(lambda: len(api.watchers) == 1, timeout=3)  # watching again from the new list
        terminating = api.pod("a", "10.0.0.1", sel)
        terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        api.put(terminating)
        await wait_for(lambda: disc.urls() == ["http://10.0.0.2:8000/metrics"], timeout=3)
    finally:
        disc.close()
        await runner.cleanup()


async def test_unschedulable_pods_are_counted_from_the_list_and_the_watch():
    """Pods the scheduler could not place (Pending, PodScheduled False with reason Unschedulable: what a cluster
    autoscaler acts on) are counted; a Pending pod that is scheduled (pulling its image) is not, and neither is a
    pod once it runs. The variant group reads this count (no node of that GPU type)."""
    api = FakeApiServer()
    runner, api_client = await api.serve()
    sel = {"app": "vllm"}

    def pending(name: str, unschedulable: bool) -> dict:
        pod = api.pod(name, "", sel)
        pod["status"] = {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."} if unschedulable else
            {"type": "PodScheduled", "status": "True"}]}  # fmt: skip
        return pod

    api.put(api.pod("a", "10.0.0.1", sel))
    api.put(pending("b", True))
    api.put(pending("c", False))  # scheduled, its containers are starting
    disc = KubernetesPods("llm", "app=vllm", 8000, api_client=api_client, relist_s=8, retry_s=5)
    try:
        assert disc.unschedulable() is None  # not listed yet: unknown, not 0
        await wait_for(lambda: disc.urls() is not None and len(api.watchers) == 1)
        assert disc.unschedulable() == 1 and disc.urls() == ["http://10.0.0.1:8000/metrics"]
        api.put(pending("d", True))  # a watch event
        await wait_for(lambda: disc.unschedulable() == 2, timeout=3)
        api.put(api.pod("b", "10.0.0.2", sel))  # a node came: b runs
        await wait_for(lambda: disc.unschedulable() == 1 and len(disc.urls()) == 2, timeout=3)
        api.delete("d")
        await wait_for(lambda: disc.unschedulable() == 0, timeout=3)
    finally:
        disc.close()
        await runner.cleanup()

"""Backend discovery: a static list, or Kubernetes pods (watch + periodic relist).

A discovery object calls ``on_update(specs)`` with the *complete* current backend list whenever it changes;
the app turns that into :meth:`BackendPool.update`.

Kubernetes: pods matching ``selector`` in ``namespace`` become backends when they are Ready, have a pod IP and are
not terminating. The watch runs in a thread (the ``kubernetes`` client is synchronous) and posts events to the
event loop; independently, a full relist every ``relist_s`` replaces the state, so a missed DELETE (vLLM
production-stack #1091: 22 hours of routing to a dead pod) is repaired within one relist period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from router.backends import ROLES, BackendSpec

log = logging.getLogger("kvscale.router.discovery")

__all__ = ["KubernetesDiscovery", "StaticDiscovery", "pod_to_spec"]

OnUpdate = Callable[[list[BackendSpec]], None]
ROLE_LABELS = ("kvscale.io/role", "llm-d.ai/role")
PORT_ANNOTATION = "kvscale.io/port"
MODEL_LABEL = "kvscale.io/model"


class StaticDiscovery:
    def __init__(self, specs: Iterable[BackendSpec]) -> None:
        self.specs = list(specs)

    async def start(self, on_update: OnUpdate) -> None:
        on_update(list(self.specs))

    async def stop(self) -> None:
        pass


def _get(obj: Any, *path: str) -> Any:
    for p in path:
        if obj is None:
            return None
        obj = obj.get(p) if isinstance(obj, dict) else getattr(obj, p, None)
    return obj


def pod_to_spec(pod: Any, default_port: int) -> BackendSpec | None:
    """A Ready, addressed, non-terminating pod → a BackendSpec; else None. Accepts V1Pod or a dict."""
    if _get(pod, "metadata", "deletion_timestamp") or _get(pod, "status", "phase") not in (None, "Running"):
        return None
    ip = _get(pod, "status", "pod_ip")
    conditions = _get(pod, "status", "conditions") or []
    ready = any(_get(c, "type") == "Ready" and _get(c, "status") == "True" for c in conditions)
    if not ip or not ready:
        return None
    labels = dict(_get(pod, "metadata", "labels") or {})
    annotations = _get(pod, "metadata", "annotations") or {}
    port = annotations.get(PORT_ANNOTATION, "")
    port_num = int(port) if str(port).isdigit() else default_port
    role = next((labels[k] for k in ROLE_LABELS if k in labels), "both")
    role = {"prefill-decode": "both", "aggregated": "both"}.get(role, role)
    if role not in ROLES:
        role = "both"
    models = frozenset([labels[MODEL_LABEL]]) if labels.get(MODEL_LABEL) else frozenset()
    host = f"[{ip}]" if ":" in ip else ip
    return BackendSpec(f"http://{host}:{port_num}", models, role, labels)


class KubernetesDiscovery:
    """Watch pods by label selector; relist every ``relist_s`` (see the module docstring)."""

    def __init__(
        self,
        selector: str,
        namespace: str = "default",
        *,
        port: int = 8000,
        relist_s: float = 30.0,
        watch_timeout_s: int = 300,
        api_client: Any = None,
    ) -> None:
        self.selector = selector
        self.namespace = namespace
        self.port = port
        self.relist_s = relist_s
        self.watch_timeout_s = watch_timeout_s
        self._api_client = api_client
        self.pods: dict[str, BackendSpec] = {}  # pod name -> spec (Ready pods only); touched on the loop only
        self.relists = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._relist_task: asyncio.Task[None] | None = None
        self._on_update: OnUpdate | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: Any = None

    def _core_api(self):
        from kubernetes import client, config

        if self._api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api_client = client.ApiClient()
        return client.CoreV1Api(self._api_client)

    def _list(self) -> tuple[dict[str, BackendSpec], str]:
        api = self._core_api()
        pods = api.list_namespaced_pod(self.namespace, label_selector=self.selector, _request_timeout=10)
        specs = {}
        for pod in pods.items:
            spec = pod_to_spec(pod, self.port)
            if spec is not None:
                specs[pod.metadata.name] = spec
        return specs, pods.metadata.resource_version or ""

    def _publish(self) -> None:
        if self._on_update is not None:
            self._on_update(list(self.pods.values()))

    def _apply_list(self, specs: dict[str, BackendSpec]) -> None:
        if specs != self.pods:
            gone = sorted(set(self.pods) - set(specs))
            if gone:
                log.info("relist removed pods %s (missed events?)", gone)
            self.pods = specs
            self._publish()

    def _apply_event(self, kind: str, name: str, spec: BackendSpec | None) -> None:
        if kind == "DELETED" or spec is None:
            if self.pods.pop(name, None) is not None:
                self._publish()
        elif self.pods.get(name) != spec:
            self.pods[name] = spec
            self._publish()

    async def relist(self) -> None:
        specs, _ = await asyncio.to_thread(self._list)
        self.relists += 1
        self._apply_list(specs)

    async def start(self, on_update: OnUpdate) -> None:
        self._on_update = on_update
        self._loop = asyncio.get_running_loop()
        try:
            await self.relist()
        except Exception as exc:  # the API may be briefly unreachable: keep going, the loops retry
            log.warning("initial pod list failed: %s", exc)
        self._thread = threading.Thread(target=self._watch_thread, name="router-k8s-watch", daemon=True)
        self._thread.start()
        self._relist_task = asyncio.create_task(self._relist_loop(), name="router-k8s-relist")

    async def _relist_loop(self) -> None:
        while True:
            await asyncio.sleep(self.relist_s)
            try:
                await self.relist()
            except Exception as exc:
                log.warning("pod relist failed: %s", exc)

    def _watch_thread(self) -> None:
        from kubernetes import watch

        assert self._loop is not None
        while not self._stop.is_set():
            try:
                api = self._core_api()
                _, rv = self._list()
                self._watch = w = watch.Watch()
                for ev in w.stream(
                    api.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=rv,
                    timeout_seconds=self.watch_timeout_s,
                    _request_timeout=self.watch_timeout_s + 10,
                ):
                    if self._stop.is_set():
                        break
                    kind, pod = ev.get("type"), ev.get("object")
                    if kind == "ERROR" or pod is None or not hasattr(pod, "metadata"):
                        break  # e.g. 410 Gone: list again and restart from the new resourceVersion
                    spec = None if kind == "DELETED" else pod_to_spec(pod, self.port)
                    self._loop.call_soon_threadsafe(self._apply_event, kind, pod.metadata.name, spec)
            except Exception as exc:
                if self._stop.is_set():
                    break
                log.warning("pod watch failed (%s); retrying", exc)
                self._stop.wait(1.0)

    async def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            with contextlib.suppress(Exception):
                self._watch.stop()
        if self._relist_task is not None:
            self._relist_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relist_task
        # The watch thread is a daemon blocked at most until the server's watch timeout; do not join it.

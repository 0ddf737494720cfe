"""Where a pool's pods are: a static URL list, or the Kubernetes API (list + watch, with a periodic relist).

A discovery object answers :meth:`urls` instantly from state kept current in the background (the scaler's
signal loop never waits on the API server). ``urls()`` returns None until the first successful list, so "not
known yet" is never mistaken for "no pods".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("kvscale.scaler.discovery")


class PodDiscovery(Protocol):
    last_error: str | None

    def urls(self) -> list[str] | None: ...

    def close(self) -> None: ...


class StaticPods:
    """A fixed list of metrics URLs (``podUrls`` metadata; also what tests and VM deployments use)."""

    def __init__(self, urls: list[str] | tuple[str, ...]) -> None:
        self._urls = list(urls)
        self.last_error: str | None = None

    def urls(self) -> list[str] | None:
        return list(self._urls)

    def close(self) -> None:
        pass


def pod_ready(pod: Any) -> bool:
    """Running, Ready condition true, not being deleted, with an IP (what an Endpoints controller requires)."""
    meta, status = pod.metadata, pod.status
    if meta is None or status is None or meta.deletion_timestamp is not None or not status.pod_ip:
        return False
    if status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


class KubernetesPods:
    """Ready pods matching ``selector`` in ``namespace``, kept current by a watch thread.

    The thread lists (getting a resourceVersion), then watches from it for ``relist_s`` seconds (the server
    closes the watch at ``timeoutSeconds``), then lists again: the relist repairs anything a dropped watch
    missed. Errors are logged, kept in ``last_error`` and retried after ``retry_s``; the last known pod set is
    kept meanwhile (pods do not vanish because the API server is briefly unreachable).
    """

    def __init__(
        self,
        namespace: str,
        selector: str,
        port: int,
        path: str = "/metrics",
        *,
        api_client: Any = None,
        relist_s: float = 30.0,
        retry_s: float = 2.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.v1 = client.CoreV1Api(api_client)
        self.namespace, self.selector, self.port, self.path = namespace, selector, port, path
        self.relist_s, self.retry_s = relist_s, retry_s
        self.on_change = on_change
        self.last_error: str | None = None
        self.lists = 0  # completed lists (relists included), for tests and logs
        self.events = 0  # watch events applied
        self._pods: dict[str, str] | None = None  # pod name -> pod IP (ready pods only)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name=f"kvscale-discovery-{selector}", daemon=True)
        self._thread.start()

    def urls(self) -> list[str] | None:
        with self._lock:
            if self._pods is None:
                return None
            return sorted(f"http://{ip}:{self.port}{self.path}" for ip in self._pods.values())

    def _apply(self, kind: str, pod: Any) -> None:
        name = pod.metadata.name
        with self._lock:
            pods = dict(self._pods or {})
            if kind != "DELETED" and pod_ready(pod):
                pods[name] = pod.status.pod_ip
            else:
                pods.pop(name, None)
            changed = pods != self._pods
            self._pods = pods
        if changed and self.on_change:
            self.on_change()

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                listed = self.v1.list_namespaced_pod(
                    self.namespace, label_selector=self.selector, _request_timeout=10
                )
                pods = {p.metadata.name: p.status.pod_ip for p in listed.items if pod_ready(p)}
                with self._lock:
                    changed = pods != self._pods
                    self._pods = pods
                self.lists += 1
                self.last_error = None
                if changed and self.on_change:
                    self.on_change()
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    self.v1.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=max(1, int(self.relist_s)),
                    _request_timeout=self.relist_s + 10,
                ):
                    if self._stop.is_set():
                        break
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._apply(event["type"], event["object"])
                        self.events += 1
            except Exception as e:  # API errors, timeouts, decode errors: keep the last pod set, retry
                if self._stop.is_set():
                    break
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("pod discovery %s/%s: %s", self.namespace, self.selector, self.last_error)
                self._stop.wait(self.retry_s)

    def close(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        self._thread.join(timeout=0.5)

"""One Kubernetes pod watch: the Ready pods matching a label selector, kept current by a thread.

Shared by the router (its backends) and the scaler (the pods it scrapes). The thread lists the pods (getting a
resourceVersion), watches from it with ``timeoutSeconds=relist_s`` (the API server ends the watch then), and lists
again: every relist replaces the state, so a DELETE the watch missed (vLLM production-stack #1091: 22 hours of
routing to a dead pod) is repaired within one relist period. A watch that expired (410 Gone, or an ERROR event) is
followed by a relist at once. Other failures (API server unreachable, timeouts, decoding) are kept in
:attr:`PodWatch.last_error` and retried after ``retry_s``; the last known pods are kept meanwhile (pods do not
vanish because the API server is briefly unreachable).

A pod counts when an Endpoints controller would send it traffic (:func:`pod_ready`): phase Running, the Ready
condition True, a pod IP, and no deletionTimestamp (a terminating pod leaves at once). The ``kubernetes`` client
is synchronous, hence the thread; ``on_change`` is called from it.

The watch also counts the matching pods the scheduler could not place (:func:`pod_unschedulable`: Pending with
the PodScheduled condition False, reason Unschedulable: what cluster autoscalers and Karpenter act on), so the
scaler can tell "its pods are starting" from "no node of that kind" (heterogeneous variants).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kvscale.podwatch")

__all__ = ["PodWatch", "pod_field", "pod_host", "pod_ready", "pod_unschedulable"]

Pods = dict[str, Any]  # pod name -> the pod (a V1Pod), Ready pods only


def pod_field(obj: Any, *path: str) -> Any:
    """``obj.a.b`` of a ``V1Pod`` (snake_case attributes) or of its dict form; None where a step is missing."""
    for p in path:
        if obj is None:
            return None
        obj = obj.get(p) if isinstance(obj, dict) else getattr(obj, p, None)
    return obj


def pod_ready(pod: Any) -> bool:
    """Running, Ready condition True, with a pod IP, not being deleted: what an Endpoints controller requires.
    Takes a ``V1Pod`` or its ``to_dict()`` form."""
    if pod_field(pod, "metadata", "deletion_timestamp") is not None or not pod_field(pod, "status", "pod_ip"):
        return False
    if pod_field(pod, "status", "phase") != "Running":
        return False
    conditions = pod_field(pod, "status", "conditions") or []
    return any(pod_field(c, "type") == "Ready" and pod_field(c, "status") == "True" for c in conditions)


def pod_unschedulable(pod: Any) -> bool:
    """Pending, not being deleted, and its PodScheduled condition False with reason Unschedulable (no node fits:
    not "scheduled and pulling its image")."""
    if pod_field(pod, "metadata", "deletion_timestamp") is not None or pod_field(pod, "status", "phase") != "Pending":
        return False
    conditions = pod_field(pod, "status", "conditions") or []
    return any(pod_field(c, "type") == "PodScheduled" and pod_field(c, "status") == "False"
               and pod_field(c, "reason") == "Unschedulable" for c in conditions)  # fmt: skip


def pod_host(pod: Any) -> str:
    """The pod IP as a URL host (an IPv6 address in brackets)."""
    ip = str(pod_field(pod, "status", "pod_ip"))
    return f"[{ip}]" if ":" in ip else ip


def _version(pod: Any) -> Any:
    """What identifies one state of a pod: its resourceVersion (the object itself where it has none)."""
    return pod_field(pod, "metadata", "resource_version") or id(pod)


class PodWatch:
    """The Ready pods matching ``selector`` in ``namespace`` (see the module docstring).

    :meth:`pods` is None until the first successful list (so "not known yet" is never read as "no pods"), then
    the Ready pods by name. ``on_change(pods)`` is called (from the watch thread) whenever that set, or one of its
    pods, changed. ``lists`` counts completed lists (relists included), ``events`` the watch events applied.
    ``api_client`` is a ``kubernetes.client.ApiClient``; by default the in-cluster config, else the kubeconfig
    (loaded in the thread: a failure is an error like any other, kept in ``last_error`` and retried).
    """

    def __init__(
        self,
        namespace: str,
        selector: str,
        *,
        api_client: Any = None,
        relist_s: float = 30.0,
        retry_s: float = 2.0,
        list_timeout_s: float = 10.0,
        on_change: Callable[[Pods], None] | None = None,
        name: str | None = None,
    ) -> None:
        if relist_s <= 0 or retry_s < 0:
            raise ValueError(f"relist_s must be > 0 and retry_s >= 0, got {relist_s}, {retry_s}")
        self.namespace, self.selector = namespace, selector
        self.relist_s, self.retry_s, self.list_timeout_s = relist_s, retry_s, list_timeout_s
        self.on_change = on_change
        self.last_error: str | None = None
        self.lists = 0
        self.events = 0
        self._api_client = api_client
        self._v1: Any = None
        self._pods: Pods | None = None
        self._unschedulable: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._attempted = threading.Event()  # set once the first list succeeded or failed
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name=name or f"kvscale-podwatch-{selector}", daemon=True)

    # -- reading ---------------------------------------------------------------------------------------------------
    def pods(self) -> Pods | None:
        with self._lock:
            return None if self._pods is None else dict(self._pods)

    def unschedulable(self) -> int | None:
        """How many matching pods the scheduler could not place (:func:`pod_unschedulable`); None before the
        first list."""
        with self._lock:
            return None if self._pods is None else len(self._unschedulable)

    def annotate(self, name: str, annotations: dict[str, str | None], timeout_s: float = 5.0) -> None:
        """Merge-patch one pod's annotations (None removes a key). Blocking: call it off the event loop. Needs
        RBAC ``patch`` on pods; errors (``kubernetes.client.ApiException``, connection errors) propagate."""
        self._core_api().patch_namespaced_pod(
            name, self.namespace, {"metadata": {"annotations": annotations}}, _request_timeout=timeout_s,
            _content_type="application/merge-patch+json",
        )  # fmt: skip

    def wait_first_list(self, timeout: float) -> bool:
        """Block until the first list has succeeded or failed (or ``timeout``); True if it succeeded."""
        self._attempted.wait(timeout)
        return self._pods is not None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> PodWatch:
        self._thread.start()
        return self

    def close(self, timeout: float = 0.5) -> None:
        """Stop the thread: the open watch is closed; waits up to ``timeout`` for the thread to end."""
        self._stop.set()
        w = self._watch
        if w is not None:
            with contextlib.suppress(Exception):  # a stream that is already gone
                w.stop()
        if timeout > 0 and self._thread.is_alive():
            self._thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------------------------------
    def _core_api(self) -> Any:
        if self._v1 is None:
            from kubernetes import client, config

            if self._api_client is None:
                try:
                    config.load_incluster_config()
                except config.ConfigException:
                    config.load_kube_config()
                self._api_client = client.ApiClient()
            self._v1 = client.CoreV1Api(self._api_client)
        return self._v1

    def _set(self, pods: Pods, why: str) -> None:
        with self._lock:
            old = self._pods
            changed = (
                old is None
                or pods.keys() != old.keys()
                or any(_version(p) != _version(old[n]) for n, p in pods.items())
            )
            self._pods = pods
        if old is not None and (gone := sorted(old.keys() - pods.keys())) and why == "list":
            log.info("pod watch %s/%s: the relist removed %s (missed events?)", self.namespace, self.selector, gone)
        if changed and self.on_change is not None:
            self.on_change(dict(pods))

    def _apply(self, kind: str, pod: Any) -> None:
        name = pod_field(pod, "metadata", "name")
        with self._lock:
            if kind != "DELETED" and pod_unschedulable(pod):
                self._unschedulable.add(name)
            else:
                self._unschedulable.discard(name)
            pods = dict(self._pods or {})
        if kind != "DELETED" and pod_ready(pod):
            pods[name] = pod
        elif name not in pods:
            return  # a pod that is not (and was not) Ready: nothing changes
        else:
            del pods[name]
        self._set(pods, "event")

    def _list(self) -> str:
        """List, replace the state, return the list's resourceVersion."""
        listed = self._core_api().list_namespaced_pod(
            self.namespace, label_selector=self.selector, _request_timeout=self.list_timeout_s
        )
        self.lists += 1  # before the change is published: whoever sees it sees the count too
        with self._lock:
            self._unschedulable = {p.metadata.name for p in listed.items if pod_unschedulable(p)}
        self._set({p.metadata.name: p for p in listed.items if pod_ready(p)}, "list")
        self.last_error = None
        return listed.metadata.resource_version

    def _watch_from(self, resource_version: str) -> None:
        """Apply watch events until the server ends the watch (``relist_s``), it expires, or :meth:`close`."""
        from kubernetes import watch

        self._watch = w = watch.Watch()
        if self._stop.is_set():  # close() ran before the watch existed
            return
        for event in w.stream(
            self._core_api().list_namespaced_pod,
            self.namespace,
            label_selector=self.selector,
            resource_version=resource_version,
            timeout_seconds=max(1, round(self.relist_s)),
            _request_timeout=self.relist_s + self.list_timeout_s,
        ):
            if self._stop.is_set():
                return
            kind, pod = event.get("type"), event.get("object")
            if kind == "ERROR" or pod is None or not hasattr(pod, "metadata"):
                log.info("pod watch %s/%s: watch ended by %s; relisting", self.namespace, self.selector, kind)
                return
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._apply(kind, pod)
                self.events += 1

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        while not self._stop.is_set():
            try:
                try:
                    rv = self._list()
                finally:
                    self._attempted.set()
                self._watch_from(rv)
            except ApiException as e:
                if self._stop.is_set():
                    break
                if e.status == 410:  # the resourceVersion expired: list again at once
                    log.info("pod watch %s/%s: 410 Gone; relisting", self.namespace, self.selector)
                    continue
                self._failed(e)
            except Exception as e:  # API errors, timeouts, decoding, config: keep the pods, retry
                if self._stop.is_set():
                    break
                self._failed(e)

    def _failed(self, e: BaseException) -> None:
        self.last_error = f"{type(e).__name__}: {e}"
        log.warning("pod watch %s/%s: %s", self.namespace, self.selector, self.last_error)
        self._stop.wait(self.retry_s)

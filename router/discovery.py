"""Backend discovery: a static list, or Kubernetes pods (the core's list + watch + periodic relist).

A discovery object calls ``on_update(specs)`` with the *complete* current backend list whenever it changes;
the app turns that into :meth:`BackendPool.update`.

Kubernetes: :class:`~kvscale.podwatch.PodWatch` keeps the pods matching ``selector`` in ``namespace`` that are
Ready, have a pod IP and are not terminating (its thread lists, watches for ``relist_s``, lists again, so a missed
DELETE, vLLM production-stack #1091, is repaired within one relist period); this adapter turns them into
:class:`BackendSpec` (role, port and model from labels and annotations) and posts them to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from kvscale.podwatch import PodWatch, pod_field, pod_host, pod_ready
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


def pod_to_spec(pod: Any, default_port: int) -> BackendSpec | None:
    """A Ready pod (:func:`~kvscale.podwatch.pod_ready`) → a BackendSpec; else None. Accepts V1Pod or its dict."""
    if not pod_ready(pod):
        return None
    labels = dict(pod_field(pod, "metadata", "labels") or {})
    annotations = pod_field(pod, "metadata", "annotations") or {}
    port = annotations.get(PORT_ANNOTATION, "")
    port_num = int(port) if str(port).isdigit() else default_port
    role = next((labels[k] for k in ROLE_LABELS if k in labels), "both")
    role = {"prefill-decode": "both", "aggregated": "both"}.get(role, role)
    if role not in ROLES:
        role = "both"
    models = frozenset([labels[MODEL_LABEL]]) if labels.get(MODEL_LABEL) else frozenset()
    return BackendSpec(f"http://{pod_host(pod)}:{port_num}", models, role, labels)


class KubernetesDiscovery:
    """Backends from the Ready pods matching ``selector`` (see the module docstring); ``relists`` counts the
    completed lists (the first one included)."""

    def __init__(
        self,
        selector: str,
        namespace: str = "default",
        *,
        port: int = 8000,
        relist_s: float = 30.0,
        retry_s: float = 1.0,
        api_client: Any = None,
        first_list_timeout_s: float = 10.0,
    ) -> None:
        self.selector = selector
        self.namespace = namespace
        self.port = port
        self.relist_s = relist_s
        self.retry_s = retry_s
        self.first_list_timeout_s = first_list_timeout_s
        self._api_client = api_client
        self.pods: dict[str, BackendSpec] = {}  # pod name -> spec (Ready pods only); touched on the loop only
        self.watch: PodWatch | None = None
        self._on_update: OnUpdate | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def relists(self) -> int:
        return self.watch.lists if self.watch is not None else 0

    @property
    def last_error(self) -> str | None:
        return self.watch.last_error if self.watch is not None else None

    def _publish(self) -> None:
        if self._on_update is not None:
            self._on_update(list(self.pods.values()))

    def _apply(self, specs: dict[str, BackendSpec]) -> None:
        """On the loop: the complete Ready set, from the watch thread."""
        if specs != self.pods:
            self.pods = specs
            self._publish()

    def _changed(self, pods: dict[str, Any]) -> None:
        """In the watch thread: post the new backend set to the loop."""
        specs = {name: spec for name, pod in pods.items() if (spec := pod_to_spec(pod, self.port)) is not None}
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
                loop.call_soon_threadsafe(self._apply, specs)

    async def start(self, on_update: OnUpdate) -> None:
        self._on_update = on_update
        self._loop = asyncio.get_running_loop()
        self.watch = PodWatch(
            self.namespace, self.selector, api_client=self._api_client, relist_s=self.relist_s,
            retry_s=self.retry_s, on_change=self._changed, name="router-k8s-watch",
        ).start()  # fmt: skip
        # Serve with the pods of the first list where it answers in time (else start empty: the watch retries).
        if not await asyncio.to_thread(self.watch.wait_first_list, self.first_list_timeout_s):
            log.warning("initial pod list failed: %s", self.watch.last_error or "timed out")
        # (a successful first list posted its backends before waking this coroutine: they are in place now)

    async def stop(self) -> None:
        self._loop = None
        if self.watch is not None:
            # The thread is a daemon blocked at most until the server ends the watch; do not wait for it.
            self.watch.close(timeout=0)

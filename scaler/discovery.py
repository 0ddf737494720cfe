"""Where a pool's pods are: a static URL list, or the Kubernetes API (list + watch, with a periodic relist).

A discovery object answers :meth:`urls` instantly from state kept current in the background (the scaler's
signal loop never waits on the API server). ``urls()`` returns None until the first successful list, so "not
known yet" is never mistaken for "no pods".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kvscale.podwatch import PodWatch, pod_field, pod_host

# The annotation a ReplicaSet reads on scale-down: pods with a lower cost are deleted first (Kubernetes >= 1.22).
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


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

    def unschedulable(self) -> int | None:
        return None  # unknown: no pod objects

    def close(self) -> None:
        pass


class KubernetesPods:
    """The metrics URLs of the Ready pods matching ``selector`` in ``namespace``: a thin view of the core's
    :class:`~kvscale.podwatch.PodWatch` (list, watch for ``relist_s``, list again; readiness as an Endpoints
    controller judges it; errors kept in ``last_error`` and retried after ``retry_s`` while the last known pods are
    kept). ``on_change`` is called (from the watch thread) when the URL set changes."""

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
        self.namespace, self.selector, self.port, self.path = namespace, selector, port, path
        self.on_change = on_change
        self._last_urls: list[str] | None = None
        self._sent: dict[str, str] = {}  # pod name -> the deletion cost last patched (until the watch shows it)
        self.watch = PodWatch(
            namespace, selector, api_client=api_client, relist_s=relist_s, retry_s=retry_s,
            on_change=self._pods_changed, name=f"kvscale-discovery-{selector}",
        ).start()  # fmt: skip

    @property
    def last_error(self) -> str | None:
        return self.watch.last_error

    @property
    def lists(self) -> int:
        """Completed lists (relists included), for tests and logs."""
        return self.watch.lists

    @property
    def events(self) -> int:
        """Watch events applied."""
        return self.watch.events

    def _url_of(self, pod: Any) -> str:
        return f"http://{pod_host(pod)}:{self.port}{self.path}"

    def _urls_of(self, pods: dict[str, Any]) -> list[str]:
        return sorted(self._url_of(p) for p in pods.values())

    def set_deletion_costs(self, costs: Mapping[str, int]) -> int:
        """Annotate each pod (``costs``: by metrics URL) with :data:`DELETION_COST`, patching only pods whose
        annotation differs; returns how many were patched. Blocking (API calls): run it off the event loop.

        The scaler calls it only while it asks for fewer pods than there are, so the annotation is fresh when
        the HPA scales the Deployment down and is not rewritten every interval otherwise (Kubernetes advises
        against frequent updates of it)."""
        pods = self.watch.pods() or {}
        self._sent = {n: v for n, v in self._sent.items() if n in pods}
        patched = 0
        for name, pod in sorted(pods.items()):
            cost = costs.get(self._url_of(pod))
            if cost is None:
                continue
            value = str(int(cost))
            current = (pod_field(pod, "metadata", "annotations") or {}).get(DELETION_COST)
            if value in (current, self._sent.get(name)):
                continue
            self.watch.annotate(name, {DELETION_COST: value})
            self._sent[name] = value
            patched += 1
        return patched

    def unschedulable(self) -> int | None:
        """The matching pods the scheduler could not place (no node fits); None before the first list."""
        return self.watch.unschedulable()

    def urls(self) -> list[str] | None:
        pods = self.watch.pods()
        return None if pods is None else self._urls_of(pods)

    def _pods_changed(self, pods: dict[str, Any]) -> None:
        urls = self._urls_of(pods)
        if urls != self._last_urls:
            self._last_urls = urls
            if self.on_change is not None:
                self.on_change()

    def close(self) -> None:
        self.watch.close()

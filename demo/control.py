"""The demo's local controller: it plays KEDA + the HPA against the real scaler, and a Deployment's ReplicaSet
against local pods (processes).

* :class:`KedaHpa` — KEDA's activation (0 ↔ 1) and the HorizontalPodAutoscaler KEDA creates, for one ``External``
  metric of type ``AverageValue``: :class:`scaler.hpa.Hpa`, the emulation the scaling evaluation uses, with the
  demo's ScaledObject ``behavior`` (:func:`demo_behavior`: the default policies on the demo's compressed clock).
* :class:`ScaledObjectLoop` — what KEDA does for one ScaledObject with an ``external`` trigger: ``GetMetricSpec``
  once, then ``GetMetrics`` and ``IsActive`` every polling interval over real gRPC (generated stubs). A failed
  ``GetMetrics`` makes the HPA hold (as a missing external metric does).
* :class:`LocalCluster` — pods per pool: created as processes, *Ready* after the configured startup delay and a
  200 from ``/health``, published in the pods file (the demo's API server, see :mod:`demo.stack`);
  removed ones leave the file first, drain (no running/waiting requests, bounded by a grace period), then stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from demo.stack import PodRecord, write_pods
from harness.procs import ManagedProcess, stop_together
from kvscale.engine_stats import ScrapeError, scrape
from scaler.hpa import Hpa, HpaBehavior, HpaPolicy, HpaRules

# grpc is imported where used: the demo sets GRPC_* environment variables before gRPC initializes.

log = logging.getLogger("kvscale.demo")


# -- KEDA + HPA ---------------------------------------------------------------------------------------------------
def demo_behavior(scale_down_window_s: float, period_s: float) -> HpaBehavior:
    """The HPA ``behavior`` of the demo's ScaledObjects, on the demo's compressed clock: the Kubernetes default
    policies (up: +4 pods or +100 %; down: -100 %) per polling interval instead of per 15 s, scale-up stabilization
    0 s, scale-down stabilization ``--stabilization-window``."""
    up = HpaRules(0.0, (HpaPolicy("Pods", 4, period_s), HpaPolicy("Percent", 100, period_s)), "Max")
    down = HpaRules(scale_down_window_s, (HpaPolicy("Percent", 100, period_s),), "Max")
    return HpaBehavior(up, down, source=f"demo ScaledObject (periods {period_s:g}s)")


class KedaHpa:
    """What KEDA and the HPA it creates do with one ScaledObject's external metric (``AverageValue``).

    The HPA is :class:`scaler.hpa.Hpa` (the same emulation the scaling evaluation uses), synced at every KEDA
    poll; KEDA itself does what the HPA cannot: activation from 0 to 1 and, with ``minReplicaCount: 0``, scaling
    an inactive trigger to zero. The HPA's own minimum is ``max(minReplicaCount, 1)``, as KEDA sets it.
    """

    def __init__(self, pool: str, min_replicas: int, max_replicas: int, behavior: HpaBehavior,
                 tolerance: float = 0.1) -> None:  # fmt: skip
        if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
            raise ValueError(f"need 0 <= min <= max and max >= 1, got min={min_replicas} max={max_replicas}")
        self.min_replicas = min_replicas
        self._metric: float | None = None
        self.hpa = Hpa(pool, lambda now: self._metric, target=1.0, behavior=behavior,
                       min_replicas=max(min_replicas, 1), max_replicas=max_replicas, tolerance=tolerance,
                       sync_s=0.0)  # fmt: skip

    def decide(self, now: float, current: int, metric: float, target: float, active: bool = True) -> int:
        if self.min_replicas == 0 and not active:  # KEDA: an inactive trigger with minReplicaCount 0 -> zero
            return 0
        if current == 0:  # KEDA activates the workload; the HPA scales from one replica on
            current = 1 if active else 0
            if current == 0:
                return 0
        self._metric = metric
        self.hpa.target = target
        self.hpa.spec = current  # the HPA reads the current count from the scale subresource at every sync
        self.hpa.sync(now, _NoTarget())
        return self.hpa.spec


class _NoTarget:
    """The HPA's scale target when the caller applies the decision itself."""

    def set_replicas(self, pool: str, n: int, now: float | None = None) -> None:
        pass


# -- pods ---------------------------------------------------------------------------------------------------------
@dataclass
class Pod:
    name: str
    pool: str
    role: str
    url: str
    proc: ManagedProcess
    pid: int | None
    created_at: float
    ready_at: float | None = None
    stopping_at: float | None = None
    stopped_at: float | None = None

    @property
    def state(self) -> str:
        if self.stopped_at is not None:
            return "stopped"
        if self.stopping_at is not None:
            return "terminating"
        return "ready" if self.ready_at is not None else "starting"


# (pool, role, name) -> (process, base URL, pid); the process is already started
PodFactory = Callable[[str, str, str], tuple[Any, str, int | None]]


class LocalCluster:
    """Pods of every pool, their lifecycle, and the pods file the router and the scaler read."""

    def __init__(
        self,
        pods_file: Path,
        factory: PodFactory,
        roles: dict[str, str],
        model: str,
        *,
        startup_delay_s: float,
        ready_timeout_s: float = 120.0,
        drain_grace_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pods_file = pods_file
        self.factory = factory
        self.roles = roles  # pool -> router role
        self.model = model
        self.startup_delay_s = startup_delay_s
        self.ready_timeout_s = ready_timeout_s
        self.drain_grace_s = drain_grace_s
        self.clock = clock
        self.pods: list[Pod] = []
        self.events: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self._seq = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.session: aiohttp.ClientSession | None = None
        self.publish()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def live(self, pool: str) -> list[Pod]:
        """Pods counted as the Deployment's replicas (starting + ready)."""
        return [p for p in self.pods if p.pool == pool and p.stopping_at is None]

    def ready(self, pool: str) -> list[Pod]:
        return [p for p in self.live(pool) if p.ready_at is not None]

    def publish(self) -> None:
        recs = [PodRecord(p.name, p.url, p.pool, self.roles[p.pool], self.model, {"app": "kvscale-demo"})
                for p in self.pods if p.ready_at is not None and p.stopping_at is None]  # fmt: skip
        write_pods(self.pods_file, recs)

    def scale(self, pool: str, n: int) -> None:
        live = self.live(pool)
        for _ in range(n - len(live)):
            self._seq += 1
            name = f"{pool}-{self._seq}"
            try:
                proc, url, pid = self.factory(pool, self.roles[pool], name)
            except Exception as e:  # a pod that cannot start is reported, the loop goes on
                self.failures.append(f"{name}: {e}")
                log.error("pod %s failed to start: %s", name, e)
                continue
            pod = Pod(name, pool, self.roles[pool], url, proc, pid, self.clock())
            self.pods.append(pod)
            self.events.append({"t": pod.created_at, "pod": name, "pool": pool, "event": "created"})
            self._spawn(self._become_ready(pod))
        if n < len(live):
            # like a ReplicaSet: not-yet-ready pods go first, then the youngest
            victims = sorted(live, key=lambda p: (p.ready_at is not None, -p.created_at))[: len(live) - n]
            for pod in victims:
                pod.stopping_at = self.clock()
                self.events.append({"t": pod.stopping_at, "pod": pod.name, "pool": pool, "event": "terminating"})
            self.publish()
            for pod in victims:
                self._spawn(self._drain_and_stop(pod))

    async def _become_ready(self, pod: Pod) -> None:
        assert self.session is not None
        deadline = pod.created_at + self.ready_timeout_s
        await asyncio.sleep(max(0.0, pod.created_at + self.startup_delay_s - self.clock()))
        while pod.stopping_at is None:
            if not pod.proc.is_running():
                self.failures.append(f"{pod.name}: exited during startup")
                pod.stopping_at = self.clock()
                await self._stop(pod)
                return
            try:
                async with self.session.get(f"{pod.url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        pod.ready_at = self.clock()
                        self.events.append({"t": pod.ready_at, "pod": pod.name, "pool": pod.pool, "event": "ready"})
                        self.publish()
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if self.clock() > deadline:
                self.failures.append(f"{pod.name}: not ready after {self.ready_timeout_s:.0f}s")
                pod.stopping_at = self.clock()
                await self._stop(pod)
                return
            await asyncio.sleep(0.3)

    async def _drain_and_stop(self, pod: Pod) -> None:
        """Out of the pods file already; wait until it has nothing running or waiting (bounded), then stop."""
        assert self.session is not None
        if pod.ready_at is not None:
            await asyncio.sleep(0.5)  # let the router's discovery poll see the removal
            deadline = self.clock() + self.drain_grace_s
            while self.clock() < deadline:
                try:
                    st = await scrape(self.session, f"{pod.url}/metrics", timeout_s=2.0, light=True)
                    if st.running + st.waiting <= 0:
                        break
                except ScrapeError:
                    break
                await asyncio.sleep(0.25)
        await self._stop(pod)

    async def _stop(self, pod: Pod) -> None:
        # bounded (drained already): an unbounded stop in a worker thread would hold asyncio.run's exit on Ctrl-C
        await asyncio.to_thread(pod.proc.stop, 5.0)
        pod.stopped_at = self.clock()
        self.events.append({"t": pod.stopped_at, "pod": pod.name, "pool": pod.pool, "event": "stopped"})

    async def wait_ready(self, pool: str, n: int, timeout_s: float) -> None:
        deadline = self.clock() + timeout_s
        while len(self.ready(pool)) < n:
            if self.clock() > deadline:
                raise RuntimeError(f"{pool}: {len(self.ready(pool))}/{n} pods ready after {timeout_s:.0f}s; "
                                   f"{'; '.join(self.failures) or 'see the pod logs'}")  # fmt: skip
            if self.failures:
                raise RuntimeError(f"{pool}: pod start failed: {'; '.join(self.failures)}")
            await asyncio.sleep(0.2)

    async def drain_tasks(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop_all(self, timeout: float = 5.0) -> None:
        """Synchronous: stop every pod process still up, all in one ``timeout`` (also on Ctrl-C, outside the loop)."""
        live = [pod for pod in self.pods if pod.stopped_at is None]
        stop_together([pod.proc for pod in live], timeout)
        for pod in live:
            pod.stopped_at = self.clock()


# -- KEDA ---------------------------------------------------------------------------------------------------------
@dataclass
class Decision:
    t: float
    pool: str
    current: int
    ready: int
    metric: float | None
    active: bool | None
    desired: int
    error: str | None = None


@dataclass
class ScaledObjectLoop:
    """KEDA's polling loop for one ScaledObject (external trigger) driving one pool through the HPA."""

    name: str
    pool: str
    metadata: dict[str, str]
    hpa: KedaHpa
    cluster: LocalCluster
    polling_interval_s: float
    namespace: str = "demo"
    clock: Callable[[], float] = time.monotonic
    decisions: list[Decision] = field(default_factory=list)
    target: float = float("nan")
    metric_name: str = ""
    rpc_errors: int = 0

    @property
    def ref(self) -> Any:  # externalscaler_pb2.ScaledObjectRef
        from protos import externalscaler_pb2 as pb

        return pb.ScaledObjectRef(name=self.name, namespace=self.namespace, scalerMetadata=self.metadata)

    async def get_spec(self, stub: Any) -> None:
        resp = await stub.GetMetricSpec(self.ref, timeout=10)
        spec = resp.metricSpecs[0]
        self.metric_name = spec.metricName
        self.target = spec.targetSizeFloat or float(spec.targetSize)
        if not self.target > 0:
            raise RuntimeError(f"{self.name}: GetMetricSpec returned target {self.target}")

    async def poll_once(self, stub: Any) -> Decision:
        """One KEDA polling round; ``stub`` is an ``ExternalScalerStub`` on a ``grpc.aio`` channel."""
        import grpc

        from protos import externalscaler_pb2 as pb

        now = self.clock()
        metric: float | None = None
        active: bool | None = None
        error = None
        try:
            resp = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=self.ref, metricName=self.metric_name),
                                         timeout=10)  # fmt: skip
            mv = resp.metricValues[0]
            metric = mv.metricValueFloat or float(mv.metricValue)
            active = (await stub.IsActive(self.ref, timeout=10)).result
        except grpc.aio.AioRpcError as e:
            self.rpc_errors += 1
            error = f"{e.code().name}: {e.details()}"
        current = len(self.cluster.live(self.pool))
        # the HPA holds when the external metric cannot be read
        desired = current if metric is None else self.hpa.decide(now, current, metric, self.target, bool(active))
        if desired != current:
            self.cluster.scale(self.pool, desired)
        d = Decision(now, self.pool, current, len(self.cluster.ready(self.pool)), metric, active, desired, error)
        self.decisions.append(d)
        return d

    async def run(self, stub: Any) -> None:
        await self.get_spec(stub)
        while True:
            started = self.clock()
            await self.poll_once(stub)
            await asyncio.sleep(max(0.0, self.polling_interval_s - (self.clock() - started)))

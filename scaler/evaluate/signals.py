"""Signals inside the virtual clock: what the scaler's pod scraper would read from the simulated replicas.

Each replica's request counters (:class:`~simulator.metrics.ReplicaCounters`) and engine state become the same
:class:`~kvscale.engine_stats.EngineStats` a live pod's ``/metrics`` page parses to, and go through the same
:class:`~scaler.signals.PodHistory` as in production.
"""

from __future__ import annotations

from kvscale.engine_stats import EngineStats
from scaler.metadata import ScalerSettings
from scaler.signals import PodHistory, PoolSignals
from simulator.cluster import Cluster, Replica
from simulator.metrics import ReplicaCounters, request_tokens_buckets
from simulator.request import Request


class VirtualSource:
    """Pool signals from the replicas of a virtual-clock cluster, through the same :class:`PodHistory` as live.

    It sees what pod discovery would: the pool's ready, non-draining replicas (Kubernetes removes a terminating
    pod from the endpoints). Register it before ``cluster.run`` (it adds a finish listener).
    """

    def __init__(self, cluster: Cluster, pool: str, settings: ScalerSettings, max_model_len: int,
                 variant: str | None = None) -> None:  # fmt: skip
        """``variant``: of a mixed pool, read only that variant's replicas (its own Deployment's pods)."""
        self.cluster, self.pool, self.variant = cluster, pool, variant
        self.history = PodHistory(settings.latency_window_s)
        self._buckets = request_tokens_buckets(max_model_len)
        self._metrics: dict[int, ReplicaCounters] = {}
        # Each pod's running + waiting requests as of the last read: the pod-deletion-cost the scaler sets
        self.work: dict[int, float] = {}
        cluster.finish_listeners.append(self._on_finish)

    def _m(self, replica_id: int) -> ReplicaCounters:
        m = self._metrics.get(replica_id)
        if m is None:
            m = self._metrics[replica_id] = ReplicaCounters(self._buckets)
        return m

    def _on_finish(self, r: Replica, req: Request) -> None:
        if r.pool == self.pool and (self.variant is None or r.variant == self.variant):
            self._m(r.replica_id).on_finish(req)

    def stats(self, r: Replica, now: float) -> EngineStats:
        e, m = r.engine, self._m(r.replica_id)
        return EngineStats(
            engine="vllm", at=now, running=float(e.num_running), waiting=float(e.num_waiting),
            kv_usage=e.kv.usage, prompt_tokens_total=float(e.prompt_tokens_total),
            generation_tokens_total=float(e.generation_tokens_total), requests_finished_total=float(m.finished),
            prefix_queries_total=float(e.kv.prefix_queries), prefix_hits_total=float(e.kv.prefix_hits),
            ttft=m.ttft.snapshot(), itl=m.itl.snapshot(), prompt_len=m.isl.snapshot(), output_len=m.osl.snapshot(),
        )  # fmt: skip

    def read(self, now: float) -> PoolSignals:
        # Engines are as of the cluster's last state sync (<= 0.2 s ago), like a scrape that takes a moment.
        pods = self.cluster.serving_replicas(self.pool, now, self.variant)
        stats = {r.replica_id: self.stats(r, now) for r in pods}
        self.work = {i: s.running + s.waiting for i, s in stats.items()}
        return self.history.update(stats, now)

    def deletion_cost(self, r: Replica) -> float:
        """The ``controller.kubernetes.io/pod-deletion-cost`` the scaler keeps on pod ``r``: its running + waiting
        requests at the last read (a pod not read yet, e.g. still starting, costs 0)."""
        return self.work.get(r.replica_id, 0.0)

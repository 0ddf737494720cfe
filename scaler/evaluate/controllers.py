"""Who sets the replica counts of the virtual-clock cluster: KEDA + HPA (with the kvscale policy as the metric
producer, or a baseline metric) or the oracle. Each is a cluster controller ticked every :data:`TICK_S`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from scaler.evaluate.signals import VirtualSource
from scaler.hpa import Hpa
from scaler.policy import ScalingPolicy
from scaler.signals import SignalError, SignalPending
from simulator.cluster import Cluster

TICK_S = 5.0


class HpaController:
    """Cluster controller: per tick, update metric producers (e.g. the kvscale policy), then the HPAs."""

    interval_s = TICK_S

    def __init__(self, hpas: list[Hpa], before_sync: Callable[[float], None] | None = None) -> None:
        self.hpas = hpas
        self.before_sync = before_sync

    def tick(self, now: float, cluster: Cluster) -> None:
        if self.before_sync is not None:
            self.before_sync(now)
        for h in self.hpas:
            h.sync(now, cluster)

    @property
    def events(self) -> int:
        return sum(h.events for h in self.hpas)


class KvscaleProducer:
    """The scaler's background loop in virtual time: read signals and decide every signal interval."""

    def __init__(self, policy: ScalingPolicy, source: VirtualSource, cluster: Cluster) -> None:
        self.policy, self.source, self.cluster = policy, source, cluster
        self.next_t = 0.0
        self.trace: list[tuple[float, int, str]] = []

    def __call__(self, now: float) -> None:
        if now + 1e-9 < self.next_t:
            return
        self.next_t = now + self.policy.s.signal_interval_s
        ready = len(self.cluster.serving_replicas(self.source.pool, now))
        try:
            d = self.policy.decide(now, self.source.read(now))
        except SignalPending:
            d = self.policy.pending(now, ready)
        except SignalError as e:
            d = self.policy.hold(now, str(e), ready)
        self.trace.append((now, d.desired, d.reason))

    def metric(self, now: float) -> float | None:
        d = self.policy.last
        return None if d is None or d.desired < 0 else float(d.desired)


class OracleController:
    """Sets each pool to the most replicas needed over [t, t + startup + bucket] (future knowledge).

    With ``reaction_delay_s`` it is the *reactive* oracle instead: the same decisions, each made a cold start plus
    ``reaction_delay_s`` late, i.e. at ``t`` it provides for the largest exact need over
    ``[t - startup - delay, t - delay]``: demand already seen (a perfect, noise-free measurement one signal
    interval old), no future knowledge; its pods serve a cold start after the demand arrived. It holds each need
    for a cold start, so it is generous on attainment: an upper bound for reactive policies without standing
    headroom.
    """

    interval_s = TICK_S

    def __init__(
        self, schedules: dict[str, np.ndarray], bucket_s: float, startup_s: float, reaction_delay_s: float | None = None
    ) -> None:
        self.schedules, self.bucket_s, self.startup_s = schedules, bucket_s, startup_s
        self.reaction_delay_s = reaction_delay_s
        self.events = 0

    def target(self, pool: str, now: float) -> int:
        sched = self.schedules[pool]
        if self.reaction_delay_s is not None:
            now = max(0.0, now - self.startup_s - TICK_S - self.reaction_delay_s)
        i0 = int(now // self.bucket_s)
        i1 = int((now + self.startup_s + TICK_S) // self.bucket_s) + 1
        window = sched[min(i0, len(sched) - 1) : max(min(i1, len(sched)), min(i0, len(sched) - 1) + 1)]
        return int(window.max()) if window.size else 1

    def tick(self, now: float, cluster: Cluster) -> None:
        for pool in self.schedules:
            n = self.target(pool, now)
            if n != len(cluster.pool_replicas(pool)):
                self.events += 1
                cluster.set_replicas(pool, n, now)

"""Scorer ``least-kv``: low KV-cache usage and a short queue score higher (from the scraped engine metrics).

Score = 1 - (kv_weight · kv_usage + queue_weight · waiting / max waiting) / (kv_weight + queue_weight). Stats
older than ``stale_after_s`` (or never scraped) count as neutral 0.5, so a silent pod is neither chased nor
starved. The ``least-kv`` policy adds ``least-request`` at a small weight: it breaks ties between scrapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.policies.base import Scorer


class LeastKvScorer(Scorer):
    name = "least-kv"

    @dataclass(frozen=True)
    class Config:
        kv_weight: float = 1.0
        queue_weight: float = 1.0
        stale_after_s: float = 5.0

        def validate(self) -> None:
            if self.kv_weight < 0 or self.queue_weight < 0 or self.kv_weight + self.queue_weight <= 0:
                raise ValueError("kv_weight and queue_weight must be ≥ 0 and not both 0")

    def score(self, ctx, backends):
        now = self.services.clock()
        cfg = self.config
        fresh = {b: b.stats for b in backends if b.stats is not None and b.stats_age(now) <= cfg.stale_after_s}
        peak_wait = max((s.waiting for s in fresh.values()), default=0.0)
        total = cfg.kv_weight + cfg.queue_weight
        out = {}
        for b in backends:
            s = fresh.get(b)
            if s is None:
                out[b] = 0.5
                continue
            q = s.waiting / peak_wait if peak_wait > 0 else 0.0
            out[b] = 1.0 - (cfg.kv_weight * min(1.0, s.kv_usage) + cfg.queue_weight * q) / total
        return out


PLUGINS = (LeastKvScorer,)
POLICIES = {
    "least-kv": {"scorers": [{"type": "least-kv", "weight": 1.0}, {"type": "least-request", "weight": 0.25}]}
}

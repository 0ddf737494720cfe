"""Filter ``bounded-load``: the imbalance guard. Drops backends whose in-flight count exceeds
``factor`` times the mean (plus ``slack``), as in consistent hashing with bounded loads (Mirrokni et al.) and
AIBrix's prefix-cache imbalance check. So one hot prefix cannot pile onto one pod: once its pod is over the
bound, the prefix scorer only ranks the others. Never empties the set (the least-loaded backend always stays).
"""

from __future__ import annotations

from dataclasses import dataclass

from router.policies.base import Filter


class BoundedLoadFilter(Filter):
    name = "bounded-load"

    @dataclass(frozen=True)
    class Config:
        factor: float = 1.25  # allowed multiple of the mean in-flight (counting the new request)
        slack: int = 2  # absolute headroom, so light load is never "imbalanced"

        def validate(self) -> None:
            if self.factor < 1.0 or self.slack < 0:
                raise ValueError("factor must be ≥ 1 and slack ≥ 0")

    def filter(self, ctx, backends):
        if len(backends) <= 1:
            return list(backends)
        mean = (sum(b.in_flight for b in backends) + 1) / len(backends)
        bound = self.config.factor * mean + self.config.slack
        kept = [b for b in backends if b.in_flight + 1 <= bound]
        return kept or [min(backends, key=lambda b: b.in_flight)]


PLUGINS = (BoundedLoadFilter,)

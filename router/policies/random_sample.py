"""Filter ``random-sample`` (keep ``k`` backends chosen at random) and the ``power-of-two`` policy:
sample two, send to the one with fewer in-flight requests (Mitzenmacher's power of two choices)."""

from __future__ import annotations

from dataclasses import dataclass

from router.policies.base import Filter


class RandomSampleFilter(Filter):
    name = "random-sample"

    @dataclass(frozen=True)
    class Config:
        k: int = 2

        def validate(self) -> None:
            if self.k < 1:
                raise ValueError(f"k must be ≥ 1, got {self.k}")

    def filter(self, ctx, backends):
        if len(backends) <= self.config.k:
            return list(backends)
        return self.services.rng.sample(list(backends), self.config.k)


PLUGINS = (RandomSampleFilter,)
POLICIES = {
    "power-of-two": {"filters": [{"type": "random-sample", "config": {"k": 2}}], "scorers": [{"type": "least-request"}]}
}

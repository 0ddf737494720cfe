"""A small weighted histogram with fixed log-spaced buckets, for latency percentiles over millions of samples."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


class LogHistogram:
    """Buckets from ``lo`` to ``hi`` seconds, ``per_decade`` per factor of ten; quantiles interpolate in-bucket
    (relative error ≈ 10**(1/per_decade) - 1, i.e. ~2% with the default 100)."""

    def __init__(self, lo: float = 1e-4, hi: float = 1e4, per_decade: int = 100) -> None:
        self.lo, self.hi = lo, hi
        self.per_decade = per_decade
        n = math.ceil(math.log10(hi / lo) * per_decade)
        self.edges = lo * 10.0 ** (np.arange(n + 1) / per_decade)
        self.counts = np.zeros(n + 2)  # [underflow, buckets..., overflow]
        self.total = 0.0
        self.sum = 0.0

    def _index(self, v: float) -> int:
        if v < self.lo:
            return 0
        if v >= self.hi:
            return len(self.counts) - 1
        return int(math.log10(v / self.lo) * self.per_decade) + 1

    def add(self, value: float, weight: float = 1.0) -> None:
        if weight <= 0:
            return
        self.counts[self._index(value)] += weight
        self.total += weight
        self.sum += value * weight

    def add_many(self, values: Iterable[float] | np.ndarray, weight: float = 1.0) -> None:
        """Add every value with the same ``weight``."""
        v = np.asarray(values, dtype=np.float64)
        if v.size == 0 or weight <= 0:
            return
        idx = np.searchsorted(self.edges, v, side="right")  # 0 = underflow, len(edges) = overflow
        np.add.at(self.counts, np.minimum(idx, len(self.counts) - 1), weight)
        self.total += float(v.size) * weight
        self.sum += float(v.sum()) * weight

    def merge(self, other: LogHistogram) -> None:
        if other.counts.shape != self.counts.shape:
            raise ValueError("histograms have different buckets")
        self.counts += other.counts
        self.total += other.total
        self.sum += other.sum

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else math.nan

    def quantile(self, q: float) -> float:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if self.total == 0:
            return math.nan
        target = q * self.total
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, target, side="left"))
        if i == 0:
            return self.lo
        if i >= len(self.counts) - 1:
            return self.hi
        before = cum[i - 1]
        frac = (target - before) / self.counts[i] if self.counts[i] else 0.0
        lo, hi = self.edges[i - 1], self.edges[i]
        return float(lo * (hi / lo) ** frac)

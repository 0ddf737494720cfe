"""Resizing a trace: compress time, scale the rate at the same span, or cut a window."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from kvscale.traces.format import TraceRequest
from kvscale.traces.prompts import TOKEN_ID_HIGH, TOKEN_ID_LOW

_TOKEN_SHIFT = 7919  # copy c of a token-id prompt shifts ids by c * this within the synthetic id range


def _check(name: str, x: float) -> float:
    if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {x!r}")
    return float(x)


def speed(trace: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """Time compressed ``factor`` x: every request kept, same lengths and prefixes, arrivals at ``t / factor``."""
    factor = _check("speed", factor)
    return [dataclasses.replace(r, arrival_s=r.arrival_s / factor) for r in trace]


def window(trace: Sequence[TraceRequest], start_s: float, end_s: float) -> list[TraceRequest]:
    """The requests arriving in ``[start_s, end_s)``, shifted to start at 0."""
    if not (math.isfinite(start_s) and math.isfinite(end_s)) or start_s < 0 or end_s <= start_s:
        raise ValueError(f"window must be START:END with 0 <= START < END, got {start_s}:{end_s}")
    return [dataclasses.replace(r, arrival_s=r.arrival_s - start_s) for r in trace if start_s <= r.arrival_s < end_s]


def _copy(r: TraceRequest, c: int, arrival: float, block_ns: int, group_ns: int) -> TraceRequest:
    """Copy ``c`` (>= 1) of ``r`` in its own prefix namespace: it shares prefixes with the other requests of copy
    ``c`` exactly as ``r`` does with the originals, and nothing with any other copy."""
    tokens = r.prompt_tokens
    if tokens is not None:
        span, shift = TOKEN_ID_HIGH - TOKEN_ID_LOW, c * _TOKEN_SHIFT
        tokens = [TOKEN_ID_LOW + (t - TOKEN_ID_LOW + shift) % span if TOKEN_ID_LOW <= t < TOKEN_ID_HIGH else t
                  for t in tokens]  # fmt: skip
    return dataclasses.replace(
        r, arrival_s=arrival, prompt_tokens=tokens,
        prefix_blocks=None if r.prefix_blocks is None else [b + c * block_ns for b in r.prefix_blocks],
        prefix_group=None if r.prefix_group is None else r.prefix_group + c * group_ns,
        session=None if r.session is None else f"{r.session}#{c}",
    )  # fmt: skip


def rate_scale(trace: Sequence[TraceRequest], factor: float, seed: int = 0) -> list[TraceRequest]:
    """The same span at ``factor`` x the rate. Below 1: each request kept with probability ``factor``. Above 1:
    ``floor(factor)`` copies of every request (and one more with the fractional probability); copy ``c >= 1``
    arrives uniformly between its original and the next original request, in its own prefix namespace (block ids,
    prefix groups, token ids and sessions renamed), so the trace's prefix-reuse fraction is kept, not inflated.
    Deterministic for a seed."""
    factor = _check("rate_scale", factor)
    rng = np.random.default_rng(seed)
    n = len(trace)
    if factor < 1:
        keep = rng.random(n) < factor
        return [r for r, k in zip(trace, keep, strict=True) if k]
    t = np.array([r.arrival_s for r in trace])
    gaps = np.diff(t, append=t[-1] + (float(np.mean(np.diff(t))) if n > 1 else 0.0)) if n else t
    block_ns = 1 + max((max(r.prefix_blocks) for r in trace if r.prefix_blocks), default=0)
    group_ns = 1 + max((r.prefix_group for r in trace if r.prefix_group is not None), default=0)
    whole, frac = int(factor), factor - int(factor)
    out = list(trace)
    for c in range(1, whole + (1 if frac > 0 else 0)):
        u, keep = rng.random(n), (rng.random(n) < frac) if c == whole else np.ones(n, dtype=bool)
        out.extend(_copy(r, c, float(t[i] + u[i] * gaps[i]), block_ns, group_ns)
                   for i, r in enumerate(trace) if keep[i])  # fmt: skip
    out.sort(key=lambda r: r.arrival_s)
    return out


def resize(
    trace: Sequence[TraceRequest],
    *,
    window_s: tuple[float, float] | None = None,
    rate: float | None = None,
    speed_x: float | None = None,
    seed: int = 0,
) -> list[TraceRequest]:
    """The transforms of ``kvscale trace transform`` in its order: window, then rate scale, then speed."""
    out = list(trace)
    if window_s is not None:
        out = window(out, *window_s)
    if rate is not None:
        out = rate_scale(out, rate, seed=seed)
    if speed_x is not None:
        out = speed(out, speed_x)
    return out

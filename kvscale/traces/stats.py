"""What a trace holds: size, span, rates, length distributions and the prefix reuse an ideal cache would get."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvscale.hashing import block_hashes
from kvscale.traces.format import TraceRequest

STATS_BLOCK_SIZE = 16  # granularity of prefix reuse for traces with token ids (vLLM's default block size)


def prefix_reuse(trace: Sequence[TraceRequest], block_size: int = STATS_BLOCK_SIZE) -> float:
    """Fraction of all prompt tokens that are a prefix seen earlier in the trace: the hit rate of an infinite
    cache shared by every replica. Prefix-block traces count at their block level (a partial block counts up to
    the tokens seen of it), token-id traces per full ``block_size`` block; prompts with neither share nothing."""
    total = sum(r.input_len for r in trace)
    if total == 0:
        return 0.0
    reused = 0
    seen_blocks: dict[tuple[int, int], tuple[int, int]] = {}  # (parent node, block id) -> (node, tokens seen)
    seen_hashes: set[int] = set()
    for r in trace:
        if r.prefix_blocks is not None:
            bt = r.prefix_block_tokens or 1
            parent, chained = -1, True
            for i, b in enumerate(r.prefix_blocks):
                n = min(bt, r.input_len - i * bt)
                node, had = seen_blocks.get((parent, b), (len(seen_blocks), 0))
                if chained:
                    reused += min(n, had)
                    chained = had >= n
                if n > had:
                    seen_blocks[(parent, b)] = (node, n)
                parent = node
        elif r.prompt_tokens is not None:
            hs = block_hashes(r.prompt_tokens, block_size)
            k = 0
            while k < len(hs) and hs[k] in seen_hashes:
                k += 1
            reused += k * block_size
            seen_hashes.update(hs[k:])
    return reused / total


def _dist(v: np.ndarray) -> dict[str, float]:
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def trace_stats(trace: Sequence[TraceRequest]) -> dict[str, Any]:
    """Requests, span, mean rate, the busiest minute's rate, ISL/OSL mean/p50/p99 and :func:`prefix_reuse`."""
    if not trace:
        raise ValueError("the trace has no requests")
    t = np.array([r.arrival_s for r in trace])
    span = float(t[-1] - t[0])
    per_min = np.bincount(((t - t[0]) // 60).astype(np.int64))
    return {
        "requests": len(trace),
        "span_s": span,
        "mean_rate": len(trace) / span if span > 0 else float("nan"),
        "peak_requests_per_min": int(per_min.max()),
        "peak_rate_per_min": float(per_min.max()) / 60.0,  # req/s over the busiest whole minute
        "isl": _dist(np.array([r.input_len for r in trace], dtype=np.float64)),
        "osl": _dist(np.array([r.output_len for r in trace], dtype=np.float64)),
        "prefix_reuse": prefix_reuse(trace),
        "prefix_kind": ("blocks" if any(r.prefix_blocks is not None for r in trace)
                        else "tokens" if any(r.prompt_tokens is not None for r in trace) else "none"),  # fmt: skip
    }


def plot_trace(trace: Sequence[TraceRequest], out: str | Path, title: str = "") -> None:
    """Arrivals per minute, and the ISL and OSL distributions, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([r.arrival_s for r in trace])
    per_min = np.bincount(((t - t[0]) // 60).astype(np.int64))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].step(np.arange(per_min.size), per_min, where="post")
    axes[0].set(xlabel="minute", ylabel="arrivals per minute", title="arrivals")
    for ax, name, v in ((axes[1], "input", [r.input_len for r in trace]),
                        (axes[2], "output", [r.output_len for r in trace])):  # fmt: skip
        v = np.asarray(v, dtype=np.float64)
        bins = np.logspace(0, np.log10(max(v.max(), 2)), 50)
        ax.hist(v, bins=bins)
        ax.set(xscale="log", xlabel=f"{name} tokens", ylabel="requests", title=f"{name} length")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)

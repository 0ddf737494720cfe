"""``kvscale eval routing``: the router's policies on a trace over a virtual cluster, side by side.

Each policy replays the same trace on a fresh :class:`~simulator.cluster.Cluster` of identical replicas (the
built-in or a profiled latency model), dispatched by :class:`~router.evaluate.dispatch.PipelineDispatcher`. Per
policy: TTFT p50/p90/p99, ITL p50/p90, E2E p50/p90, prefix-hit rate (prompt tokens served from cache / prompt
tokens), throughput, load imbalance (max / mean running requests over the replicas, time-averaged), and with
``goodput`` the highest time compression at which P90 TTFT stays within the SLO (bisection): the request rate
the policy sustains on this exact traffic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvscale.latency import LatencyModel
from kvscale.traces.format import TraceRequest
from kvscale.traces.stats import prefix_reuse
from kvscale.traces.transform import speed as speed_up
from router.evaluate.dispatch import cluster_dispatchers
from simulator.cluster import Cluster, ClusterResult
from simulator.engine import EngineConfig
from simulator.scheduler import SchedulerConfig


@dataclass
class RoutingSetup:
    """The cluster every policy runs on."""

    latency: LatencyModel
    replicas: int = 16
    pools: tuple[int, int] | None = None  # P/D: (prefill, decode) replicas instead of `replicas` aggregated ones
    sync_interval_s: float = 0.2  # the router's scrape interval (router serve --scrape-interval-s default)
    kv_event_delay_s: float = 0.05
    kv_event_drop: float = 0.0
    max_model_len: int | None = None  # default: the model's context (the latency model's max_model_len) or 128k
    seed: int = 0
    extra_policies: dict[str, Any] = field(default_factory=dict)
    engine: EngineConfig | None = None  # the replicas' engine (default: the model's KV capacity, 128k context)

    def engine_config(self) -> EngineConfig:
        if self.engine is not None:
            return self.engine
        ctx = self.max_model_len or 131072  # Llama-3.1's context; the latency models do not record one
        return EngineConfig(scheduler=SchedulerConfig(max_model_len=ctx), num_gpu_blocks=self.latency.num_gpu_blocks(),
                            materialize_outputs=False)  # fmt: skip


class _Imbalance:
    """A controller that only watches: max / mean running requests over serving replicas, once a second."""

    interval_s = 1.0

    def __init__(self) -> None:
        self.ratios: list[float] = []

    def tick(self, now: float, cluster: Cluster) -> None:
        running = [r.engine.num_running for r in cluster.replicas if r.serving(now) and r.pool != "prefill"]
        mean = sum(running) / len(running) if running else 0.0
        if mean > 0:
            self.ratios.append(max(running) / mean)


def run_policy(trace: Sequence[TraceRequest], policy: str, setup: RoutingSetup) -> dict[str, Any]:
    """One policy on one trace: the figures of the module docstring (without goodput)."""
    kw = {"extra_policies": setup.extra_policies, "seed": setup.seed, "kv_event_delay_s": setup.kv_event_delay_s,
          "kv_event_drop": setup.kv_event_drop}  # fmt: skip
    dispatchers, d, kv_events = cluster_dispatchers(policy, setup.pools is not None, **kw)
    if setup.pools is None:
        replicas = {"aggregated": setup.replicas}
    else:
        replicas = {"prefill": setup.pools[0], "decode": setup.pools[1]}
    cluster = Cluster(setup.latency, setup.engine_config(), replicas=replicas, dispatcher=dispatchers,
                      sync_interval_s=setup.sync_interval_s, kv_events=kv_events)  # fmt: skip
    watch = _Imbalance()
    t0 = time.perf_counter()
    res = cluster.run(trace, controller=watch)
    wall = time.perf_counter() - t0
    return {**figures(res), "load_imbalance": float(np.mean(watch.ratios)) if watch.ratios else 1.0,
            "rejected_by_filters": d.rejected, "kv_event_batches_dropped": d.kv_batches_dropped,
            "wall_s": wall}  # fmt: skip


def figures(res: ClusterResult) -> dict[str, Any]:
    s = res.summary()
    rec = [r for r in res.records if not r.dropped]
    prompt = sum(r.input_len for r in rec)
    done = [r for r in rec if not math.isnan(r.e2e_s)]
    e2e = np.array([r.e2e_s for r in done]) if done else np.array([math.nan])
    span = max((r.arrival_s + r.e2e_s for r in done), default=0.0) - min((r.arrival_s for r in rec), default=0.0)
    return {
        "requests": len(res.records),
        "completed": len(done),
        "dropped_too_long": sum(r.dropped for r in res.records),
        "ttft_p50_s": s["ttft_p50_s"],
        "ttft_p90_s": s["ttft_p90_s"],
        "ttft_p99_s": s["ttft_p99_s"],
        "itl_p50_s": s["itl_p50_s"],
        "itl_p90_s": s["itl_p90_s"],
        "e2e_p50_s": float(np.percentile(e2e, 50)),
        "e2e_p90_s": float(np.percentile(e2e, 90)),
        "prefix_hit_rate": sum(r.cached_tokens for r in rec) / prompt if prompt else 0.0,
        "throughput_rps": len(done) / span if span > 0 else math.nan,
        "output_tokens_per_s": sum(r.output_len for r in done) / span if span > 0 else math.nan,
    }


def goodput(trace: Sequence[TraceRequest], policy: str, setup: RoutingSetup, ttft_slo_s: float, *,
            lo: float = 1 / 64, hi: float = 64.0, steps: int = 6,
            run: Callable[..., dict[str, Any]] = run_policy) -> dict[str, Any]:  # fmt: skip
    """The highest ``speed`` (time compression) in [lo, hi] at which P90 TTFT <= ``ttft_slo_s``: grow or shrink
    by 2x from 1 until the SLO flips, then bisect ``steps`` times (geometric midpoints). Returns the speed, the
    request rate it means and the runs made."""
    base_rate = len(trace) / max(trace[-1].arrival_s - trace[0].arrival_s, 1e-9)
    runs: dict[float, float] = {}

    def ok(x: float) -> bool:
        if x not in runs:
            runs[x] = run(speed_up(trace, x), policy, setup)["ttft_p90_s"]
        return runs[x] <= ttft_slo_s

    good, bad = (1.0, None) if ok(1.0) else (None, 1.0)
    while good is None and bad > lo:
        x = bad / 2
        good, bad = (x, bad) if ok(x) else (None, x)
    while bad is None and good < hi:
        x = good * 2
        good, bad = (good, x) if not ok(x) else (x, None)
    if good is None:
        return {"speed": 0.0, "rate_rps": 0.0, "runs": runs, "note": f"P90 TTFT above the SLO even at speed {lo}"}
    if bad is not None:
        for _ in range(steps):
            x = math.sqrt(good * bad)
            good, bad = (x, bad) if ok(x) else (good, x)
    return {"speed": good, "rate_rps": good * base_rate, "runs": {f"{k:.4g}": v for k, v in sorted(runs.items())},
            "capped": bad is None}  # fmt: skip


def evaluate(
    trace: Sequence[TraceRequest],
    setup: RoutingSetup,
    policies: Sequence[str],
    *,
    ttft_slo_s: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every policy on ``trace`` (and its goodput when ``ttft_slo_s`` is given)."""
    out: dict[str, Any] = {}
    for name in policies:
        if progress:
            progress(name)
        row = run_policy(trace, name, setup)
        if ttft_slo_s is not None:
            row["goodput"] = goodput(trace, name, setup, ttft_slo_s)
        out[name] = row
    return {
        "policies": out,
        "replicas": setup.replicas,
        "pools": setup.pools,
        "prefix_reuse_ceiling": prefix_reuse(trace),
        "latency_model": setup.latency.name,
        "sync_interval_s": setup.sync_interval_s,
        "kv_event_delay_s": setup.kv_event_delay_s,
        "kv_event_drop": setup.kv_event_drop,
    }

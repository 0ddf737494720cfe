"""Simulated capacity: the largest Poisson rate one replica sustains under an SLO, found by running the simulator.

The authoritative (slow: seconds) counterpart of the closed forms in :mod:`predictor.capacity`: bisection on the
Poisson arrival rate, bracketed around the analytic estimate, each probe a run of the virtual-clock simulator (the
same engine core as everywhere) with one replica driven by the latency model; the rate is sustainable when the SLO
percentile of TTFT (prefill, aggregated) and ITL (decode, aggregated) holds. ``kvscale profile capacity`` prints
both. :class:`CapacityCache` memoizes results so callers compute each (model, SLO, workload, role) once, off any
request path; the serving scaler imports none of this (only the analytic :mod:`predictor.capacity`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvscale.latency import LatencyModel
from predictor.capacity import ROLES, SLO, WorkloadShape, analytic_capacity_rps
from simulator.cluster import Cluster
from simulator.engine import EngineConfig
from simulator.scheduler import SchedulerConfig
from simulator.workload import WORKLOADS, TraceRequest, WorkloadSpec, build_trace


def workload_shape(workload: str | WorkloadSpec, samples: int = 20000, seed: int = 0) -> WorkloadShape:
    """The means and the prompt spread of a workload (by name or spec) that the analytic forms need, from
    ``samples`` draws."""
    spec = WORKLOADS[workload] if isinstance(workload, str) else workload
    isl, osl = spec.sample(samples, np.random.default_rng(seed))
    mean_isl = float(isl.mean())
    # Shared prefixes: each tenant's system prompt is computed once and then hit (steady state).
    cached = (spec.prefix_len // 16 * 16) / mean_isl if spec.shared_prefix else 0.0
    return WorkloadShape(mean_isl, float(osl.mean()), min(cached, 0.99), float(isl.var()) / mean_isl**2)


@dataclass(frozen=True)
class Probe:
    rate_rps: float
    ttft_s: float  # at the SLO percentile
    itl_s: float
    completed: float  # fraction of the trace finished by the end of the run
    ok: bool


@dataclass(frozen=True)
class CapacityResult:
    role: str
    workload: str
    slo: SLO
    method: str  # "simulate" | "analytic"
    rate_rps: float  # the answer: max sustainable requests/s per replica
    analytic_rps: float  # the closed-form estimate, for the cross-check
    mean_isl: float
    mean_osl: float
    cached_fraction: float
    isl_scv: float  # the prompts' spread: variance / mean^2
    prefill_tokens_per_s: float  # rate_rps x uncached ISL
    decode_tokens_per_s: float  # rate_rps x OSL
    probes: tuple[Probe, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["slo"] = dataclasses.asdict(self.slo)
        return d


def _engine_config(model: LatencyModel, max_num_seqs: int, max_model_len: int = 8192) -> EngineConfig:
    return EngineConfig(
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len),
        block_size=model.block_size(),
        num_gpu_blocks=model.num_gpu_blocks(),
        materialize_outputs=False,
    )


def _probe(
    model: LatencyModel,
    slo: SLO,
    workload: WorkloadSpec,
    role: str,
    rate: float,
    duration_s: float,
    seed: int,
    max_num_seqs: int,
) -> Probe:
    trace = build_trace("poisson", workload, rate, duration_s, seed=seed)
    if role == "prefill":  # a prefill pod answers max_tokens=1
        trace = [TraceRequest(t.arrival_s, t.prompt_tokens, t.input_len, 1, t.prefix_group) for t in trace]
    pools = {"prefill": 64, "decode": 1} if role == "decode" else {"aggregated": 1}
    config = _engine_config(model, max_num_seqs, workload.max_input_len + workload.max_output_len)
    from router.evaluate.dispatch import PipelineDispatcher  # the router's default policy routes the probe

    cluster = Cluster(model, config, replicas=pools, dispatcher=PipelineDispatcher("least-request"))
    # Run a grace period past the last arrival: an overloaded replica leaves requests unfinished.
    result = cluster.run(trace, until_s=duration_s * 1.25 + 5.0)
    recs = result.records[len(result.records) // 10 :]  # warm-up excluded
    ttft = np.array([r.ttft_s for r in recs], dtype=np.float64)
    done = ~np.isnan(np.array([r.e2e_s for r in recs], dtype=np.float64))
    completed = float(done.mean()) if recs else 0.0
    # Unfinished requests count as infinitely late, so a backlog cannot hide behind the percentile.
    ttft_p = float(np.percentile(np.nan_to_num(ttft, nan=1e9), slo.percentile)) if recs else math.inf
    itl_p = result.itl.quantile(slo.q) if result.itl.total else 0.0
    if role == "prefill":
        ok = ttft_p <= slo.ttft_s
    elif role == "decode":
        ok = itl_p <= slo.itl_s and completed >= slo.q
    else:
        ok = ttft_p <= slo.ttft_s and itl_p <= slo.itl_s
    return Probe(rate, ttft_p, itl_p, completed, ok)


def capacity(
    model: LatencyModel,
    slo: SLO,
    workload: str | WorkloadSpec,
    role: str = "aggregated",
    method: str = "simulate",
    *,
    min_requests: int = 1500,
    max_duration_s: float = 600.0,
    rel_tol: float = 0.03,
    seed: int = 0,
    max_num_seqs: int = 256,
) -> CapacityResult:
    """Maximum Poisson request rate one ``role`` replica sustains under ``slo`` on ``workload``.

    ``simulate`` brackets the rate around the analytic estimate, then bisects until the bracket is within
    ``rel_tol``; each probe simulates enough arrivals (``min_requests``) for a stable percentile.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if method not in ("simulate", "analytic"):
        raise ValueError(f"method must be simulate or analytic, got {method!r}")
    spec = WORKLOADS[workload] if isinstance(workload, str) else workload
    shape = workload_shape(spec)
    analytic = analytic_capacity_rps(model, slo, shape, role)
    probes: list[Probe] = []

    def run(rate: float) -> bool:
        duration = min(max_duration_s, max(60.0, min_requests / rate))
        p = _probe(model, slo, spec, role, rate, duration, seed, max_num_seqs)
        probes.append(p)
        return p.ok

    rate = analytic
    if method == "simulate":
        lo, hi = 0.0, 0.0
        guess = analytic if analytic > 0 else 0.1
        if run(guess):
            lo, hi = guess, guess * 1.5
            while run(hi):
                lo, hi = hi, hi * 1.5
                if hi > 1e5:
                    break
        else:
            hi, lo = guess, guess / 1.5
            while lo > 1e-3 and not run(lo):
                hi, lo = lo, lo / 1.5
            if lo <= 1e-3:
                lo = 0.0
        while lo > 0 and (hi - lo) / lo > rel_tol:
            mid = (lo + hi) / 2.0
            if run(mid):
                lo = mid
            else:
                hi = mid
        rate = lo
    new = max(1.0, shape.mean_isl * (1.0 - shape.cached_fraction))
    return CapacityResult(
        role=role,
        workload=spec.name,
        slo=slo,
        method=method,
        rate_rps=rate,
        analytic_rps=analytic,
        mean_isl=shape.mean_isl,
        mean_osl=shape.mean_osl,
        cached_fraction=shape.cached_fraction,
        isl_scv=shape.isl_scv,
        prefill_tokens_per_s=rate * new,
        decode_tokens_per_s=rate * shape.mean_osl,
        probes=tuple(sorted(probes, key=lambda p: p.rate_rps)),
    )


def model_fingerprint(model: LatencyModel) -> tuple:
    """What identifies a latency model for caching (name alone is not enough: refits keep names)."""
    return (model.name, dataclasses.astuple(model.coefficients), model.num_gpu_blocks())


class CapacityCache:
    """A bounded memo of :func:`capacity` results, so callers compute each (model, SLO, workload, role) once.

    The scaler fills it off the request path (at registration or in a background task) and reads it with
    :meth:`peek`, which never computes.
    """

    def __init__(self, max_entries: int = 256, compute: Callable[..., CapacityResult] = capacity) -> None:
        self._entries: OrderedDict[tuple, CapacityResult] = OrderedDict()
        self._max = max_entries
        self._compute = compute
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model: LatencyModel, slo: SLO, workload: str, role: str, method: str) -> tuple:
        return (model_fingerprint(model), slo, workload, role, method)

    def peek(self, model: LatencyModel, slo: SLO, workload: str, role: str, method: str = "simulate"):
        """The cached result or None (never computes)."""
        return self._entries.get(self.key(model, slo, workload, role, method))

    def get(
        self, model: LatencyModel, slo: SLO, workload: str, role: str, method: str = "simulate", **kw
    ) -> CapacityResult:
        k = self.key(model, slo, workload, role, method)
        if k in self._entries:
            self.hits += 1
            self._entries.move_to_end(k)
            return self._entries[k]
        self.misses += 1
        result = self._compute(model, slo, workload, role, method, **kw)
        self._entries[k] = result
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return result

    def __len__(self) -> int:
        return len(self._entries)

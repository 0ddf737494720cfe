"""How much load one replica sustains under a latency SLO — the number the scaler divides demand by.

Two ways, cross-checked against each other (``kvscale profile capacity`` prints both):

* **simulate** (authoritative, slow: seconds): bisection on the Poisson arrival rate, each probe a run of the
  virtual-clock simulator (the same engine core as everywhere) with one replica driven by the latency model;
  the rate is sustainable when the SLO percentile of TTFT (prefill, aggregated) and ITL (decode, aggregated) holds.
* **analytic** (instant): closed forms from the step-time model —
  prefill: an M/D/1 queue of prefills (Poisson arrivals, deterministic service = the prefill step time), whose
  waiting-time tail is approximated as ``P(W > t) = rho * exp(-t / m)`` with ``m = S / (2 (1 - rho))`` (exact mean,
  exponential tail: the heavy-traffic form of the M/G/1 wait); decode: the largest batch whose step meets the ITL
  target at the given context (Dynamo's planner rule), capped by the KV cache; aggregated: a fixed point where one
  step carries the decode batch plus the prefill work arriving meanwhile.

The scaler calls the analytic functions on live signals and may use :class:`CapacityCache` for simulated
results; nothing here is meant to run on a request path except the analytic functions (microseconds).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvscale.latency import LatencyModel
from simulator.engine import EngineConfig
from simulator.scheduler import SchedulerConfig
from simulator.workload import WORKLOADS, TraceRequest, WorkloadSpec, build_trace

ROLES = ("prefill", "decode", "aggregated")


@dataclass(frozen=True)
class SLO:
    """Latency targets at a percentile (e.g. TTFT p90 ≤ 500 ms and ITL p90 ≤ 50 ms)."""

    ttft_s: float
    itl_s: float
    percentile: float = 90.0

    def __post_init__(self) -> None:
        for name in ("ttft_s", "itl_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"SLO {name} must be a positive number of seconds, got {v!r}")
        if not 0 < self.percentile < 100:
            raise ValueError(f"SLO percentile must be in (0, 100), got {self.percentile!r}")

    @property
    def q(self) -> float:
        return self.percentile / 100.0


@dataclass(frozen=True)
class DecodeCapacity:
    batch: int  # largest batch meeting the ITL target (0: not even one sequence does)
    step_s: float  # decode step time at that batch
    tokens_per_s: float  # batch / step_s


@dataclass(frozen=True)
class WorkloadShape:
    """Means of a workload that the analytic forms need."""

    mean_isl: float
    mean_osl: float
    cached_fraction: float = 0.0  # of prompt tokens served from the prefix cache

    @classmethod
    def of(cls, workload: str | WorkloadSpec, samples: int = 20000, seed: int = 0) -> WorkloadShape:
        spec = WORKLOADS[workload] if isinstance(workload, str) else workload
        isl, osl = spec.sample(samples, np.random.default_rng(seed))
        mean_isl = float(isl.mean())
        # Shared prefixes: each tenant's system prompt is computed once and then hit (steady state).
        cached = (spec.prefix_len // 16 * 16) / mean_isl if spec.shared_prefix else 0.0
        return cls(mean_isl, float(osl.mean()), min(cached, 0.99))


def _check_fraction(cached_fraction: float) -> None:
    if not 0.0 <= cached_fraction < 1.0:
        raise ValueError(f"cached_fraction must be in [0, 1), got {cached_fraction!r}")


def _prefill_service_s(model: LatencyModel, mean_isl: float, cached_fraction: float) -> tuple[float, int]:
    _check_fraction(cached_fraction)
    cached = int(mean_isl * cached_fraction)
    new = max(1, round(mean_isl) - cached)
    return model.prefill_time(new, cached), new


def md1_wait_quantile(rho: float, service_s: float, q: float) -> float:
    """Approximate q-quantile of the waiting time of an M/D/1 queue (see module docstring); inf if rho ≥ 1."""
    if rho >= 1.0:
        return math.inf
    if rho <= 0.0 or rho <= 1.0 - q:
        return 0.0  # at least a fraction q of arrivals find the server idle
    m = service_s / (2.0 * (1.0 - rho))
    return m * math.log(rho / (1.0 - q))


def predict_prefill_ttft_s(
    model: LatencyModel, rate_rps: float, mean_isl: float, percentile: float, cached_fraction: float = 0.0
) -> float:
    """TTFT at ``percentile`` of one replica receiving ``rate_rps`` prefills (M/D/1); inf when saturated.
    The model's per-request ``request_overhead_s`` (API server, outside the engine) adds to TTFT, not to the service."""
    if rate_rps < 0:
        raise ValueError(f"rate must be >= 0, got {rate_rps!r}")
    service, _ = _prefill_service_s(model, mean_isl, cached_fraction)
    return model.request_overhead_s + service + md1_wait_quantile(rate_rps * service, service, percentile / 100.0)


def _bisect_max(ok: Callable[[float], bool], hi: float, iters: int = 60) -> float:
    """Largest x in [0, hi] with ok(x), for ok monotone decreasing in x (ok(0) assumed)."""
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2.0
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def prefill_capacity_rps(model: LatencyModel, slo: SLO, mean_isl: float, cached_fraction: float = 0.0) -> float:
    """Max prefill requests/s one replica serves with TTFT at the SLO percentile ≤ ``slo.ttft_s``."""
    service, _ = _prefill_service_s(model, mean_isl, cached_fraction)
    if model.request_overhead_s + service >= slo.ttft_s:
        return 0.0
    return _bisect_max(
        lambda r: predict_prefill_ttft_s(model, r, mean_isl, slo.percentile, cached_fraction) <= slo.ttft_s,
        hi=1.0 / service,
    )


def prefill_capacity_tokens_per_s(
    model: LatencyModel, slo: SLO, mean_isl: float, cached_fraction: float = 0.0
) -> float:
    """Max *uncached* prefill tokens/s one replica serves under the TTFT SLO (demand is divided by this)."""
    _, new = _prefill_service_s(model, mean_isl, cached_fraction)
    return prefill_capacity_rps(model, slo, mean_isl, cached_fraction) * new


def _kv_token_capacity(model: LatencyModel) -> int:
    return model.num_gpu_blocks() * model.block_size()


def decode_capacity(model: LatencyModel, slo: SLO, mean_context: float, max_num_seqs: int = 256) -> DecodeCapacity:
    """Largest decode batch whose step time meets ``slo.itl_s`` at ``mean_context`` tokens per sequence."""
    if mean_context < 0:
        raise ValueError(f"mean_context must be >= 0, got {mean_context!r}")
    c = model.coefficients
    per_seq = c.per_decode_seq_s + c.per_decode_ctx_s * mean_context
    room = slo.itl_s - c.base_s
    if room <= 0:
        return DecodeCapacity(0, model.decode_step_time(1, round(mean_context)), 0.0)
    batch = max_num_seqs if per_seq <= 0 else min(max_num_seqs, int(room / per_seq))
    if mean_context > 0:
        batch = min(batch, int(_kv_token_capacity(model) / mean_context))
    if batch <= 0:
        return DecodeCapacity(0, model.decode_step_time(1, round(mean_context)), 0.0)
    step = model.decode_step_time(batch, round(batch * mean_context))
    return DecodeCapacity(batch, step, batch / step)


def aggregated_mean_step_s(
    model: LatencyModel, rate_rps: float, mean_isl: float, mean_osl: float, cached_fraction: float = 0.0
) -> float:
    """Mean step time of a replica serving ``rate_rps`` mixed requests (inf if it cannot keep up).

    Fixed point: a step of length T carries the decode batch B = rate·osl·T (Little's law) and the prefill work
    of the rate·T requests that arrived meanwhile, so T = base + T·rate·k, i.e. T = base / (1 - rate·k), with k
    the per-request prefill seconds plus osl x the per-sequence decode cost at the mean context.
    """
    c = model.coefficients
    service, _ = _prefill_service_s(model, mean_isl, cached_fraction)
    prefill_work = service - c.base_s
    ctx = mean_isl + mean_osl / 2.0
    k = prefill_work + mean_osl * (c.per_decode_seq_s + c.per_decode_ctx_s * ctx)
    denom = 1.0 - rate_rps * k
    return c.base_s / denom if denom > 0 else math.inf


def aggregated_capacity_rps(
    model: LatencyModel,
    slo: SLO,
    mean_isl: float,
    mean_osl: float,
    cached_fraction: float = 0.0,
    max_num_seqs: int = 256,
) -> float:
    """Max requests/s of one aggregated replica: mean step ≤ ITL target and prefill TTFT (M/D/1, each prefill
    stretched by the concurrent decode batch) ≤ TTFT target; batch ≤ ``max_num_seqs``."""
    c = model.coefficients
    service, _ = _prefill_service_s(model, mean_isl, cached_fraction)
    ctx = mean_isl + mean_osl / 2.0

    def ok(rate: float) -> bool:
        step = aggregated_mean_step_s(model, rate, mean_isl, mean_osl, cached_fraction)
        if step > slo.itl_s:
            return False
        batch = rate * mean_osl * step
        if batch > max_num_seqs:
            return False
        s_eff = service + batch * (c.per_decode_seq_s + c.per_decode_ctx_s * ctx)
        return model.request_overhead_s + s_eff + md1_wait_quantile(rate * s_eff, s_eff, slo.q) <= slo.ttft_s

    if not ok(1e-9):
        return 0.0
    return _bisect_max(ok, hi=1.0 / max(service - c.base_s, 1e-9))


def analytic_capacity_rps(model: LatencyModel, slo: SLO, shape: WorkloadShape, role: str) -> float:
    """Requests/s one replica of ``role`` sustains, from the closed forms."""
    if role == "prefill":
        return prefill_capacity_rps(model, slo, shape.mean_isl, shape.cached_fraction)
    if role == "decode":
        dc = decode_capacity(model, slo, shape.mean_isl + shape.mean_osl / 2.0)
        return dc.tokens_per_s / shape.mean_osl
    if role == "aggregated":
        return aggregated_capacity_rps(model, slo, shape.mean_isl, shape.mean_osl, shape.cached_fraction)
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


# ---------------------------------------------------------------------------------------------------------------
# Simulated capacity


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
    from simulator.cluster import Cluster  # heavy-ish import kept off the analytic path

    trace = build_trace("poisson", workload, rate, duration_s, seed=seed)
    if role == "prefill":  # a prefill pod answers max_tokens=1
        trace = [TraceRequest(t.arrival_s, t.prompt_tokens, t.input_len, 1, t.prefix_group) for t in trace]
    pools = {"prefill": 64, "decode": 1} if role == "decode" else {"aggregated": 1}
    config = _engine_config(model, max_num_seqs, workload.max_input_len + workload.max_output_len)
    cluster = Cluster(model, config, replicas=pools)
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
    shape = WorkloadShape.of(spec)
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

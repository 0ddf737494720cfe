"""How much load one replica sustains under a latency SLO — the number the scaler divides demand by (analytic).

Two ways, cross-checked against each other (``kvscale profile capacity`` prints both):

* **analytic** (instant; this module, which needs only the latency model): closed forms from the step-time
  model —
  prefill: an M/G/1 queue of prefills (Poisson arrivals, service = the prefill step time of each prompt), whose
  waiting-time tail is approximated as ``P(W > t) = rho * exp(-t / m)`` with ``m = E[S] (1 + c_S^2) / (2 (1 - rho))``
  (the Pollaczek-Khinchine mean, exponential tail: the heavy-traffic form of the M/G/1 wait). ``c_S^2``, the squared
  coefficient of variation of the service, comes from the prompt lengths' (``isl_scv``: their variance / mean^2, read
  from vLLM's prompt-length histogram): prompts are taken as log-normal with that mean and spread, and the service
  moments integrated over them (Gauss-Hermite). With ``isl_scv = 0`` this is the M/D/1 queue at the mean prompt. A
  heavy-tailed mix waits longer than its mean prompt suggests: on the Azure code trace (prompt ``isl_scv`` 0.93,
  service ``c_S^2`` 0.82) the wait is 1.8x the M/D/1 one; decode: the largest batch whose step meets the ITL
  target at the given context (Dynamo's planner rule), capped by the KV cache; aggregated: a fixed point where one
  step carries the decode batch plus the prefill work arriving meanwhile.
* **simulate** (authoritative, slow: seconds; :mod:`predictor.capacity_sim`): bisection on the Poisson arrival
  rate, each probe a run of the virtual-clock simulator with one replica driven by the latency model.

The scaler calls the analytic functions on live signals, through :class:`CapacityView` (memoized on quantized
inputs, microseconds); this module imports nothing from the simulator, so the serving scaler does not either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvscale.latency import LatencyModel

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
    """Means of a workload that the analytic forms need (of a named workload: ``capacity_sim.workload_shape``)."""

    mean_isl: float
    mean_osl: float
    cached_fraction: float = 0.0  # of prompt tokens served from the prefix cache
    isl_scv: float = 0.0  # squared coefficient of variation of the prompt length (variance / mean^2; 0: all alike)


def _check_fraction(cached_fraction: float) -> None:
    if not 0.0 <= cached_fraction < 1.0:
        raise ValueError(f"cached_fraction must be in [0, 1), got {cached_fraction!r}")


def _prefill_service_s(model: LatencyModel, mean_isl: float, cached_fraction: float) -> tuple[float, int]:
    _check_fraction(cached_fraction)
    cached = int(mean_isl * cached_fraction)
    new = max(1, round(mean_isl) - cached)
    return model.prefill_time(new, cached), new


_HERMITE = np.polynomial.hermite_e.hermegauss(12)  # nodes and weights for E[f(Z)], Z standard normal (x sqrt(2 pi))


def prefill_service_moments(
    model: LatencyModel, mean_isl: float, cached_fraction: float = 0.0, isl_scv: float = 0.0
) -> tuple[float, float]:
    """Mean prefill service and its squared coefficient of variation, over log-normal prompts of mean ``mean_isl``
    and spread ``isl_scv`` (each with ``cached_fraction`` of its tokens cached). ``isl_scv = 0``: the mean prompt."""
    if not (math.isfinite(isl_scv) and isl_scv >= 0):
        raise ValueError(f"isl_scv must be a finite number >= 0, got {isl_scv!r}")
    if isl_scv <= 1e-6:
        return _prefill_service_s(model, mean_isl, cached_fraction)[0], 0.0
    _check_fraction(cached_fraction)
    isls, p = _prompt_nodes(mean_isl, isl_scv)
    s = _prefill_times(model, isls, cached_fraction)
    m1, m2 = float(p @ s), float(p @ (s * s))
    return m1, max(0.0, m2 / (m1 * m1) - 1.0)


def _prompt_nodes(mean_isl: float, isl_scv: float) -> tuple[np.ndarray, np.ndarray]:
    """Prompt lengths and probabilities standing for log-normal prompts of mean ``mean_isl`` and spread
    ``isl_scv`` (Gauss-Hermite nodes; one node at the mean when ``isl_scv`` is 0)."""
    if isl_scv <= 1e-6:
        return np.array([mean_isl]), np.array([1.0])
    sigma = math.sqrt(math.log1p(isl_scv))
    nodes, weights = _HERMITE
    return mean_isl * np.exp(sigma * nodes - sigma * sigma / 2.0), weights / weights.sum()


def _prefill_times(model: LatencyModel, isls: np.ndarray, cached_fraction: float) -> np.ndarray:
    out = np.empty(len(isls))
    for i, isl in enumerate(isls):
        cached = int(isl * cached_fraction)
        out[i] = model.prefill_time(max(1, round(isl) - cached), cached)
    return out


def mg1_wait_quantile(rho: float, service_s: float, q: float, service_scv: float = 0.0) -> float:
    """Approximate q-quantile of the waiting time of an M/G/1 queue of mean service ``service_s`` and squared
    coefficient of variation ``service_scv`` (see module docstring; 0: M/D/1); inf if rho >= 1."""
    if rho >= 1.0:
        return math.inf
    if rho <= 0.0 or rho <= 1.0 - q:
        return 0.0  # at least a fraction q of arrivals find the server idle
    m = service_s * (1.0 + service_scv) / (2.0 * (1.0 - rho))
    return m * math.log(rho / (1.0 - q))


def md1_wait_quantile(rho: float, service_s: float, q: float) -> float:
    """:func:`mg1_wait_quantile` with deterministic service."""
    return mg1_wait_quantile(rho, service_s, q)


def predict_prefill_ttft_s(
    model: LatencyModel, rate_rps: float, mean_isl: float, percentile: float, cached_fraction: float = 0.0,
    isl_scv: float = 0.0,
) -> float:
    """TTFT at ``percentile`` of one replica receiving ``rate_rps`` prefills (M/G/1); inf when saturated.
    The model's per-request ``request_overhead_s`` (API server, outside the engine) adds to TTFT, not to the service."""
    if rate_rps < 0:
        raise ValueError(f"rate must be >= 0, got {rate_rps!r}")
    service, scv = prefill_service_moments(model, mean_isl, cached_fraction, isl_scv)
    return model.request_overhead_s + service + mg1_wait_quantile(rate_rps * service, service, percentile / 100.0, scv)


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


def prefill_capacity_rps(
    model: LatencyModel, slo: SLO, mean_isl: float, cached_fraction: float = 0.0, isl_scv: float = 0.0
) -> float:
    """Max prefill requests/s one replica serves with TTFT at the SLO percentile ≤ ``slo.ttft_s``."""
    service, scv = prefill_service_moments(model, mean_isl, cached_fraction, isl_scv)
    if model.request_overhead_s + service >= slo.ttft_s:
        return 0.0
    q = slo.q

    def ok(r: float) -> bool:
        return model.request_overhead_s + service + mg1_wait_quantile(r * service, service, q, scv) <= slo.ttft_s

    return _bisect_max(ok, hi=1.0 / service)


def prefill_capacity_tokens_per_s(
    model: LatencyModel, slo: SLO, mean_isl: float, cached_fraction: float = 0.0, isl_scv: float = 0.0
) -> float:
    """Max *uncached* prefill tokens/s one replica serves under the TTFT SLO (demand is divided by this)."""
    _, new = _prefill_service_s(model, mean_isl, cached_fraction)
    return prefill_capacity_rps(model, slo, mean_isl, cached_fraction, isl_scv) * new


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
    model: LatencyModel, rate_rps: float, mean_isl: float, mean_osl: float, cached_fraction: float = 0.0,
    isl_scv: float = 0.0,
) -> float:
    """Mean step time of a replica serving ``rate_rps`` mixed requests (inf if it cannot keep up).

    Fixed point: a step of length T carries the decode batch B = rate·osl·T (Little's law) and the prefill work
    of the rate·T requests that arrived meanwhile, so T = base + T·rate·k, i.e. T = base / (1 - rate·k), with k
    the per-request prefill seconds plus osl x the per-sequence decode cost at the mean context.
    """
    c = model.coefficients
    service, _ = prefill_service_moments(model, mean_isl, cached_fraction, isl_scv)
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
    isl_scv: float = 0.0,
) -> float:
    """Max requests/s of one aggregated replica: mean step ≤ ITL target and prefill TTFT (M/G/1, each prefill
    stretched by the concurrent decode batch) ≤ TTFT target; batch ≤ ``max_num_seqs``."""
    c = model.coefficients
    service, scv = prefill_service_moments(model, mean_isl, cached_fraction, isl_scv)
    ctx = mean_isl + mean_osl / 2.0

    def ok(rate: float) -> bool:
        step = aggregated_mean_step_s(model, rate, mean_isl, mean_osl, cached_fraction, isl_scv)
        if step > slo.itl_s:
            return False
        batch = rate * mean_osl * step
        if batch > max_num_seqs:
            return False
        stretch = batch * (c.per_decode_seq_s + c.per_decode_ctx_s * ctx)
        s_eff = service + stretch
        scv_eff = scv * (service / s_eff) ** 2  # the decode stretch is the same for every prompt
        return model.request_overhead_s + s_eff + mg1_wait_quantile(rate * s_eff, s_eff, slo.q, scv_eff) <= slo.ttft_s

    if not ok(1e-9):
        return 0.0
    return _bisect_max(ok, hi=1.0 / max(service - c.base_s, 1e-9))


def analytic_capacity_rps(model: LatencyModel, slo: SLO, shape: WorkloadShape, role: str) -> float:
    """Requests/s one replica of ``role`` sustains, from the closed forms."""
    if role == "prefill":
        return prefill_capacity_rps(model, slo, shape.mean_isl, shape.cached_fraction, shape.isl_scv)
    if role == "decode":
        dc = decode_capacity(model, slo, shape.mean_isl + shape.mean_osl / 2.0)
        return dc.tokens_per_s / shape.mean_osl
    if role == "aggregated":
        return aggregated_capacity_rps(model, slo, shape.mean_isl, shape.mean_osl, shape.cached_fraction,
                                       isl_scv=shape.isl_scv)  # fmt: skip
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def _q(x: float, step: float = 0.02) -> float:
    """Quantize a positive size to ~2% log buckets so capacity lookups hit the cache."""
    if x <= 0:
        return 0.0
    return round(math.exp(round(math.log(x) / step) * step), 6)


class CapacityView:
    """Per-replica capacity in the pool's demand unit, memoized on quantized inputs (analytic, microseconds)."""

    def __init__(self, model: LatencyModel, slo: SLO, max_num_seqs: int, max_entries: int = 4096) -> None:
        self.model, self.slo, self.max_num_seqs = model, slo, max_num_seqs
        self._cache: dict[tuple, float] = {}
        self._max = max_entries

    def per_replica(self, pool: str, isl: float, osl: float, cached: float, isl_scv: float = 0.0) -> float:
        """``isl_scv``: the prompts' spread (variance / mean^2), quantized to 0.1 and capped at 8."""
        key = (pool, _q(isl), _q(osl), round(min(max(cached, 0.0), 0.98), 2), round(min(max(isl_scv, 0.0), 8.0), 1))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        _, qi, qo, qc, qs = key
        if pool == "prefill":
            v = prefill_capacity_tokens_per_s(self.model, self.slo, qi, qc, qs)
        elif pool == "decode":
            v = decode_capacity(self.model, self.slo, qi + qo / 2.0, self.max_num_seqs).tokens_per_s
        else:
            v = aggregated_capacity_rps(self.model, self.slo, qi, qo, qc, self.max_num_seqs, qs)
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[key] = v
        return v

    def decode_batch(self, isl: float, osl: float) -> int:
        return decode_capacity(self.model, self.slo, _q(isl) + _q(osl) / 2.0, self.max_num_seqs).batch

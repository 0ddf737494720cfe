"""How much load one replica sustains under a latency SLO — the number the scaler divides demand by (analytic).

Two ways, cross-checked against each other (``kvscale profile capacity`` prints both):

* **analytic** (instant; this module, which needs only the latency model): closed forms from the step-time
  model —
  prefill: an M/D/1 queue of prefills (Poisson arrivals, deterministic service = the prefill step time), whose
  waiting-time tail is approximated as ``P(W > t) = rho * exp(-t / m)`` with ``m = S / (2 (1 - rho))`` (exact mean,
  exponential tail: the heavy-traffic form of the M/G/1 wait); decode: the largest batch whose step meets the ITL
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

    def per_replica(self, pool: str, isl: float, osl: float, cached: float) -> float:
        key = (pool, _q(isl), _q(osl), round(min(max(cached, 0.0), 0.98), 2))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        _, qi, qo, qc = key
        if pool == "prefill":
            v = prefill_capacity_tokens_per_s(self.model, self.slo, qi, qc)
        elif pool == "decode":
            v = decode_capacity(self.model, self.slo, qi + qo / 2.0, self.max_num_seqs).tokens_per_s
        else:
            v = aggregated_capacity_rps(self.model, self.slo, qi, qo, qc, self.max_num_seqs)
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[key] = v
        return v

    def decode_batch(self, isl: float, osl: float) -> int:
        return decode_capacity(self.model, self.slo, _q(isl) + _q(osl) / 2.0, self.max_num_seqs).batch

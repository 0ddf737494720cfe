"""Deterministic synthetic workloads: arrival processes, ISL/OSL distributions and request traces.

Everything is driven by a seeded ``numpy.random.Generator`` and vectorized, so a one-hour trace at 50 req/s
(180k requests) builds in well under a second. ``build_trace`` ties the pieces together by name::

    trace = build_trace("diurnal", "chat", rate=20, duration_s=3600, seed=1, amplitude=0.8)

Arrival processes (each returns a sorted ``float64`` array of arrival times in ``[0, duration_s)``):

* ``poisson``: homogeneous Poisson;
* ``diurnal``: non-homogeneous Poisson (thinning) with a sinusoidal rate, trough at ``t = 0``;
* ``step``: a rate step of ``factor`` x between ``at_s`` and ``until_s``;
* ``bursty``: a two-state Markov-modulated Poisson process (bursts and gaps, exponential sojourns).

Workloads (``WORKLOADS``) draw input/output lengths from clipped lognormals given by their median. Only the
``shared-prefix`` workload materializes prompt token ids (a per-tenant system prompt shared exactly by all of
the tenant's requests, plus a unique query) because prefix caching and KV-aware routing need them; its token
lists take about ``8 * input_len`` bytes per request (the id objects themselves are shared).

Traces are saved and loaded as JSON lines, one request per line (``save_trace`` / ``load_trace``, from
:mod:`kvscale.traces`, which also imports production traces).
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvscale.traces.format import TraceFormatError, TraceRequest, load_trace, save_trace
from kvscale.traces.prompts import TOKEN_ID_HIGH, TOKEN_ID_LOW, expand_tokens

__all__ = [  # the trace format lives in the core; re-exported for the generators' callers
    "ARRIVALS", "TOKEN_ID_HIGH", "TOKEN_ID_LOW", "WORKLOADS", "TraceFormatError", "TraceRequest", "WorkloadSpec",
    "build_trace", "completion_body", "load_trace", "save_trace", "thinned", "trace_at",
]  # fmt: skip

# One Python int object per token id, so token lists share them instead of allocating 28 bytes per token.
_TOKEN_OBJECTS = np.arange(TOKEN_ID_HIGH, dtype=object)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many acyclic lists (it would rescan them again and again)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------------
# Argument checks


def _positive(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _non_negative(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Arrival processes


def _piecewise_poisson(
    starts: np.ndarray, ends: np.ndarray, rates: np.ndarray, duration_s: float, rng: np.random.Generator
) -> np.ndarray:
    """Poisson arrivals with a piecewise-constant rate: ``rates[i]`` on ``[starts[i], ends[i])``."""
    lengths = ends - starts
    counts = rng.poisson(rates * lengths)
    times = np.repeat(starts, counts) + rng.random(int(counts.sum())) * np.repeat(lengths, counts)
    times.sort()
    # Guard against float rounding putting a time exactly on the (open) end of the horizon.
    return np.minimum(times, np.nextafter(duration_s, 0.0))


def poisson(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Homogeneous Poisson arrivals at ``rate`` req/s over ``[0, duration_s)``."""
    rate = _positive("rate", rate)
    duration_s = _positive("duration_s", duration_s)
    return _piecewise_poisson(np.array([0.0]), np.array([duration_s]), np.array([rate]), duration_s, rng)


def diurnal(
    mean_rate: float,
    duration_s: float,
    rng: np.random.Generator,
    period_s: float | None = None,
    amplitude: float = 0.6,
) -> np.ndarray:
    """Non-homogeneous Poisson arrivals with rate ``mean_rate * (1 - amplitude * cos(2 pi t / period_s))``.

    The trough (``mean_rate * (1 - amplitude)``) is at ``t = 0`` and the peak at ``period_s / 2``;
    ``period_s`` defaults to ``duration_s`` (one "day" per trace). Sampled by thinning a Poisson process at
    the peak rate. ``mean_rate`` is the average over whole periods.
    """
    mean_rate = _positive("mean_rate", mean_rate)
    duration_s = _positive("duration_s", duration_s)
    period_s = duration_s if period_s is None else _positive("period_s", period_s)
    amplitude = _non_negative("amplitude", amplitude)
    if amplitude > 1:
        raise ValueError(f"amplitude must be in [0, 1] (the rate cannot go negative), got {amplitude!r}")
    peak = mean_rate * (1 + amplitude)

    def fraction(t: np.ndarray) -> np.ndarray:
        return (1 - amplitude * np.cos(2 * np.pi * t / period_s)) / (1 + amplitude)

    return thinned(peak, duration_s, rng, fraction)


def thinned(
    peak_rate: float, duration_s: float, rng: np.random.Generator, fraction: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Non-homogeneous Poisson arrivals at rate ``peak_rate * fraction(t)`` (``fraction`` in [0, 1], vectorized),
    sampled by thinning a Poisson process at ``peak_rate`` (Lewis & Shedler). Any rate profile over time, e.g. the
    demo's warm / ramp / burst / idle phases."""
    candidates = poisson(peak_rate, duration_s, rng)
    return candidates[rng.random(candidates.size) < fraction(candidates)]


def step(
    base_rate: float,
    duration_s: float,
    rng: np.random.Generator,
    factor: float = 5.0,
    at_s: float | None = None,
    until_s: float | None = None,
) -> np.ndarray:
    """Poisson arrivals at ``base_rate``, and ``factor * base_rate`` on ``[at_s, until_s)``.

    ``at_s`` defaults to ``duration_s / 3`` and ``until_s`` to ``2 * duration_s / 3``; ``until_s`` beyond the
    horizon means the step lasts to the end.
    """
    base_rate = _positive("base_rate", base_rate)
    duration_s = _positive("duration_s", duration_s)
    factor = _positive("factor", factor)
    at_s = duration_s / 3 if at_s is None else _non_negative("at_s", at_s)
    until_s = 2 * duration_s / 3 if until_s is None else _positive("until_s", until_s)
    if at_s >= duration_s:
        raise ValueError(f"at_s must be < duration_s ({duration_s}), got {at_s!r}")
    if until_s <= at_s:
        raise ValueError(f"until_s must be > at_s ({at_s}), got {until_s!r}")
    until_s = min(until_s, duration_s)
    bounds = np.array([0.0, at_s, until_s, duration_s])
    rates = np.array([base_rate, base_rate * factor, base_rate])
    return _piecewise_poisson(bounds[:-1], bounds[1:], rates, duration_s, rng)


def bursty(
    mean_rate: float,
    duration_s: float,
    rng: np.random.Generator,
    burst_factor: float = 4.0,
    mean_burst_s: float = 30.0,
    mean_gap_s: float = 120.0,
) -> np.ndarray:
    """Markov-modulated Poisson arrivals: bursts alternate with gaps, both of exponential length.

    The rate inside a burst is ``burst_factor`` times the rate in a gap; the two rates are chosen so that the
    long-run mean is ``mean_rate``. The process starts in its stationary state (in a burst with probability
    ``mean_burst_s / (mean_burst_s + mean_gap_s)``).
    """
    mean_rate = _positive("mean_rate", mean_rate)
    duration_s = _positive("duration_s", duration_s)
    burst_factor = _positive("burst_factor", burst_factor)
    if burst_factor < 1:
        raise ValueError(f"burst_factor must be >= 1 (rate in bursts / rate in gaps), got {burst_factor!r}")
    mean_burst_s = _positive("mean_burst_s", mean_burst_s)
    mean_gap_s = _positive("mean_gap_s", mean_gap_s)

    p_burst = mean_burst_s / (mean_burst_s + mean_gap_s)
    gap_rate = mean_rate / (1 + p_burst * (burst_factor - 1))
    starts_in_burst = bool(rng.random() < p_burst)
    n_pairs = int(duration_s / (mean_burst_s + mean_gap_s)) + 8
    while True:
        bursts = rng.exponential(mean_burst_s, n_pairs)
        gaps = rng.exponential(mean_gap_s, n_pairs)
        sojourns = np.empty(2 * n_pairs)
        sojourns[0::2], sojourns[1::2] = (bursts, gaps) if starts_in_burst else (gaps, bursts)
        ends = np.cumsum(sojourns)
        if ends[-1] >= duration_s:
            break
        n_pairs *= 2
    last = int(np.searchsorted(ends, duration_s))  # first segment reaching the horizon
    ends = np.minimum(ends[: last + 1], duration_s)
    starts = np.concatenate(([0.0], ends[:-1]))
    in_burst = (np.arange(last + 1) % 2 == 0) == starts_in_burst
    rates = np.where(in_burst, gap_rate * burst_factor, gap_rate)
    return _piecewise_poisson(starts, ends, rates, duration_s, rng)


ArrivalFn = Callable[..., np.ndarray]
ARRIVALS: dict[str, ArrivalFn] = {"poisson": poisson, "diurnal": diurnal, "step": step, "bursty": bursty}


# --------------------------------------------------------------------------------------------------
# Length distributions and workloads


def _lognormal_lengths(
    n: int, median: float, sigma: float, low: int, high: int, rng: np.random.Generator
) -> np.ndarray:
    x = np.rint(median * np.exp(sigma * rng.standard_normal(n)))
    return np.clip(x, low, high).astype(np.int64)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Input/output length distributions (lognormal, by median and log-space sigma), clipped to limits.

    With ``num_tenants > 0`` the workload is multi-tenant with shared prefixes: every input is a tenant's
    ``prefix_len``-token system prompt followed by a unique query whose length follows
    ``input_median``/``input_sigma``; tenants are picked with Zipf-like weights ``1 / (k + 1) ** tenant_skew``
    (0 = uniform).
    """

    name: str
    input_median: float
    input_sigma: float
    output_median: float
    output_sigma: float
    max_input_len: int = 8192
    max_output_len: int = 4096
    num_tenants: int = 0
    prefix_len: int = 0
    tenant_skew: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        for f in ("input_median", "output_median"):
            _positive(f, getattr(self, f))
        for f in ("input_sigma", "output_sigma", "tenant_skew"):
            _non_negative(f, getattr(self, f))
        _positive_int("max_input_len", self.max_input_len)
        _positive_int("max_output_len", self.max_output_len)
        if self.num_tenants:
            _positive_int("num_tenants", self.num_tenants)
            _positive_int("prefix_len", self.prefix_len)
            if self.prefix_len >= self.max_input_len:
                raise ValueError(
                    f"prefix_len must be < max_input_len ({self.max_input_len}) to leave room for the query, "
                    f"got {self.prefix_len!r}"
                )
        elif self.prefix_len:
            raise ValueError(f"prefix_len needs num_tenants > 0, got num_tenants={self.num_tenants!r}")

    @property
    def shared_prefix(self) -> bool:
        return self.num_tenants > 0

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (input_len, output_len) pairs as two ``int64`` arrays, inputs include any shared prefix."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        p = self.prefix_len
        inputs = p + _lognormal_lengths(
            n, self.input_median, self.input_sigma, 1, self.max_input_len - p, rng
        )
        outputs = _lognormal_lengths(n, self.output_median, self.output_sigma, 1, self.max_output_len, rng)
        return inputs, outputs

    def tenant_prefixes(self, rng: np.random.Generator) -> list[list[int]]:
        """One ``prefix_len``-token system prompt per tenant."""
        self._need_shared_prefix()
        ids = rng.integers(TOKEN_ID_LOW, TOKEN_ID_HIGH, (self.num_tenants, self.prefix_len))
        return [_TOKEN_OBJECTS[row].tolist() for row in ids]

    def prompts(self, input_lens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[list[int]]]:
        """Tenant ids and prompt token ids for requests of the given input lengths (from ``sample``).

        Each prompt is its tenant's prefix (identical for all the tenant's requests) plus
        ``input_len - prefix_len`` fresh random tokens.
        """
        self._need_shared_prefix()
        input_lens = np.asarray(input_lens, dtype=np.int64)
        if input_lens.size and int(input_lens.min()) <= self.prefix_len:
            raise ValueError(f"input_lens must all be > prefix_len ({self.prefix_len})")
        prefixes = self.tenant_prefixes(rng)
        weights = 1.0 / np.arange(1, self.num_tenants + 1) ** self.tenant_skew
        tenants = rng.choice(self.num_tenants, size=input_lens.size, p=weights / weights.sum())
        suffix_lens = input_lens - self.prefix_len
        suffix_tokens = _TOKEN_OBJECTS[
            rng.integers(TOKEN_ID_LOW, TOKEN_ID_HIGH, int(suffix_lens.sum()))
        ].tolist()
        offsets = np.concatenate(([0], np.cumsum(suffix_lens))).tolist()
        with _gc_paused():
            prompts = [
                prefixes[t] + suffix_tokens[a:b]
                for t, a, b in zip(tenants.tolist(), offsets[:-1], offsets[1:], strict=True)
            ]
        return tenants, prompts

    def _need_shared_prefix(self) -> None:
        if not self.shared_prefix:
            raise ValueError(f"workload {self.name!r} has no shared prefixes (num_tenants is 0)")


WORKLOADS: dict[str, WorkloadSpec] = {
    w.name: w
    for w in (
        WorkloadSpec("chat", 600, 0.9, 250, 0.8, description="conversational: medium prompts and answers"),
        WorkloadSpec(
            "rag", 4000, 0.5, 200, 0.6, description="retrieval-augmented: long context, short answer"
        ),
        WorkloadSpec("reasoning", 500, 0.8, 2000, 0.6, description="short question, long chain of thought"),
        WorkloadSpec(
            "shared-prefix",
            100,
            0.5,
            150,
            0.5,
            num_tenants=8,
            prefix_len=2000,
            description="multi-tenant: a 2000-token system prompt per tenant plus a ~100-token user query",
        ),
    )
}


def random_token_ids(n: int, rng: np.random.Generator) -> list[int]:
    """``n`` synthetic token ids in ``[TOKEN_ID_LOW, TOKEN_ID_HIGH)`` (e.g. to give a load test a prompt)."""
    return _TOKEN_OBJECTS[rng.integers(TOKEN_ID_LOW, TOKEN_ID_HIGH, n)].tolist()


def completion_body(
    req: TraceRequest,
    model: str,
    index: int,
    *,
    token_range: tuple[int, int] = (TOKEN_ID_LOW, TOKEN_ID_HIGH),
    seed: int = 0,
) -> dict[str, Any]:
    """An OpenAI ``/v1/completions`` body for ``req``, for drivers that send a trace over HTTP (the demo, load
    generators): the prompt as token ids (vLLM, SGLang and the simulator accept them, and lengths are exact), so a
    shared prefix stays shared; synthetic ids, unique per ``index``, for requests without ids; ``max_tokens`` the
    output length with ``ignore_eos`` (vLLM/SGLang) so that it is exact. Prefix-block prompts are expanded
    (:func:`kvscale.traces.prompts.expand_tokens`, the tail unique per ``index``). ``token_range`` maps the ids into the
    served model's vocabulary (the same id always maps to the same id)."""
    ids = req.prompt_tokens
    if ids is None and req.prefix_blocks is not None and req.prefix_block_tokens is not None:
        ids = expand_tokens(req.prefix_blocks, req.prefix_block_tokens, req.input_len, index).tolist()
    elif ids is None:
        ids = random_token_ids(req.input_len, np.random.default_rng([seed, index]))
    lo, hi = token_range
    if (lo, hi) != (TOKEN_ID_LOW, TOKEN_ID_HIGH):
        if not 0 <= lo < hi:
            raise ValueError(f"token_range must be (lo, hi) with 0 <= lo < hi, got {token_range!r}")
        ids = [lo + (t - TOKEN_ID_LOW) % (hi - lo) for t in ids]
    return {"model": model, "prompt": list(ids), "max_tokens": req.output_len, "ignore_eos": True,
            "temperature": 0.0}  # fmt: skip


def _valid(kind: str, name: str, options: Iterable[str]) -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(options))}")


def build_trace(
    arrivals: str,
    workload: str | WorkloadSpec,
    rate: float,
    duration_s: float,
    seed: int = 0,
    **kw: Any,
) -> list[TraceRequest]:
    """A trace of ``workload`` requests arriving by the ``arrivals`` process at mean ``rate`` req/s.

    ``kw`` holds the arrival process's options (e.g. ``amplitude``, ``factor``, ``burst_factor``) and
    overrides of the workload spec's fields (e.g. ``max_input_len``, ``num_tenants``, ``prefix_len``).
    Arrival times, lengths and token ids use independent streams derived from ``seed``, so e.g. changing the
    workload keeps the arrival times.
    """
    if arrivals not in ARRIVALS:
        raise _valid("arrivals", arrivals, ARRIVALS)
    if isinstance(workload, str):
        if workload not in WORKLOADS:
            raise _valid("workload", workload, WORKLOADS)
        spec = WORKLOADS[workload]
    else:
        spec = workload
    arrival_fn = ARRIVALS[arrivals]
    arrival_opts = list(inspect.signature(arrival_fn).parameters)[3:]
    spec_opts = [f.name for f in dataclasses.fields(WorkloadSpec) if f.name not in ("name", "description")]
    unknown = sorted(set(kw) - set(arrival_opts) - set(spec_opts))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for arrivals {arrivals!r} and workload {spec.name!r}; "
            f"valid: {sorted(arrival_opts + spec_opts)}"
        )
    spec = dataclasses.replace(spec, **{k: v for k, v in kw.items() if k in spec_opts})
    arrival_rng = _streams(seed)[0]
    times = arrival_fn(rate, duration_s, arrival_rng, **{k: v for k, v in kw.items() if k in arrival_opts})
    return trace_at(times, spec, seed)


def _streams(seed: int) -> list[np.random.Generator]:
    """The independent random streams of a trace: arrival times, lengths, token ids."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]


def trace_at(times: np.ndarray, spec: WorkloadSpec, seed: int = 0) -> list[TraceRequest]:
    """Requests of ``spec`` arriving at ``times`` (sorted seconds, e.g. from an arrival process or :func:`thinned`),
    with the lengths and token ids that :func:`build_trace` would draw for the same seed."""
    _, length_rng, token_rng = _streams(seed)
    times = np.asarray(times, dtype=np.float64)
    inputs, outputs = spec.sample(times.size, length_rng)
    columns = [times.tolist(), inputs.tolist(), outputs.tolist()]
    if not spec.shared_prefix:
        return [TraceRequest(t, None, i, o) for t, i, o in zip(*columns, strict=True)]
    tenants, prompts = spec.prompts(inputs, token_rng)
    with _gc_paused():
        return [
            TraceRequest(t, p, i, o, g)
            for t, i, o, p, g in zip(*columns, prompts, tenants.tolist(), strict=True)
        ]


"""Scorer ``slo``: predictive routing — predicted TTFT and ITL per backend from a latency model, against the
request's SLOs; and the ``slo`` policy.

For each candidate the scorer predicts, with the step-time model of :mod:`kvscale.latency` (the artifact the
profiler fits; ``latency_model`` = a JSON file or a built-in name):

* **TTFT** = the prefill work queued ahead of the request on that backend (uncached prompt tokens the router sent
  there whose first token has not come back) + the request's own uncached part (prompt minus the backend's cached
  prefix, from the KV-event index when ``kv_events`` is set), processed in chunks of ``max_num_batched_tokens``,
  each step also paying for the backend's running decodes: ``steps x (base + decode cost) + per-token + attention``;
* **ITL** = one decode step with the batch after admission (running decodes + 1, their context + this prompt).

Mixed hardware (variant groups): a backend whose label ``model_label`` (default ``kvscale.io/latency-model``)
names a latency model — a built-in name, a JSON file, or a key of ``variant_models`` — is predicted with that
model, so a slower variant is predicted slower and gets less of the traffic; other backends use ``latency_model``.
A label naming a model that does not load is logged once and that backend uses ``latency_model``.

SLOs come from the headers ``x-kvscale-ttft-slo-ms`` / ``x-kvscale-itl-slo-ms`` (defaults from the config). A
backend meeting both scores ``0.5 + 0.5 x best_ttft / its_ttft``; one missing either scores only the second
term, so the fastest backend that meets the SLO wins, and when none does, the fastest one.

Predicted vs observed: when an attempt ends with a first token, the router-observed TTFT is compared with the
prediction for that backend; a per-backend EWMA of observed/predicted corrects later predictions (``adapt``,
as Dynamo's planner corrects its interpolator). Records go to ``Services.extras["slo.records"]`` (bounded), to the
``kvscale_router_slo_ttft_relative_error`` histogram when the app shares its registry, and to ``record_path`` (JSON
lines) when set — the benchmark reads that file.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Histogram

from kvscale.latency import DEFAULT_MODEL, LatencyModel, LatencyModelError, load_latency_model, prefill_attn_term
from router.kvevents.tokens import context_token_ids, shared_tokenizer
from router.policies.base import Outcome, Scorer, parse_config
from router.policies.kv_events import KVEventsScorer
from router.policies.variants import MODEL_LABEL, VariantModels

TTFT_HEADER = "x-kvscale-ttft-slo-ms"
ITL_HEADER = "x-kvscale-itl-slo-ms"
_STALE_S = 120.0  # a scored request never routed (no candidate left) is forgotten after this long


@dataclass
class _Load:
    """What the router sent to one backend and has not seen finish (requests routed by an ``slo`` policy)."""

    pending_prefill: int = 0  # uncached prompt tokens whose first token has not come back
    decoding: int = 0  # requests past their first token
    context: int = 0  # prompt tokens of all of the above (decode attention reads them)


@dataclass
class _Acct:
    url: str
    uncached: int
    prompt: int
    started: bool = False


@dataclass
class SloShared:
    """Per-app state shared by every ``slo`` scorer instance (in ``Services.extras["slo"]``)."""

    loads: dict[str, _Load] = field(default_factory=dict)
    unsettled: deque[tuple[float, Any]] = field(default_factory=deque)  # (scored at, ctx) not yet routed
    correction: dict[str, float] = field(default_factory=dict)  # observed / predicted TTFT, EWMA per backend
    records: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=10_000))
    error_hist: Histogram | None = None


def _header_ms(headers: Any, name: str, default: float | None) -> float | None:
    raw = headers.get(name) if headers is not None else None
    if raw is None:
        return default
    try:
        v = float(raw)
    except ValueError:
        return default
    return v if math.isfinite(v) and v > 0 else default


class SloScorer(Scorer):
    name = "slo"

    @dataclass(frozen=True)
    class Config:
        latency_model: str = DEFAULT_MODEL  # JSON artifact or built-in name
        ttft_slo_ms: float | None = None  # default when the request has no x-kvscale-ttft-slo-ms
        itl_slo_ms: float | None = None
        max_num_batched_tokens: int = 8192  # the engines' per-step token budget (vLLM's flag)
        kv_events: dict[str, Any] | None = None  # config of the kv-events scorer to read cached prefixes from
        adapt: bool = True
        adapt_alpha: float = 0.1
        record_path: str | None = None  # append {request_id, backend, predicted, observed} JSON lines here
        model_label: str = MODEL_LABEL  # backend label naming its variant's latency model
        variant_models: dict[str, str] = field(default_factory=dict)  # label value -> latency model spec

        def validate(self) -> None:
            if self.max_num_batched_tokens < 1:
                raise ValueError("max_num_batched_tokens must be >= 1")
            if not 0 < self.adapt_alpha <= 1:
                raise ValueError("adapt_alpha must be in (0, 1]")
            for name, spec in self.variant_models.items():  # a bad mapping is a config error, at start
                try:
                    load_latency_model(spec)
                except LatencyModelError as e:
                    raise ValueError(f"variant_models.{name}: {e}") from None

    def __init__(self, config: Config, services: Any) -> None:
        super().__init__(config, services)
        self.latency: LatencyModel = load_latency_model(config.latency_model)
        self.variants = VariantModels(config.model_label, config.variant_models)
        extras = services.extras
        shared = extras.get("slo")
        if shared is None:
            shared = extras["slo"] = SloShared()
            registry = extras.get("registry")
            if registry is not None:
                shared.error_hist = Histogram(
                    "kvscale_router_slo_ttft_relative_error", "|observed - predicted| / observed TTFT (slo scorer)",
                    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0), registry=registry,
                )  # fmt: skip
            extras["slo.records"] = shared.records
        self.shared: SloShared = shared
        self.kv: KVEventsScorer | None = None
        if config.kv_events is not None:
            kv_cfg = parse_config(KVEventsScorer.Config, config.kv_events, "slo.kv_events")
            self.kv = KVEventsScorer(kv_cfg, services)
            self.tokenizer = self.kv.tokenizer
        else:
            self.tokenizer = shared_tokenizer(extras, None)
        self._record_file = open(config.record_path, "a", buffering=1) if config.record_path else None  # noqa: SIM115

    # -- accounting ----------------------------------------------------------------------------------------------
    def _settle(self) -> None:
        """Requests scored earlier now know their backend (``ctx.tried[-1]``): count their work there."""
        sh = self.shared
        now = self.services.clock()
        keep: deque[tuple[float, Any]] = deque()
        while sh.unsettled:
            at, ctx = sh.unsettled.popleft()
            pred = ctx.state.get("slo")
            if ctx.tried and pred is not None and "_slo_acct" not in ctx.state:
                url = ctx.tried[-1]
                p = pred["per_backend"].get(url)
                if p is not None:
                    acct = _Acct(url, p["uncached"], pred["prompt_tokens"])
                    ctx.state["_slo_acct"] = acct
                    load = sh.loads.setdefault(url, _Load())
                    load.pending_prefill += acct.uncached
                    load.context += acct.prompt
            elif not ctx.tried and now - at < _STALE_S:
                keep.append((at, ctx))
        sh.unsettled = keep

    def on_pool_change(self) -> None:
        if self.kv is not None:
            self.kv.on_pool_change()

    def on_response_start(self, ctx, backend) -> None:
        self._settle()
        acct = ctx.state.get("_slo_acct")
        if acct is None or acct.started:
            return
        load = self.shared.loads.setdefault(acct.url, _Load())
        load.pending_prefill = max(0, load.pending_prefill - acct.uncached)
        load.decoding += 1
        acct.started = True

    def on_finish(self, ctx, backend, outcome: Outcome) -> None:
        self._settle()
        acct = ctx.state.pop("_slo_acct", None)
        if acct is not None:
            load = self.shared.loads.setdefault(acct.url, _Load())
            if acct.started:
                load.decoding = max(0, load.decoding - 1)
            else:
                load.pending_prefill = max(0, load.pending_prefill - acct.uncached)
            load.context = max(0, load.context - acct.prompt)
        pred = ctx.state.get("slo")
        if pred is None or outcome.status != 200 or not outcome.ttft_s:
            return
        p = pred["per_backend"].get(backend.url)
        if p is None:
            return
        predicted, observed = p["ttft_s"], outcome.ttft_s
        raw = p["raw_ttft_s"]
        sh = self.shared
        if self.config.adapt and raw > 0:
            a = self.config.adapt_alpha
            ratio = min(4.0, max(0.25, observed / raw))
            sh.correction[backend.url] = (1 - a) * sh.correction.get(backend.url, 1.0) + a * ratio
        rec = {"request_id": ctx.request_id, "backend": backend.url, "predicted_ttft_s": predicted,
               "observed_ttft_s": observed, "predicted_itl_s": p["itl_s"], "meets_slo": p["meets"],
               "ts": time.time()}  # fmt: skip
        sh.records.append(rec)
        if sh.error_hist is not None:
            sh.error_hist.observe(abs(observed - predicted) / observed)
        if self._record_file is not None:
            self._record_file.write(json.dumps(rec) + "\n")

    # -- prediction ------------------------------------------------------------------------------------------------
    def model_for(self, backend: Any) -> LatencyModel:
        """The latency model of ``backend``'s variant (its ``model_label`` label), else ``latency_model``."""
        return self.variants.model(backend, self.latency) or self.latency

    def predict(self, prompt_tokens: int, cached: int, load: _Load, correction: float = 1.0,
                model: LatencyModel | None = None) -> tuple[float, float]:  # fmt: skip
        """(raw TTFT, ITL) in seconds for a request on a backend carrying ``load`` (see the module docstring), with
        ``model`` (default the configured ``latency_model``)."""
        latency = model or self.latency
        c = latency.coefficients
        own = max(prompt_tokens - cached, 1)  # the last prompt token is always computed
        ahead = load.pending_prefill
        total = own + ahead
        steps = max(1, math.ceil(total / self.config.max_num_batched_tokens))
        per_step = c.base_s + c.per_decode_seq_s * load.decoding + c.per_decode_ctx_s * load.context
        ttft = (steps * per_step + c.per_prefill_token_s * total
                + c.per_prefill_attn_s * (prefill_attn_term(own, cached) + prefill_attn_term(ahead, 0)))  # fmt: skip
        itl = latency.decode_step_time(load.decoding + 1, load.context + prompt_tokens)
        return ttft * correction, itl

    def score(self, ctx, backends):
        self._settle()
        if self.kv is not None:
            self.kv._sync()
            self.kv.settle()
            tokens, hit = self.kv.cached_tokens(ctx, backends)
            self.kv._unsettled.append(ctx)
        else:
            tokens, hit = context_token_ids(ctx, self.tokenizer), {}
        n = len(tokens) if tokens else max(1, len(ctx.prompt) // 4)
        ttft_slo = _header_ms(ctx.headers, TTFT_HEADER, self.config.ttft_slo_ms)
        itl_slo = _header_ms(ctx.headers, ITL_HEADER, self.config.itl_slo_ms)
        sh = self.shared
        per: dict[str, dict[str, Any]] = {}
        for b in backends:
            cached = hit.get(b.url, 0)
            corr = sh.correction.get(b.url, 1.0)
            raw, itl = self.predict(n, cached, sh.loads.get(b.url) or _Load(), 1.0, self.model_for(b))
            ttft = raw * corr
            meets = (ttft_slo is None or ttft * 1000 <= ttft_slo) and (itl_slo is None or itl * 1000 <= itl_slo)
            per[b.url] = {"ttft_s": ttft, "raw_ttft_s": raw, "itl_s": itl, "meets": meets,
                          "uncached": max(n - cached, 0)}  # fmt: skip
        ctx.state["slo"] = {"per_backend": per, "prompt_tokens": n}
        sh.unsettled.append((self.services.clock(), ctx))
        best = min((p["ttft_s"] for p in per.values()), default=0.0)
        out = {}
        for b in backends:
            p = per[b.url]
            speed = best / p["ttft_s"] if p["ttft_s"] > 0 else 1.0
            out[b] = (0.5 if p["meets"] else 0.0) + 0.5 * speed
        return out


PLUGINS = (SloScorer,)
POLICIES = {
    "slo": {"scorers": [{"type": "slo", "weight": 1.0, "config": {"kv_events": {}}}]},
}

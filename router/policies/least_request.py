"""Scorer ``least-request``: fewer router-counted in-flight requests score higher (exact and instant).

Score = 1 - in_flight / max(in_flight over the candidates); all idle → all 1.

Mixed hardware: when candidates carry a ``kvscale.io/latency-model`` label (``model_label``), each is weighted by
its variant's speed, as Envoy's weighted least-request balancer does (envoyproxy/envoy v1.35.0,
``source/extensions/load_balancing_policies/least_request/least_request_lb.cc``, ``hostWeight``: effective weight
``weight / (active_requests + 1) ^ active_request_bias``, bias 1.0 by default): here ``weight`` = 1 / the variant
model's decode step at ``reference_batch`` sequences of ``reference_context`` tokens (a backend without the label
gets the mean weight), and score = effective weight / the largest one. So a replica twice as fast holds about twice
the requests. Unlabelled pools keep the plain form above.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.policies.base import Scorer
from router.policies.variants import MODEL_LABEL, VariantModels


class LeastRequestScorer(Scorer):
    name = "least-request"

    @dataclass(frozen=True)
    class Config:
        model_label: str = MODEL_LABEL
        reference_batch: int = 32
        reference_context: int = 1024

        def validate(self) -> None:
            if self.reference_batch < 1 or self.reference_context < 1:
                raise ValueError("reference_batch and reference_context must be >= 1")

    def __init__(self, config: Config, services) -> None:
        super().__init__(config, services)
        self.variants = VariantModels(config.model_label)  # each model loaded once

    def _weight(self, b) -> float | None:
        """1 / the decode step of ``b``'s variant model at the reference batch; None: no labelled model."""
        m = self.variants.model(b)
        c = self.config
        return 1.0 / m.decode_step_time(c.reference_batch, c.reference_batch * c.reference_context) if m else None

    def score(self, ctx, backends):
        weights = [self._weight(b) for b in backends] if any(b.labels for b in backends) else []
        if any(w is not None for w in weights):
            known = [w for w in weights if w is not None]
            mean = sum(known) / len(known)
            eff = [(w if w is not None else mean) / (b.in_flight + 1) for w, b in zip(weights, backends, strict=True)]
            top = max(eff)
            return {b: e / top for b, e in zip(backends, eff, strict=True)}
        peak = max(b.in_flight for b in backends)
        if peak <= 0:
            return dict.fromkeys(backends, 1.0)
        return {b: 1.0 - b.in_flight / peak for b in backends}


PLUGINS = (LeastRequestScorer,)
POLICIES = {"least-request": {"scorers": [{"type": "least-request"}]}}

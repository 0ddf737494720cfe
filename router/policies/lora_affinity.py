"""Scorer ``lora-affinity``: prefer backends that already have the request's LoRA adapter loaded.

From each backend's ``vllm:lora_requests_info`` (``EngineStats.running_loras`` / ``waiting_loras`` /
``max_loras``): adapter running or waiting there → 1; not loaded but a free adapter slot → ``free_slot_score``
(loading it evicts nothing); no free slot → 0 (it would swap another adapter out). Requests for a base model
(no backend reports adapters, or the model is one of the engine's base model names) score 0 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.policies.base import Scorer


class LoraAffinityScorer(Scorer):
    name = "lora-affinity"

    @dataclass(frozen=True)
    class Config:
        free_slot_score: float = 0.5

        def validate(self) -> None:
            if not 0.0 <= self.free_slot_score <= 1.0:
                raise ValueError("free_slot_score must be in [0, 1]")

    def score(self, ctx, backends):
        model = ctx.model
        out = {}
        for b in backends:
            s = b.stats
            if s is None or model in s.models:
                out[b] = 0.0
            elif model in s.running_loras or model in s.waiting_loras:
                out[b] = 1.0
            elif s.max_loras is not None and len(s.running_loras | s.waiting_loras) < s.max_loras:
                out[b] = self.config.free_slot_score
            else:
                out[b] = 0.0
        return out


PLUGINS = (LoraAffinityScorer,)
POLICIES = {
    "lora-affinity": {
        "scorers": [{"type": "lora-affinity", "weight": 2.0}, {"type": "least-request", "weight": 1.0}],
    }
}

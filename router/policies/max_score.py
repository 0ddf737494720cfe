"""Picker ``max-score``: the highest total score; ties broken at random (so equal backends share load)."""

from __future__ import annotations

from collections.abc import Mapping

from router.policies.base import Picker


class MaxScorePicker(Picker):
    name = "max-score"

    def pick(self, ctx, scores: Mapping) -> object:
        best = max(scores.values())
        top = [b for b, s in scores.items() if s >= best - 1e-12]
        return top[0] if len(top) == 1 else self.services.rng.choice(top)


PLUGINS = (MaxScorePicker,)

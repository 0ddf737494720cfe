"""Picker ``random`` (uniform, ignores scores) and the ``random`` policy."""

from __future__ import annotations

from collections.abc import Mapping

from router.policies.base import Picker


class RandomPicker(Picker):
    name = "random"

    def pick(self, ctx, scores: Mapping) -> object:
        return self.services.rng.choice(list(scores))


PLUGINS = (RandomPicker,)
POLICIES = {"random": {"picker": {"type": "random"}}}

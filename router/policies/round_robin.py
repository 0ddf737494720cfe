"""Picker ``round-robin`` (ignores scores) and the ``round-robin`` policy."""

from __future__ import annotations

from collections.abc import Mapping

from router.policies.base import Picker


class RoundRobinPicker(Picker):
    name = "round-robin"

    def __init__(self, config, services) -> None:
        super().__init__(config, services)
        self._next = 0

    def pick(self, ctx, scores: Mapping) -> object:
        backends = list(scores)
        b = backends[self._next % len(backends)]
        self._next += 1
        return b


PLUGINS = (RoundRobinPicker,)
POLICIES = {"round-robin": {"picker": {"type": "round-robin"}}}

"""The governance log: one JSON line per request, with a prompt *hash* and never prompt or output text."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["SAMPLING_FIELDS", "GovernanceLog", "sampling_params"]

# Body fields logged as sampling parameters (values are numbers/bools; text-bearing fields are reduced to sizes).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "n",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stream", "logprobs",
                   "top_logprobs", "ignore_eos", "min_tokens")  # fmt: skip


def sampling_params(body: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: body[k] for k in SAMPLING_FIELDS if k in body and isinstance(body[k], int | float | bool | None)}
    stop = body.get("stop")
    if stop is not None:
        out["stop_count"] = len(stop) if isinstance(stop, list) else 1  # stop strings may be sensitive: count only
    return out


class GovernanceLog:
    """Writes to the ``kvscale.router.governance`` logger; ``target`` "-" = stderr, a path = that file (append),
    None = off. The logger does not propagate, so the lines are pure JSON."""

    def __init__(self, target: str | None, name: str = "kvscale.router.governance") -> None:
        self.logger = logging.getLogger(name)
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self._handler: logging.Handler | None = None
        self.enabled = bool(target)
        if target == "-":
            self._handler = logging.StreamHandler(sys.stderr)
        elif target:
            self._handler = logging.FileHandler(target)
        if self._handler is not None:
            self._handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(self._handler)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.logger.info(json.dumps(record, separators=(",", ":"), default=str))

    def close(self) -> None:
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None

"""Mixed hardware: the latency model a backend's label names (``kvscale.io/latency-model``), loaded once.

A built-in model name or a JSON file, or a key of a plugin's ``variant_models`` map; a name that does not load is
logged once and the backend gets the caller's default. Shared by the ``slo`` and ``least-request`` scorers.
"""

from __future__ import annotations

import logging
from typing import Any

from kvscale.latency import LatencyModel, LatencyModelError, load_latency_model

log = logging.getLogger("kvscale.router")
MODEL_LABEL = "kvscale.io/latency-model"


class VariantModels:
    def __init__(self, label: str = MODEL_LABEL, aliases: dict[str, str] | None = None) -> None:
        self.label = label
        self._models: dict[str, LatencyModel | None] = {k: load_latency_model(v) for k, v in (aliases or {}).items()}

    def model(self, backend: Any, default: LatencyModel | None = None) -> LatencyModel | None:
        """``backend``'s variant model (its label), else ``default``."""
        name = (getattr(backend, "labels", None) or {}).get(self.label)
        if not name:
            return default
        if name not in self._models:
            try:
                self._models[name] = load_latency_model(name)
            except LatencyModelError as e:
                log.warning("backend label %s=%r: %s; using the default", self.label, name, e)
                self._models[name] = None
        return self._models[name] or default

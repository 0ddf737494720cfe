"""A policy = filters → weighted scorers → picker, built from a JSON spec against the :class:`Registry`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.policies.base import Filter, Outcome, Picker, Plugin, PluginConfigError, Registry, Scorer, Services

if TYPE_CHECKING:
    from router.backends import Backend
    from router.context import RequestContext

__all__ = ["Pipeline", "build_pipeline", "build_policies", "load_policy_file"]

_SPEC_FIELDS = {"filters", "scorers", "picker"}


@dataclass
class Pipeline:
    """One named policy. :meth:`select` is the hot path: keep plugins cheap (no I/O)."""

    name: str
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker
    # Bound hooks of the plugins that override them (found once: most plugins do not, and the hooks run per request)
    _start_hooks: tuple = field(default=(), init=False, repr=False, compare=False)
    _finish_hooks: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plugins = list(self._plugins())
        self._start_hooks = tuple(p.on_response_start for p in plugins
                                  if type(p).on_response_start is not Plugin.on_response_start)  # fmt: skip
        self._finish_hooks = tuple(p.on_finish for p in plugins if type(p).on_finish is not Plugin.on_finish)

    @property
    def has_finish_hooks(self) -> bool:
        """False when no plugin needs :meth:`on_finish` (the caller may then skip building the Outcome)."""
        return bool(self._finish_hooks)

    def select(self, ctx: RequestContext, candidates: Sequence[Backend]) -> Backend | None:
        """The chosen backend, or None when the filters leave nothing."""
        backends: Sequence[Backend] = candidates
        for f in self.filters:
            backends = f.filter(ctx, backends)
            if not backends:
                return None
        totals: dict[Backend, float] = dict.fromkeys(backends, 0.0)
        for scorer, weight in self.scorers:
            scores = scorer.score(ctx, backends)
            get = scores.get
            for b in backends:
                s = get(b, 0.0)
                totals[b] += weight * (0.0 if s < 0.0 else 1.0 if s > 1.0 else s)
        return self.picker.pick(ctx, totals)

    def _plugins(self):
        yield from self.filters
        for s, _ in self.scorers:
            yield s
        yield self.picker

    def on_response_start(self, ctx: RequestContext, backend: Backend) -> None:
        for hook in self._start_hooks:
            hook(ctx, backend)

    def on_finish(self, ctx: RequestContext, backend: Backend, outcome: Outcome) -> None:
        for hook in self._finish_hooks:
            hook(ctx, backend, outcome)

    def on_pool_change(self) -> None:
        for p in self._plugins():
            p.on_pool_change()


def build_pipeline(name: str, spec: Mapping[str, Any], registry: Registry, services: Services) -> Pipeline:
    """Build one policy from ``{"filters": [...], "scorers": [{type, weight, config}], "picker": {...}}``."""
    where = f"policy {name!r}"
    if not isinstance(spec, Mapping):
        raise PluginConfigError(f"{where}: expected an object, got {spec!r}")
    unknown = sorted(set(spec) - _SPEC_FIELDS)
    if unknown:
        raise PluginConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(_SPEC_FIELDS)}")
    filters_spec = spec.get("filters", [])
    scorers_spec = spec.get("scorers", [])
    if not isinstance(filters_spec, list) or not isinstance(scorers_spec, list):
        raise PluginConfigError(f"{where}: filters and scorers must be lists")
    filters = [
        registry.create("filter", s, services, f"{where} filters[{i}]") for i, s in enumerate(filters_spec)
    ]
    scorers: list[tuple[Scorer, float]] = []
    for i, s in enumerate(scorers_spec):
        scorer = registry.create("scorer", s, services, f"{where} scorers[{i}]")
        weight = s.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise PluginConfigError(f"{where} scorers[{i}]: weight must be a number ≥ 0, got {weight!r}")
        scorers.append((scorer, float(weight)))  # type: ignore[arg-type]
    picker = registry.create("picker", spec.get("picker", {"type": "max-score"}), services, f"{where} picker")
    return Pipeline(name, filters, scorers, picker)  # type: ignore[arg-type]


def build_policies(
    registry: Registry, services: Services, extra: Mapping[str, Any] | None = None
) -> dict[str, Pipeline]:
    """All presets of the registry plus ``extra`` (user policies, which may replace a preset by name)."""
    specs = {**registry.presets, **(extra or {})}
    return {name: build_pipeline(name, spec, registry, services) for name, spec in specs.items()}


def load_policy_file(path: str | Path) -> dict[str, Any]:
    """Read ``--policy-config FILE``: ``{"policies": {NAME: spec, ...}}`` (JSON)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PluginConfigError(f"--policy-config {path}: {exc}") from exc
    if not isinstance(data, dict) or set(data) - {"policies"} or not isinstance(data.get("policies"), dict):
        raise PluginConfigError(f"--policy-config {path}: expected {{\"policies\": {{NAME: spec}}}} and nothing else")
    return data["policies"]

"""An emulation of the Kubernetes HorizontalPodAutoscaler (as KEDA creates it), behaviour policies included.

The evaluator (:mod:`scaler.evaluate`) runs every reactive policy through this, so that each one is judged under
the HPA settings it would really run under:

* the baselines (``keda-queue``, ``hpa-kv``) under the **Kubernetes defaults** (their recipes set no
  ``behavior``): scale-up stabilization 0 s, at most +4 pods or +100 % per 15 s (the larger); scale-down
  stabilization 300 s (kube-controller-manager's ``--horizontal-pod-autoscaler-downscale-stabilization``), at
  most -100 % per 15 s;
* ``kvscale`` under the ``advanced.horizontalPodAutoscalerConfig.behavior`` of the **committed ScaledObject** of
  its pool (``deploy/overlays/*/scaledobject*.yaml``), read from the file at run time, so the figures always
  describe the manifest a user deploys; and ``kvscale-hpa-default`` under the defaults, for comparison.

The algorithm follows the HPA controller (``pkg/controller/podautoscaler/horizontal.go``):

1. replicas from the metric: ``AverageValue`` external metrics give ``ceil(metric / target)``, pods metrics
   ``ceil(ready x average / target)``; no change while the ratio to the current count is within
   ``[1 - tolerance, 1 + tolerance]`` (0.1; bounds included, as Kubernetes 1.33+ computes it);
2. stabilization (``stabilizeRecommendationWithBehaviors``): the result is clamped between the *lowest*
   recommendation of the scale-up window and the *highest* of the scale-down window (both include this sync's);
3. rate limits (``convertDesiredReplicasWithBehaviorRate``): per policy, the replicas at the start of its period
   (current minus what was added plus what was removed within ``periodSeconds``) plus/minus ``value`` pods or
   percent (scale-up rounds up, scale-down truncates); ``selectPolicy`` ``Max`` picks the policy allowing the
   largest change, ``Min`` the smallest, ``Disabled`` none; then min/max replicas.

Timestamps compare strictly (a recommendation or scale event exactly one window/period old is out), as in the
controller; with a 15 s sync a 15 s period therefore limits each sync separately.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
DEFAULT_DOWNSCALE_STABILIZATION_S = 300.0  # kube-controller-manager's default


@dataclass(frozen=True)
class HpaPolicy:
    """One ``behavior.scaleUp/scaleDown.policies`` entry."""

    type: str  # Pods | Percent
    value: int
    period_s: float

    def __post_init__(self) -> None:
        if self.type not in ("Pods", "Percent"):
            raise ValueError(f"HPA policy type must be Pods or Percent, got {self.type!r}")
        if self.value <= 0 or self.period_s <= 0:
            raise ValueError(f"HPA policy value and periodSeconds must be > 0, got {self.value}, {self.period_s}")


@dataclass(frozen=True)
class HpaRules:
    """``behavior.scaleUp`` or ``behavior.scaleDown``."""

    stabilization_s: float
    policies: tuple[HpaPolicy, ...]
    select: str = "Max"  # Max | Min | Disabled

    def __post_init__(self) -> None:
        if self.select not in ("Max", "Min", "Disabled"):
            raise ValueError(f"HPA selectPolicy must be Max, Min or Disabled, got {self.select!r}")

    def describe(self, sign: str = "+") -> str:
        pol = ", ".join(f"{sign}{p.value}{' pods' if p.type == 'Pods' else '%'}/{p.period_s:g}s" for p in self.policies)
        return f"stabilization {self.stabilization_s:g}s, {self.select}({pol})"


DEFAULT_SCALE_UP = HpaRules(0.0, (HpaPolicy("Pods", 4, 15.0), HpaPolicy("Percent", 100, 15.0)), "Max")
DEFAULT_SCALE_DOWN = HpaRules(DEFAULT_DOWNSCALE_STABILIZATION_S, (HpaPolicy("Percent", 100, 15.0),), "Max")


@dataclass(frozen=True)
class HpaBehavior:
    """An HPA's ``spec.behavior`` after Kubernetes' defaulting, and where it came from (printed with results)."""

    scale_up: HpaRules = DEFAULT_SCALE_UP
    scale_down: HpaRules = DEFAULT_SCALE_DOWN
    source: str = "Kubernetes HPA defaults"

    def describe(self) -> str:
        return f"{self.source}: up {self.scale_up.describe('+')}; down {self.scale_down.describe('-')}"

    @classmethod
    def from_spec(cls, behavior: dict[str, Any] | None, source: str) -> HpaBehavior:
        """From a ``behavior`` mapping (as in ``advanced.horizontalPodAutoscalerConfig``), defaulting what is
        missing the way the API server does (``SetDefaults_HorizontalPodAutoscalerBehavior``)."""
        behavior = behavior or {}

        def rules(spec: dict[str, Any] | None, default: HpaRules) -> HpaRules:
            if not spec:
                return default
            pols = spec.get("policies")
            return HpaRules(
                float(spec.get("stabilizationWindowSeconds", default.stabilization_s)),
                tuple(HpaPolicy(str(p["type"]), int(p["value"]), float(p["periodSeconds"])) for p in pols)
                if pols else default.policies,
                str(spec.get("selectPolicy", "Max")),
            )  # fmt: skip

        return cls(rules(behavior.get("scaleUp"), DEFAULT_SCALE_UP),
                   rules(behavior.get("scaleDown"), DEFAULT_SCALE_DOWN), source)  # fmt: skip


def _scaledobjects(paths: Iterable[Path]) -> Iterable[tuple[Path, dict[str, Any]]]:
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "ScaledObject":
                yield path, doc


def committed_behavior(pool: str, deploy_dir: Path = DEPLOY_DIR) -> HpaBehavior:
    """The HPA behaviour of the committed ScaledObject whose kvscale trigger has ``pool: <pool>``.

    Raises ``FileNotFoundError`` when the manifests are not there (an installed package without the repository)
    and ``LookupError`` when no ScaledObject serves the pool: the evaluation then cannot claim to describe them.
    """
    files = sorted((deploy_dir / "overlays").glob("**/scaledobject*.yaml"))
    if not files:
        raise FileNotFoundError(f"no ScaledObject manifests under {deploy_dir / 'overlays'}")
    for path, so in _scaledobjects(files):
        triggers = so.get("spec", {}).get("triggers") or []
        if any(t.get("type") == "external" and (t.get("metadata") or {}).get("pool") == pool for t in triggers):
            behavior = (so["spec"].get("advanced") or {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
            name = so.get("metadata", {}).get("name", "?")
            return HpaBehavior.from_spec(behavior, f"ScaledObject {name} ({path.relative_to(deploy_dir.parent)})")
    raise LookupError(f"no committed ScaledObject with a kvscale trigger for pool {pool!r} in {deploy_dir}")


class ScaleTarget(Protocol):
    """What the HPA scales (the virtual cluster)."""

    def set_replicas(self, pool: str, n: int, now: float | None = None) -> None: ...


@dataclass
class Hpa:
    """One HorizontalPodAutoscaler over one pool, synced by the caller's clock."""

    pool: str
    metric: Callable[[float], float | None]  # the metric value at a sync; None: the read failed (HPA holds)
    target: float
    kind: str = "external"  # external AverageValue (KEDA) | pods (average over ready pods)
    behavior: HpaBehavior = field(default_factory=HpaBehavior)
    min_replicas: int = 1
    max_replicas: int = 64
    tolerance: float = 0.1
    sync_s: float = 15.0
    spec: int = 1
    ready: Callable[[float], int] | None = None  # ready pods (pods metrics only)
    last_sync: float = -math.inf
    recs: list[tuple[float, int]] = field(default_factory=list)  # (t, unstabilized recommendation)
    scale_events: list[tuple[float, int]] = field(default_factory=list)  # (t, signed replica change)
    events: int = 0

    def recommend(self, m: float, now: float) -> int:
        """Replicas from the metric (tolerance included), before stabilization and rate limits."""
        current = self.spec
        if self.kind == "external":
            ratio = m / (self.target * current) if current > 0 else math.inf
            proposal = math.ceil(m / self.target - 1e-9)
        else:
            ready = self.ready(now) if self.ready is not None else current
            ratio = m / self.target
            proposal = math.ceil(ratio * ready - 1e-9)
        # Kubernetes >= 1.33 form (``isWithin``): a ratio of exactly 1 +/- tolerance is within it
        return current if 1.0 - self.tolerance <= ratio <= 1.0 + self.tolerance else proposal

    def _stabilize(self, desired: int, now: float) -> int:
        up_cut, down_cut = now - self.behavior.scale_up.stabilization_s, now - self.behavior.scale_down.stabilization_s
        up = down = desired
        for t, rec in self.recs:
            if t > up_cut:
                up = min(up, rec)
            if t > down_cut:
                down = max(down, rec)
        keep = min(up_cut, down_cut)
        self.recs = [(t, r) for t, r in self.recs if t > keep]
        self.recs.append((now, desired))
        return min(max(self.spec, up), down)

    def _changed(self, period_s: float, now: float) -> tuple[int, int]:
        added = sum(c for t, c in self.scale_events if t > now - period_s and c > 0)
        removed = -sum(c for t, c in self.scale_events if t > now - period_s and c < 0)
        return added, removed

    def _proposals(self, rules: Any, now: float, up: bool) -> list[int]:
        """Each policy's bound on the new count, from the count at the start of its period (as the HPA computes)."""
        current = self.spec
        out = []
        for p in rules.policies:
            added, removed = self._changed(p.period_s, now)
            start = current - added + removed
            if p.type == "Pods":
                out.append(start + p.value if up else start - p.value)
            else:
                out.append(math.ceil(start * (1 + p.value / 100)) if up else int(start * (1 - p.value / 100)))
        return out

    def _limit(self, desired: int, now: float) -> int:
        current = self.spec
        if desired == current:
            return desired
        up = desired > current
        rules = self.behavior.scale_up if up else self.behavior.scale_down
        if rules.select == "Disabled":
            limit = current
        else:
            # selectPolicy Max picks the policy allowing the largest change: the highest bound up, the lowest down
            props = self._proposals(rules, now, up=up)
            limit = max(props) if (rules.select == "Max") == up else min(props)
        if up:
            return min(desired, max(limit, current), self.max_replicas)
        return max(desired, min(limit, current), self.min_replicas)

    def sync(self, now: float, cluster: ScaleTarget) -> None:
        if now - self.last_sync < self.sync_s - 1e-9:
            return
        self.last_sync = now
        m = self.metric(now)
        if m is None:
            return
        desired = self._limit(self._stabilize(self.recommend(m, now), now), now)
        desired = min(max(desired, self.min_replicas), self.max_replicas)
        if desired != self.spec:
            self.scale_events.append((now, desired - self.spec))
            longest = max(p.period_s for r in (self.behavior.scale_up, self.behavior.scale_down) for p in r.policies)
            self.scale_events = [(t, c) for t, c in self.scale_events if t > now - longest]
            self.spec = desired
            self.events += 1
            cluster.set_replicas(self.pool, desired, now)

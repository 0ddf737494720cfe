"""``kvscale eval scaling --variants SPEC:COST,...``: a mixed fleet of GPU variants against single-variant fleets.

One trace (sized, as without ``--variants``, so that the oracle's busiest bucket needs ``--peak-replicas`` of the
*first* variant), one aggregated pool, and these policies:

* ``kvscale-mixed``: one kvscale ScaledObject per variant in one variant group, as ``scaler.service`` runs them:
  each member's :class:`~scaler.policy.ScalingPolicy` reads only its variant's pods (its own latency model), the
  real :class:`~scaler.variants.VariantGroup` splits the requirement at the least cost, and each variant's HPA
  (the committed ScaledObject's behaviour) follows its share;
* ``oracle-mixed``: per bucket the exact need, split at the least cost (``scaler.variants.split``), provided a cold
  start ahead (future knowledge) as the single-pool oracle does;
* ``kvscale-<variant>`` and ``oracle-<variant>``: the same trace on a fleet of that variant alone.

A mixed pool is dispatched to as one pool by the router's policy (``--router-policy``, default ``least-request``,
which weighs each replica by its variant's decode step; ``slo`` predicts each replica with its variant's latency
model). Per policy: ``cost`` (sum over variants of
GPU-hours x ``costPerHour``), ``gpu_hours_per_variant``, SLO attainment and the usual figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kvscale.latency import LatencyModel, LatencyModelError, builtin_models, load_latency_model
from scaler.evaluate.controllers import TICK_S, KvscaleProducer
from scaler.evaluate.signals import VirtualSource
from scaler.hpa import Hpa, HpaBehavior
from scaler.metadata import parse_scaler_metadata
from scaler.policy import ScalingPolicy
from scaler.variants import Variant, VariantGroup, split
from simulator.cluster import Cluster, ClusterResult

POOL = "aggregated"
MIN_REPLICAS = 1  # per variant, as deploy/overlays/variants (scaleToZero off: the HPA keeps one pod)


@dataclass(frozen=True)
class VariantSpec:
    name: str  # short name, e.g. h100
    model_spec: str  # its latency model: a built-in name or a JSON file
    cost_per_hour: float
    max_replicas: int | None = None  # a quota (nodes of that GPU type); None: --max-replicas


def _shorthand(name: str) -> str | None:
    """``h100`` -> ``llama-3-8b-h100-vllm-public`` when such a built-in model exists."""
    full = f"llama-3-8b-{name}-vllm-public"
    return full if full in builtin_models() else None


def parse_variants(text: str) -> list[VariantSpec]:
    """``SPEC:COST[:MAX],...``; SPEC is a latency model (built-in name or file) or a GPU shorthand (``h100``,
    ``a100-40gb``, ``gh200``, ...: the built-in ``llama-3-8b-<gpu>-vllm-public``); MAX caps that variant's replicas
    (a quota of nodes of that GPU type)."""
    out: list[VariantSpec] = []
    for item in (x.strip() for x in text.split(",")):
        parts = item.split(":")
        if len(parts) >= 3 and parts[-1].strip().isdigit() and _number(parts[-2]) is not None:
            spec, cost_text, top = ":".join(parts[:-2]), parts[-2], int(parts[-1])
        else:
            spec, _, cost_text = item.rpartition(":")
            top = None
        if not item or ":" not in item or not spec:
            raise ValueError(f"--variants: expected SPEC:COST[:MAX] items (e.g. h100:4.0,a100-40gb:1.6:4), got "
                             f"{item!r}")  # fmt: skip
        cost = _number(cost_text)
        if cost is None:
            raise ValueError(f"--variants {item!r}: cost {cost_text!r} is not a number")
        if not math.isfinite(cost) or cost <= 0:
            raise ValueError(f"--variants {item!r}: cost must be > 0")
        if top is not None and top < MIN_REPLICAS:
            raise ValueError(f"--variants {item!r}: MAX must be >= {MIN_REPLICAS}")
        model = _shorthand(spec) or spec
        try:
            load_latency_model(model)
        except LatencyModelError as e:
            raise ValueError(f"--variants {item!r}: {e}") from None
        name = spec if _shorthand(spec) else load_latency_model(model).name
        if any(v.name == name for v in out):
            raise ValueError(f"--variants: {name!r} given twice")
        out.append(VariantSpec(name, model, cost, top))
    if len(out) < 2:
        raise ValueError("--variants: give at least two variants (SPEC:COST,SPEC:COST)")
    return out


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class _VariantTarget:
    """What a variant's HPA scales: its own Deployment in the mixed pool."""

    def __init__(self, cluster: Cluster, variant: str) -> None:
        self.cluster, self.variant = cluster, variant

    def set_replicas(self, pool: str, n: int, now: float | None = None) -> None:
        self.cluster.set_replicas(pool, n, now, variant=self.variant)


class _VariantHpas:
    """Cluster controller: the members decide, the group splits, each variant's HPA follows its share."""

    interval_s = TICK_S

    def __init__(self, members: dict[str, tuple[KvscaleProducer, Hpa, _VariantTarget]], group: VariantGroup,
                 costs: dict[str, float], max_replicas: dict[str, int]) -> None:  # fmt: skip
        self.members, self.group, self.costs, self.max_replicas = members, group, costs, max_replicas
        self.share: dict[str, int] = {v: h.spec for v, (_, h, _) in members.items()}

    def tick(self, now: float, cluster: Cluster) -> None:
        for v, (prod, _, _) in self.members.items():
            before = prod.next_t
            prod(now)
            d = prod.policy.last
            if prod.next_t == before or d is None or not d.ok or d.desired < 0:
                continue  # no new decision, or a hold: the member keeps its share
            s = self.group.observe(v, now, d, ready=len(cluster.serving_replicas(POOL, now, v)),
                                   cost_per_hour=self.costs[v],
                                   min_replicas=max(MIN_REPLICAS, prod.policy.floor(now)),  # scheduleFloors
                                   max_replicas=self.max_replicas[v])  # fmt: skip
            self.share.update(s.counts)
        for _, hpa, target in self.members.values():
            hpa.sync(now, target)

    @property
    def events(self) -> int:
        return sum(h.events for _, h, _ in self.members.values())


class _MixedOracle:
    """The least-cost split covering the exact need of every bucket over [t, t + startup + tick] (future knowledge),
    as :class:`~scaler.evaluate.controllers.OracleController` provides a single pool."""

    interval_s = TICK_S

    def __init__(self, alone: dict[str, np.ndarray], costs: dict[str, float], top: dict[str, int], bucket_s: float,
                 startup_s: float) -> None:  # fmt: skip
        self.alone, self.costs, self.top = alone, costs, top  # alone[v][i]: replicas bucket i needs of v alone
        self.bucket_s, self.startup_s = bucket_s, startup_s
        self.n = min(len(a) for a in alone.values())
        self.events = 0
        self._key: tuple[int, int] | None = None
        self._last: dict[str, int] | None = None

    def _split(self, i: int, current: dict[str, int] | None = None) -> dict[str, int]:
        cur = current or {}
        vs = [Variant(v, self.costs[v], 1.0 / a[i] if a[i] > 0 and math.isfinite(a[i]) else 0.0, MIN_REPLICAS,
                      self.top[v], cur.get(v, 0)) for v, a in self.alone.items()]  # fmt: skip
        return split(1.0 if any(a[i] > 0 for a in self.alone.values()) else 0.0, vs).counts

    def _covers(self, counts: dict[str, int], i: int) -> bool:
        if not any(a[i] > 0 for a in self.alone.values()):
            return True
        return sum(n / self.alone[v][i] for v, n in counts.items() if self.alone[v][i] > 0) >= 1 - 1e-9

    def counts(self, now: float) -> dict[str, int]:
        """The split for the window starting at ``now``; from the previous call's counts, changed as the live
        group changes them (scaler.variants.split's hysteresis), so near-equal mixes do not swap pods."""
        i0 = min(int(now // self.bucket_s), self.n - 1)
        i1 = max(min(int((now + self.startup_s + TICK_S) // self.bucket_s) + 1, self.n), i0 + 1)
        key = (i0, i1)
        if key != self._key:
            window = range(i0, i1)
            ref = next(iter(self.alone))
            busiest = max(window, key=lambda j: self.alone[ref][j])
            best = dict(self._split(busiest, self._last))
            while not all(self._covers(best, j) for j in window):  # the other buckets' request mix may need more
                room = [v for v in best if best[v] < self.top[v]]
                if not room:
                    break
                v = min(room, key=lambda v: self.costs[v] * max(float(self.alone[v][i0:i1].max()), 1e-9))
                best[v] += 1
            self._key, self._last = key, best
        return self._last

    def target(self, v: str, now: float) -> int:
        return self.counts(now)[v]

    def tick(self, now: float, cluster: Cluster) -> None:
        for v, n in self.counts(now).items():
            if n != len(cluster.pool_replicas(POOL, variant=v)):
                self.events += 1
                cluster.set_replicas(POOL, n, now, variant=v)


class VariantEvaluation:
    """The evaluation of ``--variants``: see the module docstring."""

    def __init__(self, cfg: Any, variants: list[VariantSpec]) -> None:
        from scaler.evaluate.run import Evaluation  # run imports this module's callers, not this module

        if cfg.pools != "aggregated":
            raise ValueError("--variants: only aggregated pools (--pools aggregated) are evaluated so far")
        self.variants = variants
        self.cfg = cfg
        first = Evaluation(replace(cfg, latency_model=variants[0].model_spec, policies=("kvscale", "oracle"),
                                   max_replicas=variants[0].max_replicas or cfg.max_replicas))  # fmt: skip
        trace = first.trace
        self.scale = first.scale
        self.singles: dict[str, Evaluation] = {variants[0].name: first}
        for v in variants[1:]:  # the same requests on every fleet
            self.singles[v.name] = Evaluation(replace(
                cfg, latency_model=v.model_spec, policies=("kvscale", "oracle"), requests=trace, size_to_peak=False,
                rate=None, trace_name=cfg.trace_name or cfg.trace,
                max_replicas=v.max_replicas or cfg.max_replicas))  # fmt: skip
        self.first = first
        self.trace = trace
        self.models: dict[str, LatencyModel] = {v.name: self.singles[v.name].model for v in variants}
        self.costs = {v.name: v.cost_per_hour for v in variants}
        self.max = {v.name: v.max_replicas or cfg.max_replicas for v in variants}
        self.oracle = self._oracle()
        self.policies = ["kvscale-mixed", "oracle-mixed", *(f"{p}-{v.name}" for v in variants
                                                           for p in ("kvscale", "oracle"))]  # fmt: skip

    def _oracle(self) -> _MixedOracle:
        alone = {v: ev._needs(POOL, self.trace) for v, ev in self.singles.items()}  # replicas if served by v alone
        return _MixedOracle(alone, self.costs, self.max, self.cfg.oracle_bucket_s, self.cfg.startup_s)

    def _cluster(self, init: dict[str, int]) -> Cluster:
        return self.first._cluster({POOL: 0}, variants={v.name: self.models[v.name] for v in self.variants},
                                   variant_replicas=init, variant_labels={v.name: v.model_spec for v in self.variants},
                                   variant_configs={
                                       v: self.first.engine_config(m) for v, m in self.models.items()})  # fmt: skip

    def run_mixed(self, name: str) -> tuple[ClusterResult, int]:
        oracle = self._oracle()
        init = {v.name: oracle.target(v.name, 0.0) for v in self.variants}
        cluster = self._cluster(init)
        if name == "oracle-mixed":
            return cluster.run(self.trace, controller=oracle), oracle.events
        group = VariantGroup.for_pods(self.cfg.startup_s, self.first.settings[POOL].stable_window_s)
        members = {}
        behavior = self.first.hpa_behaviors("kvscale")[POOL] or HpaBehavior()
        controller: _VariantHpas
        for v in self.variants:
            ev = self.singles[v.name]
            md = {**{k: val for k, val in ev.settings[POOL].raw}, "variantGroup": "eval",
                  "costPerHour": str(v.cost_per_hour), "minReplicas": str(MIN_REPLICAS),
                  "maxReplicas": str(self.max[v.name])}  # fmt: skip
            settings = parse_scaler_metadata(md, load_model=lambda spec, m=ev.model: m)
            source = VirtualSource(cluster, POOL, settings, self.first.max_model_len, variant=v.name)
            policy = ScalingPolicy(settings, ev.model, wall_clock=lambda now: self.cfg.start_epoch_s + now)
            prod = KvscaleProducer(policy, source, cluster)
            target = _VariantTarget(cluster, v.name)

            def share(now: float, name: str = v.name) -> float:
                return float(controller.share[name])

            members[v.name] = (prod, Hpa(POOL, share, 1.0, behavior=behavior, spec=init[v.name],
                                         min_replicas=MIN_REPLICAS, max_replicas=self.max[v.name]), target)
        cluster.deletion_cost[POOL] = lambda r: members[r.variant][0].source.deletion_cost(r)
        controller = _VariantHpas(members, group, self.costs, self.max)
        return cluster.run(self.trace, controller=controller), controller.events

    def figures(self, name: str) -> dict[str, Any]:
        if name.endswith("-mixed"):
            result, events = self.run_mixed(name)
            figs = self.first.summarize(result, events)
            hours = {v: result.variant_seconds.get(v, 0.0) / 3600.0 * self.cfg.gpus_per_replica for v in self.costs}
        else:
            policy, variant = name.split("-", 1)
            ev = self.singles[variant]
            result, events, _ = ev.run_policy(policy)
            figs = ev.summarize(result, events)
            hours = {v: (figs["gpu_hours"] if v == variant else 0.0) for v in self.costs}
        figs["gpu_hours_per_variant"] = hours
        figs["cost"] = sum(h * self.costs[v] for v, h in hours.items())
        return figs

    def run(self, progress: Any = None) -> dict[str, Any]:
        import time

        t0 = time.perf_counter()
        out: dict[str, Any] = {
            "trace": self.cfg.trace_name or self.cfg.trace, "requests": len(self.trace), "rate_scale": self.scale,
            "duration_s": self.first.cfg.duration_s, "pools": POOL, "startup_s": self.cfg.startup_s,
            "router_policy": self.cfg.router_policy,
            "slo": {"ttft_s": self.cfg.ttft_slo_ms / 1000, "itl_s": self.cfg.itl_slo_ms / 1000,
                    "percentile": self.cfg.slo_percentile},
            "variants": [{"name": v.name, "latency_model": self.models[v.name].name,
                          "cost_per_hour": v.cost_per_hour, "max_replicas": self.max[v.name]}
                         for v in self.variants],
            "sized_on": self.variants[0].name, "policies": {},
        }  # fmt: skip
        for name in self.policies:
            t1 = time.perf_counter()
            out["policies"][name] = self.figures(name) | {"wall_s": time.perf_counter() - t1}
            if progress:
                progress(f"{name}: {out['policies'][name]['wall_s']:.1f}s wall")
        out["wall_s"] = time.perf_counter() - t0
        return out

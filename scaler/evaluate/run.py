"""One evaluation: the trace, the SLO and the capacity model built once, then each policy on a fresh cluster."""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kvscale.latency import DEFAULT_MODEL, LatencyModel, load_latency_model
from kvscale.traces.transform import rate_scale
from predictor.capacity import CapacityView
from scaler.evaluate import KVSCALE_POLICIES, POLICIES, TRACES
from scaler.evaluate.controllers import HpaController, KvscaleProducer, OracleController
from scaler.evaluate.signals import VirtualSource
from scaler.hpa import Hpa, HpaBehavior, committed_behavior
from scaler.metadata import ScalerSettings, parse_scaler_metadata
from scaler.policy import ScalingPolicy
from simulator.cluster import Cluster, ClusterResult, Replica
from simulator.engine import EngineConfig
from simulator.scheduler import SchedulerConfig
from simulator.workload import WORKLOADS, TraceRequest, build_trace


@dataclass
class EvalConfig:
    trace: str = "diurnal"
    workload: str = "chat"
    pools: str = "aggregated"  # aggregated | pd
    latency_model: str = DEFAULT_MODEL
    startup_s: float = 90.0
    duration_s: float = 3600.0
    rate: float | None = None  # mean req/s; default: sized so the peak needs ``peak_replicas``
    peak_replicas: float = 6.0
    ttft_slo_ms: float = 1000.0
    itl_slo_ms: float = 50.0
    slo_percentile: float = 99.0
    seed: int = 0
    gpus_per_replica: int = 1
    oracle_bucket_s: float = 60.0
    policies: tuple[str, ...] = POLICIES
    max_replicas: int = 64
    metadata: dict[str, str] = field(default_factory=dict)  # extra scalerMetadata for kvscale
    kvscale_hpa: str = "committed"  # committed: the ScaledObject's HPA behaviour | default: Kubernetes defaults
    # A recorded trace (kvscale.traces) instead of the synthetic ``trace`` x ``workload``; ``trace_name`` labels it.
    # With ``size_to_peak`` its rate is scaled (kvscale.traces.transform.rate_scale) so that the oracle's busiest
    # bucket needs ``peak_replicas``; ``duration_s`` becomes the trace's span.
    requests: list[TraceRequest] | None = None
    trace_name: str = ""
    size_to_peak: bool = True
    # The router policy (router/policies: a preset name) that dispatches on the virtual cluster (default: the
    # router's default, `kvscale router serve --policy least-request`)
    router_policy: str = "least-request"
    # The engine pods' terminationGracePeriodSeconds (deploy/base/engine/deployment.yaml; a test keeps them equal):
    # what a draining replica still holds that much after its scale-down is killed
    termination_grace_s: float | None = 120.0
    # Unix seconds of virtual time 0: what the cron windows of ``scheduleFloors`` see (default 1970-01-01 00:00 UTC)
    start_epoch_s: float = 0.0

    def pool_names(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.pools == "pd" else ("aggregated",)


def _peak_factor(cfg: EvalConfig) -> float:
    """Peak rate / mean rate of the trace's arrival process (with the options used here)."""
    if cfg.trace == "diurnal":
        return 1.0 + 0.6
    if cfg.trace == "step":
        return 5.0 / (1.0 + 4.0 / 3.0)  # base x5 for the middle third; mean = base x 7/3
    if cfg.trace == "bursty":
        p = 30.0 / 150.0
        return 4.0 / (1.0 + p * 3.0)
    return 1.0


class Evaluation:
    """Builds the trace, the SLO and the capacity model once; runs each policy on a fresh cluster."""

    def __init__(self, cfg: EvalConfig) -> None:
        if cfg.requests is None and cfg.trace not in TRACES:
            raise ValueError(f"--trace: expected one of {', '.join(TRACES)}, got {cfg.trace!r}")
        if cfg.requests is None and cfg.workload not in WORKLOADS:
            raise ValueError(f"--workload: expected one of {', '.join(WORKLOADS)}, got {cfg.workload!r}")
        if cfg.pools not in ("aggregated", "pd"):
            raise ValueError(f"--pools: expected aggregated or pd, got {cfg.pools!r}")
        unknown = set(cfg.policies) - set(POLICIES)
        if unknown:
            raise ValueError(f"--policies: unknown {sorted(unknown)}; valid: {', '.join(POLICIES)}")
        if cfg.kvscale_hpa not in ("committed", "default"):
            raise ValueError(f"--kvscale-hpa: expected committed or default, got {cfg.kvscale_hpa!r}")
        if cfg.termination_grace_s is not None and not cfg.termination_grace_s >= 0:
            raise ValueError(f"--termination-grace-seconds: expected >= 0, got {cfg.termination_grace_s:g}")
        self.cfg = cfg = replace(cfg)  # a recorded trace sets its duration_s: the caller's config stays as given
        from router.evaluate.dispatch import policy_names

        if cfg.router_policy not in policy_names():
            raise ValueError(f"--router-policy: unknown {cfg.router_policy!r}; known: "
                             f"{', '.join(policy_names())}")  # fmt: skip
        self._committed: dict[str, HpaBehavior] = {}
        if cfg.kvscale_hpa == "committed" and {"kvscale", "kvscale-noforecast"} & set(cfg.policies):
            self._committed = {p: committed_behavior(p) for p in cfg.pool_names()}
        self.model: LatencyModel = load_latency_model(cfg.latency_model)
        self.spec = WORKLOADS[cfg.workload] if cfg.requests is None else None
        self.settings = {p: self._settings(p) for p in cfg.pool_names()}
        self.views = {
            p: CapacityView(self.model, ScalingPolicy(s, self.model).slo, s.max_num_seqs)
            for p, s in self.settings.items()
        }
        self.scale = 1.0  # the rate factor applied to a recorded trace
        if cfg.requests is not None:
            self.trace = self._recorded_trace(cfg.requests)
            self.max_model_len = max(r.input_len + r.output_len for r in self.trace)
            self.rate = len(self.trace) / cfg.duration_s
        else:
            self.max_model_len = self.spec.max_input_len + self.spec.max_output_len
            self.rate = cfg.rate if cfg.rate is not None else self._default_rate()
            self.trace = build_trace(cfg.trace, cfg.workload, self.rate, cfg.duration_s, seed=cfg.seed)
        if not self.trace:
            raise ValueError("the trace is empty: raise --rate or --duration")
        self.schedules = {p: self._oracle_schedule(p) for p in cfg.pool_names()}

    def _recorded_trace(self, requests: list[TraceRequest]) -> list[TraceRequest]:
        """A recorded trace sized to ``peak_replicas`` (when ``size_to_peak``); sets ``duration_s`` to its span."""
        if not requests:
            raise ValueError("the trace file holds no requests")
        if self.cfg.rate is not None:
            raise ValueError("--rate applies to the synthetic traces; size a trace file with --peak-replicas or "
                             "--rate-scale")  # fmt: skip
        trace = sorted(requests, key=lambda r: r.arrival_s)
        span = trace[-1].arrival_s + 1.0
        self.cfg.duration_s = span
        if self.cfg.size_to_peak:
            peak = max(float(self._needs(p, trace).max()) for p in self.cfg.pool_names())
            if not peak > 0:
                raise ValueError("the trace asks for no capacity (every request empty?)")
            if math.isinf(peak):
                raise ValueError(f"no replica meets the SLO (TTFT {self.cfg.ttft_slo_ms:g} ms, ITL "
                                 f"{self.cfg.itl_slo_ms:g} ms) at this trace's request sizes in its busiest minute: "
                                 "raise --ttft-slo-ms / --itl-slo-ms, or give --rate-scale")  # fmt: skip
            # rate_scale draws its copies (or thinning) at random, which moves the peak a little: correct the
            # factor on the drawn trace, a few times, keeping the closest
            base, best = trace, (math.inf, 1.0, trace)
            factor = self.cfg.peak_replicas / peak
            for _ in range(4):
                drawn = sorted(rate_scale(base, factor, seed=self.cfg.seed), key=lambda r: r.arrival_s)
                got = max(float(self._needs(p, drawn).max()) for p in self.cfg.pool_names())
                best = min(best, (abs(got - self.cfg.peak_replicas), factor, drawn), key=lambda b: b[0])
                if not got > 0 or abs(got / self.cfg.peak_replicas - 1.0) < 0.02:
                    break
                factor *= self.cfg.peak_replicas / got
            _, self.scale, trace = best
        return trace

    def _settings(self, pool: str) -> ScalerSettings:
        c = self.cfg
        md = {
            "pool": pool, "model": "eval", "latencyModel": c.latency_model, "ttftSloMs": str(c.ttft_slo_ms),
            "itlSloMs": str(c.itl_slo_ms), "sloPercentile": str(c.slo_percentile), "podUrls": "http://virtual",
            "startupSeconds": str(c.startup_s), **c.metadata,
        }  # fmt: skip
        # the model file was loaded above: validating it again need not read it again
        return parse_scaler_metadata(md, load_model=lambda spec: self.model if spec == c.latency_model
                                     else load_latency_model(spec))  # fmt: skip

    def _need(self, pool: str, rate: float, isl: float, osl: float, cached: float = 0.0) -> float:
        if rate <= 0:
            return 0.0
        cap = self.views[pool].per_replica(pool, isl, osl, cached) * self.settings[pool].target_utilization
        if cap <= 0:
            return math.inf
        if pool == "prefill":
            units = rate * max(1.0, isl * (1.0 - cached))
        elif pool == "decode":
            units = rate * osl
        else:
            units = rate
        return units / cap

    def _default_rate(self) -> float:
        """Mean rate such that the trace's peak needs about ``peak_replicas`` of the bottleneck pool."""
        isl, osl = self.spec.sample(20000, np.random.default_rng(1))
        per_rps = max(self._need(p, 1.0, float(isl.mean()), float(osl.mean())) for p in self.cfg.pool_names())
        return self.cfg.peak_replicas / per_rps / _peak_factor(self.cfg)

    def _needs(self, pool: str, trace: list[TraceRequest]) -> np.ndarray:
        """The replicas (fractional) each ``oracle_bucket_s`` bucket's arrivals need of ``pool``.

        A recorded trace is planned without prefix-cache hits (its sharing depends on the router); a synthetic
        workload with shared prefixes at its steady state (every tenant's prefix cached)."""
        b = self.cfg.oracle_bucket_s
        n = math.ceil(self.cfg.duration_s / b) + 1
        t = np.array([r.arrival_s for r in trace])
        isl = np.array([r.input_len for r in trace], dtype=np.float64)
        osl = np.array([r.output_len for r in trace], dtype=np.float64)
        idx = np.minimum((t // b).astype(np.int64), n - 1)
        counts = np.bincount(idx, minlength=n)
        isl_sum = np.bincount(idx, weights=isl, minlength=n)
        osl_sum = np.bincount(idx, weights=osl, minlength=n)
        cached = 0.0
        if self.spec is not None and self.spec.shared_prefix:
            cached = min(0.98, (self.spec.prefix_len // 16 * 16) / max(float(isl.mean()), 1.0))
        out = np.zeros(n)
        for i in np.flatnonzero(counts):
            out[i] = self._need(pool, counts[i] / b, isl_sum[i] / counts[i], osl_sum[i] / counts[i], cached)
        return out

    def _oracle_schedule(self, pool: str) -> np.ndarray:
        need = np.minimum(self._needs(pool, self.trace), self.cfg.max_replicas)  # inf (SLO unattainable): the max
        return np.maximum(1, np.ceil(need - 1e-9)).astype(np.int64)

    def engine_config(self, model: LatencyModel) -> EngineConfig:
        """The engine config of a replica described by ``model`` (its KV-cache size and block size)."""
        max_seqs = next(iter(self.settings.values())).max_num_seqs
        return EngineConfig(
            scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_model_len=self.max_model_len),
            block_size=model.block_size(),
            num_gpu_blocks=model.num_gpu_blocks(),
            materialize_outputs=False,
        )

    def _cluster(self, replicas: dict[str, int], **variants: Any) -> Cluster:
        """A fresh cluster; ``variants``: ``Cluster``'s mixed-pool arguments (``variants``, ``variant_replicas``,
        ``variant_configs``)."""
        config = self.engine_config(self.model)
        grace = self.cfg.termination_grace_s
        from router.evaluate.dispatch import cluster_dispatchers  # the router's policy Pipeline, as it routes live

        dispatchers, _, kv_events = cluster_dispatchers(self.cfg.router_policy, self.cfg.pools == "pd",
                                                        seed=self.cfg.seed, block_size=config.block_size)  # fmt: skip
        return Cluster(self.model, config, replicas=replicas, startup_s=self.cfg.startup_s, dispatcher=dispatchers,
                       kv_events=kv_events, grace_s=grace, **variants)  # fmt: skip

    def initial(self) -> dict[str, int]:
        oracle = OracleController(self.schedules, self.cfg.oracle_bucket_s, self.cfg.startup_s)
        return {p: oracle.target(p, 0.0) for p in self.cfg.pool_names()}

    def run_policy(self, name: str) -> tuple[ClusterResult, int, float]:
        """Run one policy; returns the cluster result, its scale events and the wall seconds."""
        cfg = self.cfg
        t0 = time.perf_counter()
        pools = cfg.pool_names()
        if name == "static-peak":
            cluster = self._cluster({p: int(self.schedules[p].max()) for p in pools})
            result = cluster.run(self.trace)
            return result, 0, time.perf_counter() - t0
        init = self.initial()
        cluster = self._cluster(init)
        controller: HpaController | OracleController
        behaviors = self.hpa_behaviors(name)
        if name == "oracle":
            controller = OracleController(self.schedules, cfg.oracle_bucket_s, cfg.startup_s)
            for p in pools:  # it knows everything: its scale-downs remove the replicas with the least work left
                cluster.deletion_cost[p] = _exact_work
        elif name in KVSCALE_POLICIES:
            producers = []
            hpas = []
            for p in pools:
                policy = ScalingPolicy(self.settings[p], self.model, forecast=name != "kvscale-noforecast",
                                       wall_clock=lambda now: cfg.start_epoch_s + now)  # fmt: skip
                source = VirtualSource(cluster, p, self.settings[p], self.max_model_len)
                cluster.deletion_cost[p] = source.deletion_cost  # drain-safe scale-down: idle pods go first
                prod = KvscaleProducer(policy, source, cluster)
                producers.append(prod)
                hpas.append(Hpa(p, prod.metric, 1.0, behavior=behaviors[p] or HpaBehavior(), spec=init[p],
                                max_replicas=cfg.max_replicas))  # fmt: skip

            def before(now: float) -> None:
                for prod in producers:
                    prod(now)

            controller = HpaController(hpas, before)
        elif name == "keda-queue":
            hpas = [
                Hpa(p, self._sum_waiting(cluster, p), 5.0, behavior=behaviors[p] or HpaBehavior(), spec=init[p],
                    max_replicas=cfg.max_replicas)
                for p in pools
            ]  # fmt: skip
            controller = HpaController(hpas)
        elif name == "hpa-kv":
            hpas = [
                Hpa(p, self._avg_kv(cluster, p), 0.7, kind="pods", behavior=behaviors[p] or HpaBehavior(), spec=init[p],
                    max_replicas=cfg.max_replicas, ready=self._ready(cluster, p))
                for p in pools
            ]  # fmt: skip
            controller = HpaController(hpas)
        elif name.startswith("peer:"):
            controller = self._peer(name, cluster, init)
        else:
            raise ValueError(f"unknown policy {name!r}")
        result = cluster.run(self.trace, controller=controller)
        return result, controller.events, time.perf_counter() - t0

    def _peer(self, name: str, cluster: Cluster, init: dict[str, int]) -> Any:
        """The controller of a peer's autoscaler (scaler.evaluate.peers)."""
        from scaler.evaluate import peers

        cfg, pools = self.cfg, self.cfg.pool_names()
        if name == "peer:llm-d-wva":
            producers = [peers.WvaProducer(cluster, p, max_replicas=cfg.max_replicas) for p in pools]
            hpas = [Hpa(p, prod.metric, 1.0, behavior=peers.WVA_HPA_BEHAVIOR, spec=init[p],
                        max_replicas=cfg.max_replicas) for p, prod in zip(pools, producers, strict=True)]  # fmt: skip

            def before(now: float) -> None:
                for prod in producers:
                    prod(now)

            return HpaController(hpas, before)
        if name in ("peer:dynamo-sla", "peer:dynamo-sla-constant"):
            # Dynamo's operator gives worker pods terminationGracePeriodSeconds 60 (its graceful-shutdown docs);
            # what is still running then is cancelled
            cluster.grace_s = 60.0
            arrivals = np.array([r.arrival_s for r in self.trace])
            dcfg = peers.DynamoConfig(max_gpu_budget=cfg.max_replicas * len(pools),
                                      predictor="constant" if name.endswith("-constant") else "kalman")  # fmt: skip
            profile = peers.PerfProfile(self.model, next(iter(self.settings.values())).max_num_seqs)
            return peers.DynamoSlaPlanner(pools, profile, peers.FrontendStats(cluster, arrivals, pools),
                                          cfg.ttft_slo_ms / 1000.0, cfg.itl_slo_ms / 1000.0, dcfg)  # fmt: skip
        if name in ("peer:aibrix-kpa", "peer:aibrix-apa"):
            make = peers.AibrixKpa if name == "peer:aibrix-kpa" else peers.AibrixApa
            return peers.AibrixController([make(cluster, p, max_replicas=cfg.max_replicas) for p in pools])
        raise ValueError(f"unknown policy {name!r}")

    def hpa_behaviors(self, name: str) -> dict[str, HpaBehavior | None]:
        """The HPA behaviour a policy runs under, per pool (None: no HPA). ``kvscale`` and ``kvscale-noforecast``
        get the committed ScaledObject's (or ``EvalConfig.kvscale_hpa`` = "default": the Kubernetes defaults);
        the baselines and ``kvscale-hpa-default`` the Kubernetes defaults, as their recipes set no behaviour."""
        pools = self.cfg.pool_names()
        if name in ("static-peak", "oracle") or name.startswith(("peer:dynamo", "peer:aibrix")):
            return dict.fromkeys(pools)
        if name == "peer:llm-d-wva":
            from scaler.evaluate.peers import WVA_HPA_BEHAVIOR

            return dict.fromkeys(pools, WVA_HPA_BEHAVIOR)
        if name in ("kvscale", "kvscale-noforecast") and self.cfg.kvscale_hpa == "committed":
            return {p: self._committed[p] for p in pools}
        return {p: HpaBehavior() for p in pools}

    def reactive_attainment_bound(self, grid_s: float = 1.0) -> float:
        """Upper bound on the SLO attainment of any reactive policy without standing headroom.

        Such a policy learns of demand one signal interval after it arrives, and its new pods serve a cold start
        later. Give it every advantage: it asks exactly for the largest need seen over the last cold start
        (:class:`OracleController` with ``reaction_delay_s``); those replicas serve ``startup_s`` later and run at
        the model's *full* capacity (no ``targetUtilization`` headroom); they form one perfectly balanced queue
        that gives up at once on a request it cannot start within the TTFT SLO (no request waits behind a hopeless
        one); only TTFT counts. A fluid queue over ``grid_s`` cells counts what fails. Per pool; the bound is the
        lowest (a request needs every pool of its path). A forecaster can beat it on *predictable* load (a
        diurnal ramp); on sudden steps and bursts it is what a cold start leaves reachable.
        """
        cfg = self.cfg
        t = np.array([r.arrival_s for r in self.trace])
        isl = np.array([r.input_len for r in self.trace], dtype=np.float64)
        osl = np.array([r.output_len for r in self.trace], dtype=np.float64)
        n = math.ceil(cfg.duration_s / grid_s) + 1
        arrivals = np.bincount((t // grid_s).astype(np.int64), minlength=n).astype(np.float64)
        b = cfg.oracle_bucket_s
        bidx = (t // b).astype(np.int64)
        cnt = np.bincount(bidx)
        mean_isl = np.bincount(bidx, weights=isl) / np.maximum(cnt, 1)
        mean_osl = np.bincount(bidx, weights=osl) / np.maximum(cnt, 1)
        ttft = cfg.ttft_slo_ms / 1000.0
        late = OracleController(self.schedules, b, cfg.startup_s,
                                reaction_delay_s=next(iter(self.settings.values())).signal_interval_s)  # fmt: skip
        bound = 1.0
        for pool in cfg.pool_names():
            util = self.settings[pool].target_utilization
            q = failed = 0.0
            for k in range(n):
                now = k * grid_s
                i = min(int(now // b), len(cnt) - 1)
                per_rps = self._need(pool, 1.0, float(mean_isl[i] or isl.mean()), float(mean_osl[i] or osl.mean()))
                serving = late.target(pool, max(0.0, now - cfg.startup_s))  # asked a cold start ago
                cap_rps = serving / (per_rps * util) if per_rps > 0 else math.inf  # at full capacity
                q += arrivals[k]
                if q > cap_rps * ttft:  # what cannot start within the TTFT SLO fails, and is dropped
                    failed += q - cap_rps * ttft
                    q = cap_rps * ttft
                q = max(0.0, q - cap_rps * grid_s)
            bound = min(bound, 1.0 - float(failed) / len(self.trace))
        return float(bound)

    @staticmethod
    def _ready(cluster: Cluster, pool: str) -> Callable[[float], int]:
        def ready(now: float) -> int:
            return len(cluster.serving_replicas(pool, now))

        return ready

    @staticmethod
    def _sum_waiting(cluster: Cluster, pool: str) -> Callable[[float], float | None]:
        def metric(now: float) -> float | None:
            pods = cluster.serving_replicas(pool, now)
            return float(sum(r.synced_waiting for r in pods)) if pods else None

        return metric

    @staticmethod
    def _avg_kv(cluster: Cluster, pool: str) -> Callable[[float], float | None]:
        def metric(now: float) -> float | None:
            pods = cluster.serving_replicas(pool, now)
            return sum(r.synced_kv_usage for r in pods) / len(pods) if pods else None

        return metric

    def summarize(self, result: ClusterResult, events: int) -> dict[str, float]:
        s = result.summary()
        ttft_slo, itl_slo = self.cfg.ttft_slo_ms / 1000.0, self.cfg.itl_slo_ms / 1000.0
        return {
            "gpu_hours": s["replica_hours"] * self.cfg.gpus_per_replica,
            "slo_attainment": result.slo_attainment(ttft_slo, itl_slo),
            "ttft_p90_s": s["ttft_p90_s"],
            "ttft_p99_s": s["ttft_p99_s"],
            "itl_p90_s": s["itl_p90_s"],
            "scale_events": int(events),
            "max_replicas": max((n for _, n in _total_timeline(result, self.cfg.pool_names())), default=0),
            "requests_dropped": int(sum(1 for r in result.records if r.dropped)),
            "requests_killed_by_scale_down": int(sum(1 for r in result.records if r.killed)),
            "prefix_hit_rate": float(result.array("cached_tokens").sum() / max(result.array("input_len").sum(), 1.0)),
        } | (_per_pool(result, self.cfg.pool_names(), self.cfg.gpus_per_replica) if self.cfg.pools == "pd" else {})

    def policy_figures(self, name: str) -> dict[str, Any]:
        """One policy's run, as the results record it: its figures (with ``wall_s``), timeline and HPA."""
        result, events, wall = self.run_policy(name)
        return {
            "figures": self.summarize(result, events) | {"wall_s": wall},
            "timeline": _total_timeline(result, self.cfg.pool_names()),
            "hpa": {p: b.describe() if b is not None else "no HPA (sets replicas directly)"
                    for p, b in self.hpa_behaviors(name).items()},  # fmt: skip
        }

    def _each_policy(self, jobs: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """(name, :meth:`policy_figures`) per policy, in ``cfg.policies`` order; ``jobs`` > 1 runs them in forked
        worker processes (the policies are independent runs of one trace; a fork shares this evaluation's trace
        and models without pickling them)."""
        names = list(self.cfg.policies)
        jobs = min(jobs, len(names))
        if jobs <= 1 or "fork" not in mp.get_all_start_methods():
            for name in names:
                yield name, self.policy_figures(name)
            return
        global _FORKED
        _FORKED = self
        try:
            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
                yield from zip(names, pool.map(_forked_policy, names), strict=True)
        finally:
            _FORKED = None

    def run(self, progress: Callable[[str], None] | None = None, jobs: int = 1) -> dict[str, Any]:
        """Every policy of ``cfg.policies``; ``jobs``: how many run at once (worker processes)."""
        t0 = time.perf_counter()
        out: dict[str, Any] = {
            "trace": (self.cfg.trace_name or "trace file") if self.cfg.requests is not None else self.cfg.trace,
            "workload": "recorded" if self.cfg.requests is not None else self.cfg.workload,
            "rate_scale": self.scale,
            "router_policy": self.cfg.router_policy,
            "pools": self.cfg.pools,
            "latency_model": self.model.name,
            "rate_rps": self.rate,
            "duration_s": self.cfg.duration_s,
            "requests": len(self.trace),
            "startup_s": self.cfg.startup_s,
            "slo": {"ttft_s": self.cfg.ttft_slo_ms / 1000, "itl_s": self.cfg.itl_slo_ms / 1000,
                    "percentile": self.cfg.slo_percentile},  # fmt: skip
            "policies": {},
            "hpa": {},
            "timelines": {},
        }
        for name, r in self._each_policy(jobs):
            out["policies"][name] = r["figures"]
            out["timelines"][name] = r["timeline"]
            out["hpa"][name] = r["hpa"]
            if progress:
                progress(f"{name}: {r['figures']['wall_s']:.1f}s wall")
        out["wall_s"] = time.perf_counter() - t0
        out["jobs"] = max(1, min(jobs, len(self.cfg.policies)))
        out["load"] = _load_series(self.trace, 60.0)
        out["reactive_bound"] = {"slo_attainment": self.reactive_attainment_bound(),
                                 "reaction_s": next(iter(self.settings.values())).signal_interval_s
                                 + self.cfg.startup_s}  # fmt: skip
        return out


def _exact_work(r: Replica) -> float:
    """A replica's requests right now (the oracle's pod-deletion-cost)."""
    return float(r.engine.num_running + r.engine.num_waiting + r.admitting)


_FORKED: Evaluation | None = None  # the evaluation a forked worker inherits (set only around the pool's life)


def _forked_policy(name: str) -> dict[str, Any]:
    assert _FORKED is not None, "policy workers are forked from Evaluation._each_policy"
    return _FORKED.policy_figures(name)


def _total_timeline(result: ClusterResult, pools: tuple[str, ...]) -> list[tuple[float, int]]:
    """(time, replicas paid for across pools) at every change."""
    last = dict.fromkeys(pools, 0)
    series: list[tuple[float, int]] = []
    for t, pool, _serving, total in result.timeline:
        if pool in last:
            last[pool] = total
            series.append((t, sum(last.values())))
    return series


REVERSAL_S = 300.0  # a change of a pool's count against its previous change within this long: an oscillation


def _per_pool(result: ClusterResult, pools: tuple[str, ...], gpus: int) -> dict[str, dict[str, float]]:
    """P/D: each pool's GPU-hours, most replicas, and reversals (a change in the opposite direction of the pool's
    previous change, less than :data:`REVERSAL_S` after it: the 2 -> 1 -> 2 oscillation)."""
    out: dict[str, dict[str, float]] = {"gpu_hours_per_pool": {}, "max_replicas_per_pool": {}, "reversals_per_pool": {}}
    for pool in pools:
        counts = [(t, total) for t, p, _serving, total in result.timeline if p == pool]
        reversals, last_t, last_dir, prev = 0, -math.inf, 0, None
        for t, n in counts:
            if prev is not None and n != prev:
                direction = 1 if n > prev else -1
                if last_dir and direction != last_dir and t - last_t < REVERSAL_S:
                    reversals += 1
                last_t, last_dir = t, direction
            prev = n
        out["gpu_hours_per_pool"][pool] = result.replica_seconds.get(pool, 0.0) / 3600.0 * gpus
        out["max_replicas_per_pool"][pool] = max((n for _, n in counts), default=0)
        out["reversals_per_pool"][pool] = reversals
    return out


def _load_series(trace: list[TraceRequest], bucket_s: float) -> list[tuple[float, float]]:
    t = np.array([r.arrival_s for r in trace])
    counts = np.bincount((t // bucket_s).astype(np.int64))
    return [(i * bucket_s, c / bucket_s) for i, c in enumerate(counts.tolist())]

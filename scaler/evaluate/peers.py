"""Peers' autoscalers as evaluation policies, each from its published algorithm (our own code; sources cited).

Each one reads what it reads in production, from the virtual pods, and acts the way it acts there:

* ``peer:llm-d-wva``: llm-d's workload-variant-autoscaler, V1 saturation analyzer (:class:`WvaProducer`); it
  exports ``wva_desired_replicas``, which an HPA (``AverageValue`` 1) follows under the chart's behaviour.
* ``peer:dynamo-sla``: NVIDIA Dynamo's SLA planner in throughput mode (:class:`DynamoSlaPlanner`), Kalman load
  predictor; ``peer:dynamo-sla-constant`` with its constant predictor. It sets replica counts directly.
* ``peer:aibrix-kpa`` / ``peer:aibrix-apa``: AIBrix's KPA and APA (:class:`AibrixKpa`, :class:`AibrixApa`),
  which also set the Deployment's scale directly.

Deployment-sized parameters (replica bounds, Dynamo's GPU budget) are the evaluation's (``max_replicas``), as an
operator would set them for the cluster; every algorithm parameter keeps the peer's default.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvscale.latency import LatencyModel, prefill_attn_term
from scaler.hpa import HpaBehavior
from simulator.cluster import Cluster, Replica
from simulator.request import Request

# -- what the peers observe ---------------------------------------------------------------------------------------


class PodGauges:
    """Per-pod gauges as Prometheus would have scraped them (``vllm:kv_cache_usage_perc``,
    ``vllm:num_requests_waiting``), sampled every ``scrape_s``, kept ``keep_s``."""

    def __init__(self, cluster: Cluster, pool: str, scrape_s: float = 5.0, keep_s: float = 60.0) -> None:
        self.cluster, self.pool, self.scrape_s, self.keep_s = cluster, pool, scrape_s, keep_s
        self.samples: dict[int, deque[tuple[float, float, float]]] = {}  # (t, KV usage, waiting)
        self.next_t = 0.0

    def pods(self, now: float) -> list[Replica]:
        return self.cluster.serving_replicas(self.pool, now)

    def scrape(self, now: float) -> None:
        if now + 1e-9 < self.next_t:
            return
        self.next_t = now + self.scrape_s
        live = set()
        for r in self.pods(now):
            live.add(r.replica_id)
            q = self.samples.setdefault(r.replica_id, deque())
            q.append((now, r.synced_kv_usage, float(r.synced_waiting)))
            while q and q[0][0] < now - self.keep_s:
                q.popleft()
        for rid in list(self.samples):
            if rid not in live:
                del self.samples[rid]

    def max_over(self, rid: int, now: float, window_s: float) -> tuple[float, float]:
        """(max KV usage, max waiting) of pod ``rid`` over the last ``window_s`` (``max_over_time``)."""
        q = [s for s in self.samples.get(rid, ()) if s[0] >= now - window_s]
        return (max(s[1] for s in q), max(s[2] for s in q)) if q else (0.0, 0.0)


class FrontendStats:
    """What a frontend's request metrics give over a window: arrivals (``requests_total``), and per finished
    request TTFT, mean ITL, ISL, OSL and duration (the ``_sum``/``_count`` pairs of its histograms)."""

    def __init__(self, cluster: Cluster, arrivals: np.ndarray, pools: tuple[str, ...]) -> None:
        self.arrivals = arrivals  # sorted arrival times of the trace (only those <= now are ever counted)
        self.final = "decode" if "decode" in pools else "aggregated"
        self.done: list[tuple[float, float, float, int, int, float]] = []  # (t, ttft, itl, isl, osl, duration)
        cluster.finish_listeners.append(self._on_finish)

    def _on_finish(self, r: Replica, req: Request) -> None:
        if r.pool != self.final:
            return
        arrival = req.user.record.arrival_s
        n = req.num_output_tokens
        itl = (req.last_token_time - req.first_token_time) / (n - 1) if n > 1 else 0.0
        self.done.append((req.finish_time, req.first_token_time - arrival, itl, req.user.record.input_len, n,
                          req.finish_time - arrival))  # fmt: skip

    def window(self, now: float, window_s: float) -> dict[str, float]:
        lo = now - window_s
        n = int(np.searchsorted(self.arrivals, now, "right") - np.searchsorted(self.arrivals, lo, "left"))
        rows = [d for d in self.done if lo <= d[0] < now]
        if not rows:
            return {"num_req": float(n), "ttft": math.nan, "itl": math.nan, "isl": math.nan, "osl": math.nan,
                    "duration": math.nan}  # fmt: skip
        m = np.array(rows, dtype=np.float64).mean(axis=0)
        return {"num_req": float(n), "ttft": float(m[1]), "itl": float(m[2]), "isl": float(m[3]), "osl": float(m[4]),
                "duration": float(m[5])}  # fmt: skip


# -- llm-d workload-variant-autoscaler -----------------------------------------------------------------------------

# The chart's HPA for wva_desired_replicas (charts/workload-variant-autoscaler/values.yaml@282dbec):
# up and down 240 s stabilization, at most 10 pods per 150 s.
WVA_HPA_BEHAVIOR = HpaBehavior.from_spec(
    {d: {"stabilizationWindowSeconds": 240, "policies": [{"type": "Pods", "value": 10, "periodSeconds": 150}]}
     for d in ("scaleUp", "scaleDown")},
    "llm-d WVA chart values.yaml@282dbec",
)  # fmt: skip


@dataclass
class WvaConfig:
    """Defaults of llm-d-incubation/workload-variant-autoscaler internal/config/saturation_scaling.go@6d152fa8
    (``DefaultKvCacheThreshold`` ... ``DefaultQueueSpareTrigger``) and the chart's 60 s reconcile interval."""

    kv_cache_threshold: float = 0.80
    queue_length_threshold: float = 5.0
    kv_spare_trigger: float = 0.10
    queue_spare_trigger: float = 3.0
    interval_s: float = 60.0
    window_s: float = 60.0  # max_over_time(...[1m]) of each pod's KV usage and queue
    min_nonsaturated_for_down: int = 2


class WvaProducer:
    """llm-d WVA's V1 saturation analyzer for one pool (one variant; P/D roles are analyzed apart, as its engine
    does since @6d152fa), producing ``wva_desired_replicas``.

    From llm-d-incubation/workload-variant-autoscaler internal/saturation/analyzer.go@36587f8c and
    docs/saturation-analyzer.md@6400520b: a replica is saturated when its 1-minute peak KV usage or queue
    reaches the threshold; the spare capacity is averaged over the non-saturated replicas (0 if none); scale up by
    one when the average spare KV or queue is under its trigger; otherwise scale down by one when at least two
    replicas are non-saturated and their load spread over one replica fewer still leaves both triggers; hold
    while a previous target is not reached (the transition guard) or pods are starting.
    """

    def __init__(self, cluster: Cluster, pool: str, cfg: WvaConfig | None = None, max_replicas: int = 64) -> None:
        self.cluster, self.pool, self.cfg = cluster, pool, cfg or WvaConfig()
        self.gauges = PodGauges(cluster, pool, keep_s=self.cfg.window_s)
        self.max_replicas = max_replicas
        self.desired = 0  # 0: no target yet
        self.next_t = self.cfg.interval_s
        self.trace: list[tuple[float, int, str]] = []

    def analyze(self, now: float) -> tuple[bool, bool]:
        """(scale up, scale down is safe) from the pods' 1-minute peaks."""
        c = self.cfg
        spare_kv, spare_q = [], []
        for r in self.gauges.pods(now):
            kv, q = self.gauges.max_over(r.replica_id, now, c.window_s)
            if kv < c.kv_cache_threshold and q < c.queue_length_threshold:
                spare_kv.append(c.kv_cache_threshold - kv)
                spare_q.append(c.queue_length_threshold - q)
        n = len(spare_kv)
        avg_kv = float(np.mean(spare_kv)) if n else 0.0
        avg_q = float(np.mean(spare_q)) if n else 0.0
        up = avg_kv < c.kv_spare_trigger or avg_q < c.queue_spare_trigger
        down = False
        if not up and n >= c.min_nonsaturated_for_down:
            f = n / (n - 1)  # the load of the non-saturated replicas spread over one fewer
            kv_after = c.kv_cache_threshold - (c.kv_cache_threshold - avg_kv) * f
            q_after = c.queue_length_threshold - (c.queue_length_threshold - avg_q) * f
            down = kv_after >= c.kv_spare_trigger and q_after >= c.queue_spare_trigger
        return up, down

    def __call__(self, now: float) -> None:
        self.gauges.scrape(now)
        if now + 1e-9 < self.next_t:
            return
        self.next_t = now + self.cfg.interval_s
        current = len(self.cluster.pool_replicas(self.pool))  # the Deployment's replicas (starting ones too)
        ready = len(self.gauges.pods(now))
        if (self.desired != 0 and self.desired != current) or ready != current:
            self.desired = self.desired if self.desired not in (0, current) else current
            self.trace.append((now, self.desired, "transition"))
            return
        up, down = self.analyze(now)
        target = ready + 1 if up else ready - 1 if down and ready > 1 else ready
        self.desired = max(1, min(self.max_replicas, target))
        self.trace.append((now, self.desired, "up" if up else "down" if down else "hold"))

    def metric(self, now: float) -> float | None:
        return float(self.desired) if self.desired > 0 else None


# -- Dynamo SLA planner ---------------------------------------------------------------------------------------------


class KalmanPredictor:
    """Dynamo's ``kalman`` load predictor: a local linear trend (F = [[1, 1], [0, 1]], H = [1, 0]), P0 = 1000 I,
    Q = diag(q_level, q_trend), R = r; the first non-zero observation sets the level (leading zeros, idle time
    before the first traffic, are skipped); the forecast is the predicted level. ai-dynamo/dynamo
    components/src/dynamo/planner/utils/load_predictor.py@644b9716, defaults from defaults.py@cb44c286."""

    def __init__(self, q_level: float = 1.0, q_trend: float = 0.1, r: float = 10.0) -> None:
        self.F = np.array([[1.0, 1.0], [0.0, 1.0]])
        self.Q = np.diag([q_level, q_trend])
        self.r = r
        self.x: np.ndarray | None = None
        self.P = np.eye(2) * 1000.0

    def add(self, z: float) -> None:
        z = 0.0 if math.isnan(z) else z
        if self.x is None:
            if z == 0.0:
                return
            self.x = np.array([z, 0.0])
            return
        x = self.F @ self.x
        P = self.F @ self.P @ self.F.T + self.Q
        s = P[0, 0] + self.r
        k = P[:, 0] / s
        self.x = x + k * (z - x[0])
        self.P = P - np.outer(k, P[0, :])

    def next(self) -> float:
        return 0.0 if self.x is None else max(0.0, float((self.F @ self.x)[0]))


class ConstantPredictor:
    """Dynamo's ``constant`` load predictor: the next interval is the last one (NaN counts as 0)."""

    def __init__(self) -> None:
        self.last = 0.0

    def add(self, z: float) -> None:
        self.last = 0.0 if math.isnan(z) else z

    def next(self) -> float:
        return self.last


class PerfProfile:
    """What Dynamo's pre-deployment profiler would measure of an engine, computed from the latency model.

    Prefill: TTFT of one request of ``isl`` tokens alone (chunked by ``max_num_batched_tokens``) and its
    throughput per GPU, ``isl / ttft``. Decode: ITL at a concurrency and context, and the best throughput per GPU
    at an ITL target: the highest concurrency the KV cache (and ``max_num_seqs``) allows whose step meets it, as
    ``find_best_throughput_per_gpu`` scans KV usage from high to low (perf_interpolation.py@52787de1); if none
    does, the throughput at one sequence.
    """

    def __init__(self, model: LatencyModel, max_num_seqs: int, max_batched_tokens: int = 8192) -> None:
        self.model, self.max_num_seqs, self.chunk = model, max_num_seqs, max_batched_tokens
        self.kv_tokens = model.num_gpu_blocks() * model.block_size()

    def ttft(self, isl: float) -> float:
        n, done, t = max(1, round(isl)), 0, self.model.request_overhead_s
        while done < n:
            c = min(self.chunk, n - done)
            t += self.model.step_time(c, prefill_attn_term(c, done), 0, 0)
            done += c
        return t

    def prefill_thpt(self, isl: float) -> float:
        return max(1.0, isl) / self.ttft(isl)

    def itl(self, concurrency: float, ctx: float) -> float:
        b = max(1, round(concurrency))
        return self.model.decode_step_time(b, round(b * ctx))

    def best_decode_batch(self, itl_target: float, ctx: float) -> int:
        """The largest concurrency (KV- and ``max_num_seqs``-bound) whose decode step meets ``itl_target``; 1 if
        none does."""
        lo, hi = 1, max(1, min(self.max_num_seqs, int(self.kv_tokens // max(ctx, 1.0))))
        while lo < hi:  # the step time grows with the batch
            mid = (lo + hi + 1) // 2
            if self.itl(mid, ctx) <= itl_target:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def best_decode_thpt(self, itl_target: float, ctx: float) -> float:
        b = self.best_decode_batch(itl_target, ctx)
        return b / self.itl(b, ctx)


@dataclass
class DynamoConfig:
    """ai-dynamo/dynamo components/planner/src/dynamo/planner/defaults.py@00c13f8d (SLA planner): 180 s
    adjustment interval, min endpoint 1, one GPU per engine, corrections on. ``max_gpu_budget`` (8 there) is sized
    to the evaluation's cluster, as an operator would."""

    adjustment_interval_s: float = 180.0
    min_endpoint: int = 1
    max_gpu_budget: int = 64
    predictor: str = "kalman"  # kalman | constant (Dynamo's default ARIMA needs pmdarima, not a dependency here)
    correction: bool = True


@dataclass
class DynamoSlaPlanner:
    """Dynamo's SLA planner, throughput mode (ai-dynamo/dynamo components/planner/src/dynamo/planner/utils/
    planner_core.py@07619258, docs/architecture/sla_planner.md@19d1fc5e), as a cluster controller.

    Every adjustment interval (polled at a tenth of it): the frontend's arrivals, mean ISL/OSL, TTFT, ITL and
    request duration over the interval; one predictor each for the request count, ISL and OSL; correction factors
    ``p_cf = TTFT / profile TTFT(ISL)`` (applied as ``min(1, p_cf)``: it only ever lowers prefill demand) and
    ``d_cf = ITL / profile ITL(Little's-law concurrency per decode worker, ISL + OSL / 2)`` (the ITL target is
    divided by it); then ``prefill = ceil(N x ISL / interval x min(1, p_cf) / prefill_thpt(ISL))`` and
    ``decode = ceil(N x OSL / interval / best_decode_thpt(ITL target / d_cf, ISL + OSL / 2))``, each at least
    ``min_endpoint``, scaled down proportionally over the GPU budget; absolute targets, set directly.

    Aggregated pools: that planner is for disaggregated pools only; an aggregated engine time-shares the two
    phases, so it gets ``ceil(prefill + decode)`` of the unrounded counts (our adaptation: it is what Dynamo's
    later aggregated throughput mode computes as one engine's rate meeting both SLAs).
    """

    pools: tuple[str, ...]
    profile: PerfProfile
    frontend: FrontendStats
    ttft_slo_s: float
    itl_slo_s: float
    cfg: DynamoConfig = field(default_factory=DynamoConfig)
    events: int = 0
    trace: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.interval_s = self.cfg.adjustment_interval_s / 10
        make: Callable[[], KalmanPredictor | ConstantPredictor] = (
            KalmanPredictor if self.cfg.predictor == "kalman" else ConstantPredictor
        )
        self.pred_n, self.pred_isl, self.pred_osl = make(), make(), make()
        self.p_cf = self.d_cf = 1.0
        self.last_t = 0.0

    def tick(self, now: float, cluster: Cluster) -> None:
        interval = self.cfg.adjustment_interval_s
        if now - self.last_t < interval - 1e-9:
            return
        self.last_t = now
        w = self.frontend.window(now, interval)
        self.pred_n.add(w["num_req"])
        self.pred_isl.add(w["isl"])
        self.pred_osl.add(w["osl"])
        if any(math.isnan(w[k]) for k in ("ttft", "itl", "isl", "osl")):
            return  # "no active requests": no adjustment
        p = self.profile
        ctx_obs = w["isl"] + w["osl"] / 2
        final = "decode" if "decode" in self.pools else "aggregated"
        n_dec = max(1, len(cluster.pool_replicas(final)))
        if self.cfg.correction:
            self.p_cf = w["ttft"] / p.ttft(w["isl"])
            conc = w["num_req"] / n_dec * w["duration"] / interval
            self.d_cf = w["itl"] / p.itl(max(conc, 1.0), ctx_obs)
        n, isl, osl = self.pred_n.next(), self.pred_isl.next(), self.pred_osl.next()
        if n <= 0 or isl <= 0 or osl <= 0:
            need_p = need_d = 0.0
        else:
            need_p = n * isl / interval * min(1.0, self.p_cf) / p.prefill_thpt(isl)
            target = self.itl_slo_s / self.d_cf if self.d_cf > 0 else self.itl_slo_s
            need_d = n * osl / interval / p.best_decode_thpt(target, isl + osl / 2)
        lo, budget = self.cfg.min_endpoint, self.cfg.max_gpu_budget
        if "decode" in self.pools:
            num_p, num_d = max(lo, math.ceil(need_p)), max(lo, math.ceil(need_d))
            if num_p + num_d > budget:
                s = budget / (num_p + num_d)
                num_p = max(lo, round(num_p * s))
                num_d = max(lo, round(budget - num_p))
            targets = {"prefill": num_p, "decode": num_d}
        else:
            targets = {"aggregated": min(budget, max(lo, math.ceil(need_p + need_d - 1e-9)))}
        self.trace.append((now, targets))
        for pool, k in targets.items():
            if k != len(cluster.pool_replicas(pool)):
                self.events += 1
                cluster.set_replicas(pool, k, now)


# -- AIBrix KPA and APA ----------------------------------------------------------------------------------------------


@dataclass
class AibrixConfig:
    """AIBrix PodAutoscaler defaults of the stateful, Knative-port generation (v0.1-v0.3, the one its published
    experiment ran on): vllm-project/aibrix pkg/controller/podautoscaler/scaler/kpa.go@ccdda043 (max scale-up and
    -down rate 2 from the base context, panic threshold 2.0, stable window 60 s, panic window 10 s, scale-down
    delay 30 min), scaler/apa.go@4261937d (fluctuation tolerance 0.1 up / 0.2 down, window 60 s), a 10 s resync;
    on the metric and target of AIBrix's autoscaler experiment (docs: ``gpu_cache_usage_perc``, now
    ``kv_cache_usage_perc``, 0.5 per pod). The later stateless rewrite (v0.4+) changed windows and dropped the
    panic memory; it is not what these implement."""

    target: float = 0.5
    max_scale_up_rate: float = 2.0
    max_scale_down_rate: float = 2.0
    up_tolerance: float = 0.1
    down_tolerance: float = 0.2
    panic_threshold: float = 2.0
    stable_window_s: float = 60.0
    panic_window_s: float = 10.0
    scale_down_delay_s: float = 1800.0
    tick_s: float = 10.0


class _AibrixBase:
    """The shared part: one sample per tick of the pool's total metric (the pods' KV usage summed), replica
    bounds; subclasses give :meth:`desired`."""

    def __init__(self, cluster: Cluster, pool: str, cfg: AibrixConfig | None = None, max_replicas: int = 64) -> None:
        self.cluster, self.pool, self.cfg, self.max_replicas = cluster, pool, cfg or AibrixConfig(), max_replicas
        self.samples: deque[tuple[float, float]] = deque()

    def ready(self, now: float) -> int:
        return len(self.cluster.serving_replicas(self.pool, now))

    def sample(self, now: float, pods: list[Replica]) -> None:
        self.samples.append((now, sum(r.synced_kv_usage for r in pods)))
        while self.samples and self.samples[0][0] <= now - self.cfg.stable_window_s:
            self.samples.popleft()

    def mean_over(self, now: float, window_s: float) -> float:
        vals = [v for t, v in self.samples if t > now - window_s]
        return float(np.mean(vals)) if vals else 0.0

    def desired(self, now: float, ready: int) -> int:
        raise NotImplementedError

    def step(self, now: float) -> int | None:
        """The replica count to set now, or None to leave the Deployment as it is."""
        pods = self.cluster.serving_replicas(self.pool, now)
        self.sample(now, pods)
        current = len(self.cluster.pool_replicas(self.pool))
        want = max(1, min(self.max_replicas, self.desired(now, len(pods))))
        return None if want == current else want


class AibrixKpa(_AibrixBase):
    """AIBrix's KPA (vllm-project/aibrix pkg/controller/podautoscaler/scaler/kpa.go@ccdda043, a port of Knative's):
    desired = ceil(window mean of the total / target) over the stable and the panic window, each kept within
    [floor(ready / maxScaleDownRate), ceil(maxScaleUpRate x ready)]; panic when the panic-window count reaches
    ``panic_threshold`` x ready (and from the start with more than one pod); in panic the larger of the two counts,
    never lower than the highest count asked in this panic; panic ends a stable window after the threshold was
    last crossed; finally the scale-down delay: the highest count of the last ``scale_down_delay_s``."""

    def __init__(self, cluster: Cluster, pool: str, cfg: AibrixConfig | None = None, max_replicas: int = 64) -> None:
        super().__init__(cluster, pool, cfg, max_replicas)
        start = self.ready(0.0)
        self.panic_since: float | None = 0.0 if start > 1 else None
        self.max_panic_pods = start
        self.delay: deque[tuple[float, int]] = deque()  # (t, count) over the scale-down delay

    def desired(self, now: float, ready_pods: int) -> int:
        c = self.cfg
        ready = max(1, ready_pods)
        up, down = max(1, math.ceil(c.max_scale_up_rate * ready)), math.floor(ready / c.max_scale_down_rate)
        dspc = math.ceil(self.mean_over(now, c.stable_window_s) / c.target - 1e-9)
        dppc = math.ceil(self.mean_over(now, c.panic_window_s) / c.target - 1e-9)
        stable, panic = min(max(dspc, down), up), min(max(dppc, down), up)
        if dppc / ready >= c.panic_threshold:
            self.panic_since = now
        elif self.panic_since is not None and self.panic_since + c.stable_window_s < now:
            self.panic_since, self.max_panic_pods = None, 0
        want = stable
        if self.panic_since is not None:  # no scale-down in panic mode
            self.max_panic_pods = max(self.max_panic_pods, max(stable, panic))
            want = self.max_panic_pods
        if c.scale_down_delay_s > 0:
            self.delay.append((now, want))
            while self.delay[0][0] <= now - c.scale_down_delay_s:
                self.delay.popleft()
            want = max(n for _, n in self.delay)
        return want


class AibrixApa(_AibrixBase):
    """AIBrix's APA (vllm-project/aibrix pkg/controller/podautoscaler/scaler/apa.go@4261937d and
    algorithm/apa.go): the per-pod use, the stable-window mean of the total over the ready pods, against the
    target; above ``1 + up_tolerance`` x target: ceil(ready x ratio), at most ceil(maxScaleUpRate x ready); below
    ``1 - down_tolerance``: ceil(ready x ratio), at least floor(ready / maxScaleDownRate); otherwise unchanged.
    No panic mode, no delay."""

    def desired(self, now: float, ready_pods: int) -> int:
        c = self.cfg
        if ready_pods == 0:
            return len(self.cluster.pool_replicas(self.pool))  # APA refuses to scale on zero ready pods
        ratio = self.mean_over(now, c.stable_window_s) / ready_pods / c.target
        if ratio > 1 + c.up_tolerance:
            return min(math.ceil(ready_pods * ratio), math.ceil(c.max_scale_up_rate * ready_pods))
        if ratio < 1 - c.down_tolerance:
            return max(math.ceil(ready_pods * ratio), math.floor(ready_pods / c.max_scale_down_rate))
        return ready_pods


class AibrixController:
    """AIBrix's PodAutoscaler controller: each pool's scaler reconciled every ``tick_s``; sets the Deployment's
    scale directly (no HPA)."""

    def __init__(self, scalers: list[_AibrixBase]) -> None:
        self.scalers = scalers
        self.interval_s = scalers[0].cfg.tick_s
        self.events = 0

    def tick(self, now: float, cluster: Cluster) -> None:
        for s in self.scalers:
            n = s.step(now)
            if n is not None:
                self.events += 1
                cluster.set_replicas(s.pool, n, now)

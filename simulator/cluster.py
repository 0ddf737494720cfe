"""Virtual-clock driver: N replicas of the engine core, a trace, a dispatcher and an outside controller.

Time advances only through the event queue, as in Vidur (microsoft/vidur): each event has a kind (arrival,
decode leg, admit, wake, sync, control, ready; the constants below say what each means) and each kind one small
handler, ``Cluster._on_<kind>``, found through a dispatch table. A replica's engine is advanced lazily up to the
time of an event that concerns it, so pure-decode stretches between events run in closed form (see
``EngineCore.advance``).

What a dispatcher sees, like a real router (:class:`Dispatcher`): the request as a :class:`DispatchRequest`
(prompt token ids when the trace has them, input/output length, arrival time) and each candidate as a
:class:`ReplicaView`: its name, pool and role, the dispatcher's own in-flight count (completions become known at
the next state sync, every ``sync_interval_s``) and engine stats (running, waiting, KV usage) as of that sync.
Nothing of the engine itself, so a router's policy chooses here as it does between real endpoints. The simulator
has no dispatcher of its own: the caller passes one, in practice the router's policy ``Pipeline`` through
``router.evaluate.dispatch`` (one policy object, two drivers).

Replica lifecycle: ``set_replicas(pool, n)`` starts replicas that serve after ``startup_s`` (the cold start) or
drains surplus ones (no new requests, deleted when idle). Which ones drain is the Kubernetes ReplicaSet's choice
(:func:`deletion_order`: starting pods first, then the lowest ``controller.kubernetes.io/pod-deletion-cost``, which
a controller may set through :attr:`Cluster.deletion_cost`, then the most recently ready). With ``grace_s`` (the
pod's ``terminationGracePeriodSeconds``) whatever a draining replica still holds when the grace period ends is
killed (``RequestRecord.killed``), as the kubelet's SIGKILL does. Replica-seconds count from start to deletion.

P/D: with ``prefill`` and ``decode`` pools, a request is prefilled on a prefill replica (its first token
discarded, as llm-d does), then decoded on a decode replica, which pays the modelled KV transfer. The prefill
replica's blocks are released when the decode leg is dispatched.

A fitted latency model's ``request_overhead_s`` (the pod's API server: per-request time outside the engine step)
delays each request's admission to the engine it was dispatched to, so TTFT includes it and the engine does not.

Per request we record TTFT, E2E and TPOT (the mean inter-token latency, ``(last - first) / (n - 1)``); the
per-token ITL distribution is kept as a histogram (each decode step contributes its duration once per sequence).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kvscale.histogram import LogHistogram
from kvscale.latency import LatencyModel
from kvscale.traces.format import TraceRequest
from kvscale.traces.prompts import BlockPrompt, PrefixBlocks
from simulator.engine import EngineConfig, EngineCore, StepOutput
from simulator.request import Request, SyntheticPrompt

POOLS = ("aggregated", "prefill", "decode")
# A pool's replicas have the role a router gives such an endpoint (router.backends.ROLES).
ROLE_OF_POOL = {"aggregated": "both", "prefill": "prefill", "decode": "decode"}

# Event kinds; each has a handler ``Cluster._on_<kind>`` (payload in brackets).
ARRIVAL = "arrival"  # a trace request reaches the router [its _Tracked]
DECODE_LEG = "decode_leg"  # P/D: a prefill leg finished, its decode leg is dispatched [(_Tracked, prefill Request)]
ADMIT = "admit"  # a request leaves the pod's API server for the engine [(Replica, Request)]
WAKE = "wake"  # a prefill replica's step boundary [Replica]
SYNC = "sync"  # the dispatchers' view of every replica is refreshed [None]
CONTROL = "control"  # a controller tick [Controller]
READY = "ready"  # a replica finished starting; the router's backlog is dispatched [Replica]
KILL = "kill"  # a draining replica's grace period ended: what it still holds is killed [Replica]


# -- what a dispatcher sees ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class ReplicaView:
    """One replica as a router sees an endpoint: identity, role, its own in-flight count, engine stats as of the
    last state sync. The cluster owns and updates it; a dispatcher reads it and returns one of the candidates."""

    replica_id: int
    name: str  # a stable endpoint name, e.g. "decode-3" (unique within a cluster)
    pool: str  # aggregated | prefill | decode
    role: str  # as a router calls it: both | prefill | decode
    in_flight: int = 0  # dispatched minus completions known at the last sync (the dispatcher's own count)
    running: int = 0  # engine stats as of the last sync
    waiting: int = 0
    kv_usage: float = 0.0
    synced_s: float | None = None  # when those stats were read (None: not yet)
    variant: str = ""  # a mixed pool: the replica's variant as its pods' label names it (its latency model's spec)


@dataclass(slots=True)
class DispatchRequest:
    """A request as a router sees it when choosing a replica."""

    request_id: str  # the engine request's id ("7", or "7-d" for the decode leg of request 7 under P/D)
    arrival_s: float  # when the client sent it (the trace's arrival)
    input_len: int
    output_len: int
    prompt_token_ids: list[int] | None  # when the trace has concrete ids (otherwise synthetic: lengths only)
    session: str | None = None  # the conversation id of a recorded trace
    decode_leg: bool = False  # P/D: the decode leg (its prefill ran on a prefill replica)
    block_prompt: BlockPrompt | None = None  # a prefix-block trace's prompt (token ids and hashes on demand)


class Dispatcher(Protocol):
    """Chooses the replica for a request among the serving replicas of one pool (never empty)."""

    def choose(self, req: DispatchRequest, candidates: Sequence[ReplicaView], now: float) -> ReplicaView: ...


# -- the cluster's own state ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class Replica:
    """A replica and its engine (the cluster's internals; dispatchers see only :attr:`view`)."""

    replica_id: int
    pool: str
    engine: EngineCore
    created_s: float
    ready_s: float
    view: ReplicaView = field(init=False)
    draining: bool = False
    deleted_s: float | None = None
    killed: int = 0  # requests killed when its grace period ended
    next_wake: float = -1.0
    admitting: int = 0  # dispatched requests still in the API server's per-request overhead (not in the engine)
    variant: str = ""  # a mixed pool (Cluster(variants=...)): which variant, i.e. which latency model

    def __post_init__(self) -> None:
        self.view = ReplicaView(self.replica_id, f"{self.pool}-{self.replica_id}", self.pool, ROLE_OF_POOL[self.pool])

    def serving(self, now: float) -> bool:
        return self.deleted_s is None and not self.draining and now >= self.ready_s

    @property
    def in_flight(self) -> int:
        """As the dispatcher counts it (dispatched minus completions known at the last sync)."""
        return self.view.in_flight

    @property
    def synced_running(self) -> int:
        return self.view.running

    @property
    def synced_waiting(self) -> int:
        return self.view.waiting

    @property
    def synced_kv_usage(self) -> float:
        return self.view.kv_usage


class Controller(Protocol):
    """Called every ``interval_s`` of virtual time; may call ``cluster.set_replicas``."""

    interval_s: float

    def tick(self, now: float, cluster: Cluster) -> None: ...


@dataclass(slots=True)
class RequestRecord:
    arrival_s: float
    input_len: int
    output_len: int
    cached_tokens: int = 0
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    tpot_s: float = math.nan
    replica: int = -1
    dropped: bool = False  # no serving replica at arrival and none came up before the end
    killed: bool = False  # still on a replica when its termination grace period ended (scale-down)


@dataclass
class ClusterResult:
    records: list[RequestRecord]
    replica_seconds: dict[str, float]
    timeline: list[tuple[float, str, int, int]]  # (time, pool, serving, total incl. starting/draining)
    itl: LogHistogram
    wall_steps: int
    end_s: float
    variant_seconds: dict[str, float] = field(default_factory=dict)  # a mixed pool: replica-seconds per variant

    def array(self, name: str) -> np.ndarray:
        return np.array([getattr(r, name) for r in self.records], dtype=np.float64)

    def slo_attainment(self, ttft_slo_s: float, itl_slo_s: float) -> float:
        """Fraction of requests that finished and met both the TTFT and the (mean) ITL SLO."""
        if not self.records:
            return math.nan
        ttft, tpot = self.array("ttft_s"), self.array("tpot_s")
        ok = (ttft <= ttft_slo_s) & (np.nan_to_num(tpot, nan=0.0) <= itl_slo_s) & ~np.isnan(self.array("e2e_s"))
        return float(ok.mean())

    def summary(self) -> dict[str, float]:
        ttft, e2e = self.array("ttft_s"), self.array("e2e_s")
        done = ~np.isnan(e2e)

        def pct(a: np.ndarray, q: float) -> float:
            ok = a[~np.isnan(a)]
            return float(np.percentile(ok, q)) if ok.size else math.nan

        return {
            "requests": float(len(self.records)),
            "completed": float(done.sum()),
            "ttft_p50_s": pct(ttft, 50),
            "ttft_p90_s": pct(ttft, 90),
            "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(self.array("tpot_s"), 50),
            "itl_p50_s": self.itl.quantile(0.5),
            "itl_p90_s": self.itl.quantile(0.9),
            "e2e_p50_s": pct(e2e, 50),
            "replica_hours": sum(self.replica_seconds.values()) / 3600.0,
        }


@dataclass(slots=True)
class _Tracked:
    record: RequestRecord
    trace: TraceRequest
    record_id: int
    decode_leg: bool = False
    origin: Replica | None = None


def deletion_order(replicas: Sequence[Replica], now: float, cost: Callable[[Replica], float] | None = None
                   ) -> list[Replica]:  # fmt: skip
    """``replicas`` in the order a ReplicaSet deletes pods on scale-down (first = deleted first).

    Kubernetes' ``ActivePodsWithRanks.Less`` (kubernetes/kubernetes, pkg/controller/controller_utils.go, commit
    1f8996f8), for running pods of one node each: not ready (still starting) before ready; lower
    ``pod-deletion-cost`` (``cost``; 0 when unset) first; then, with ``LogarithmicScaleDown`` (on since 1.22),
    ready for less time first compared on ``floor(log2(ns ready))``, ties broken by UID (pseudo-random; here a
    fixed hash of the replica id); pods not ready compare their creation time the same way.
    """

    def log_rank(since: float) -> int:
        d_ns = (now - since) * 1e9
        return int(math.log2(d_ns)) if d_ns > 0 else -1

    def key(r: Replica) -> tuple[bool, float, int, int]:
        ready = r.ready_s <= now
        c = cost(r) if cost is not None else 0.0
        uid = (r.replica_id * 2654435761) & 0xFFFFFFFF
        return ready, c, log_rank(r.ready_s if ready else r.created_s), uid

    return sorted(replicas, key=key)


# An event on the queue: (time, order, kind, payload). ``order`` (a counter) makes ties pop first-in first-out and
# keeps the comparison off kind and payload; plain tuples keep the heap fast (millions of events per run).
_Event = tuple[float, int, str, Any]


class Cluster:
    def __init__(
        self,
        latency: LatencyModel,
        engine_config: EngineConfig | None = None,
        *,
        replicas: dict[str, int] | None = None,
        startup_s: float = 0.0,
        dispatcher: Dispatcher | dict[str, Dispatcher],
        sync_interval_s: float = 0.2,
        fast_forward: bool = True,
        backlog_wait_s: float = 3600.0,
        kv_events: bool = False,
        grace_s: float | None = None,
        variants: dict[str, LatencyModel] | None = None,
        variant_replicas: dict[str, int] | None = None,
        variant_configs: dict[str, EngineConfig] | None = None,
        variant_labels: dict[str, str] | None = None,
    ) -> None:
        """``variants``: a mixed aggregated pool, variant name -> its latency model (replicas of each are scaled
        with ``set_replicas(pool, n, variant=name)``, dispatched to as one pool); ``variant_replicas``: how many of
        each are ready at the start (instead of ``replicas``); ``variant_configs``: a variant's own engine config
        (its GPU's KV-cache size), default ``engine_config``; ``variant_labels``: what a router sees of a variant
        (its view's ``variant``: the latency-model label of its pods), default the variant's name."""
        self.latency = latency
        self.variants = dict(variants or {})
        self.variant_configs = dict(variant_configs or {})
        self.variant_labels = dict(variant_labels or {})
        self.grace_s = grace_s  # terminationGracePeriodSeconds; None: a draining replica finishes all it holds
        # Per pool, the pod-deletion-cost a controller keeps on its pods (default: unset, 0 for all)
        self.deletion_cost: dict[str, Callable[[Replica], float]] = {}
        self.kv_events = kv_events  # engines record KV events; dispatchers with observe_kv_events get them at sync
        self.engine_config = engine_config or EngineConfig(materialize_outputs=False)
        self.startup_s = startup_s
        self.sync_interval_s = sync_interval_s
        self.fast_forward = fast_forward
        self.backlog_wait_s = backlog_wait_s
        initial = replicas or {"aggregated": 1}
        bad = set(initial) - set(POOLS)
        if bad:
            raise ValueError(f"unknown pool(s) {sorted(bad)}; pools are {POOLS}")
        if ("prefill" in initial) != ("decode" in initial):
            raise ValueError("P/D needs both a prefill and a decode pool")
        self.pd = "prefill" in initial
        self.dispatchers = dispatcher if isinstance(dispatcher, dict) else dict.fromkeys(initial, dispatcher)
        missing = set(initial) - set(self.dispatchers)
        if missing:
            raise ValueError(f"no dispatcher for pool(s) {sorted(missing)}")
        # Dispatchers that follow the engines' KV events (a router's KV-event index): observe_kv_events(now, view,
        # events) at each sync, with what each replica's engine published since the last one.
        self._kv_listeners = list({id(d): d for d in self.dispatchers.values()
                                   if hasattr(d, "observe_kv_events")}.values())  # fmt: skip
        # Dispatchers that follow their requests to the end, as a router sees each response finish:
        # observe_finish(view, request) when a request (or a P/D leg) it dispatched finishes on that replica
        self._finish_listeners = list({id(d): d for d in self.dispatchers.values()
                                       if hasattr(d, "observe_finish")}.values())  # fmt: skip
        self.replicas: list[Replica] = []
        self._ids = itertools.count()
        self._events: list[_Event] = []
        self._order = itertools.count()
        self.timeline: list[tuple[float, str, int, int]] = []
        self.itl = LogHistogram()
        self._backlog: dict[str, list[_Tracked]] = {p: [] for p in POOLS}
        self._now = 0.0
        self._prefix_blocks = PrefixBlocks()  # expands prefix-block traces' prompts, caching their chain hashes
        self._horizon = 0.0  # run(): the time up to which sync and control events keep coming regardless
        self._controlled = False  # run(): a controller ticks
        self._handlers: dict[str, Callable[[float, Any], None]] = {
            ARRIVAL: self._on_arrival,
            DECODE_LEG: self._on_decode_leg,
            ADMIT: self._on_admit,
            WAKE: self._on_wake,
            SYNC: self._on_sync,
            CONTROL: self._on_control,
            READY: self._on_ready,
            KILL: self._on_kill,
        }
        # Called as fn(replica, request) when a request (or a P/D prefill leg) finishes on a replica, e.g. to keep
        # per-replica request counters and latency histograms like a real engine's /metrics.
        self.finish_listeners: list[Callable[[Replica, Request], None]] = []
        if variant_replicas:
            unknown = set(variant_replicas) - set(self.variants)
            if unknown or self.pd:
                raise ValueError(f"variant_replicas: unknown variant(s) {sorted(unknown)} (or a P/D cluster)")
            for v, n in variant_replicas.items():
                for _ in range(n):
                    self._start_replica("aggregated", 0.0, ready_now=True, variant=v)
        else:
            for pool, n in initial.items():
                for _ in range(n):
                    self._start_replica(pool, 0.0, ready_now=True)
        self._record_timeline(0.0)

    # -- replicas ------------------------------------------------------------------------------------------------
    def latency_of(self, r: Replica) -> LatencyModel:
        return self.variants[r.variant] if r.variant else self.latency

    def _start_replica(self, pool: str, now: float, *, ready_now: bool = False, variant: str = "") -> Replica:
        if variant and variant not in self.variants:
            raise ValueError(f"unknown variant {variant!r} (variants: {sorted(self.variants)})")
        model = self.variants[variant] if variant else self.latency
        config = self.variant_configs.get(variant, self.engine_config)
        engine = EngineCore(config, model, record_events=self.kv_events)
        ready = now if ready_now else now + self.startup_s
        r = Replica(next(self._ids), pool, engine, created_s=now, ready_s=ready, variant=variant)
        r.view.variant = self.variant_labels.get(variant, variant)  # what a router sees: its pods' model label
        self.replicas.append(r)  # at index replica_id (ids count from 0; replicas are never removed)
        if not ready_now:
            self._push(ready, READY, r)  # also when startup_s is 0: the router backlog is flushed then
        return r

    def pool_replicas(self, pool: str, *, include_draining: bool = False, variant: str | None = None) -> list[Replica]:
        """The pool's live replicas (of one ``variant`` when given; a mixed pool's variants are Deployments)."""
        return [
            r for r in self.replicas if r.pool == pool and r.deleted_s is None and (include_draining or not r.draining)
            and (variant is None or r.variant == variant)
        ]  # fmt: skip

    def serving_replicas(self, pool: str, now: float, variant: str | None = None) -> list[Replica]:
        """The pool's replicas that take requests at ``now``: started, ready, not draining (what an Endpoints
        controller lists, and what a scraper of the pool's pods reads); of one ``variant`` when given."""
        return [r for r in self.replicas
                if r.pool == pool and r.serving(now) and (variant is None or r.variant == variant)]  # fmt: skip

    def set_replicas(self, pool: str, n: int, now: float | None = None, variant: str | None = None) -> None:
        """Scale a pool (or one ``variant`` of a mixed pool: its own Deployment) to ``n`` replicas (starting ones
        count); surplus ones drain in :func:`deletion_order`."""
        now = self._now if now is None else now
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}")
        n = max(0, int(n))
        live = self.pool_replicas(pool, variant=variant)
        if n > len(live):
            # undrain first (a pod being deleted cannot come back in Kubernetes, so we start new ones)
            for _ in range(n - len(live)):
                self._start_replica(pool, now, variant=variant or "")
        elif n < len(live):
            for r in deletion_order(live, now, self.deletion_cost.get(pool))[: len(live) - n]:
                r.draining = True
                self._maybe_delete(r, now)
                if r.deleted_s is None and self.grace_s is not None:
                    self._push(now + self.grace_s, KILL, r)
        self._record_timeline(now)

    def _maybe_delete(self, r: Replica, now: float) -> None:
        if r.draining and r.deleted_s is None and not r.admitting and not r.engine.has_work():
            r.deleted_s = max(now, r.engine.busy_until)

    def _record_timeline(self, now: float) -> None:
        for pool in dict.fromkeys(r.pool for r in self.replicas):  # a fixed order (a set's follows the hash seed)
            serving = sum(1 for r in self.replicas if r.pool == pool and r.serving(now))
            total = sum(1 for r in self.replicas if r.pool == pool and r.deleted_s is None)
            self.timeline.append((now, pool, serving, total))

    # -- events --------------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(self._events, (t, next(self._order), kind, payload))

    def _advance(self, r: Replica, t: float) -> None:
        for out in r.engine.advance(r.engine.busy_until, t, fast_forward=self.fast_forward):
            self._harvest(r, out)
        self._schedule_wake(r)

    def _schedule_wake(self, r: Replica) -> None:
        """A prefill replica is stepped at every step boundary so that each finished prefill hands its decode leg
        over exactly when it finishes (not at the next sync)."""
        if r.pool == "prefill" and r.engine.has_work():
            t = max(r.engine.busy_until, self._now)
            if t > r.next_wake:
                r.next_wake = t
                self._push(t, WAKE, r)

    def _harvest(self, r: Replica, out: StepOutput) -> None:
        if out.itl_tokens:  # each such token's gap is its step's duration (the engine steps back to back)
            if out.num_steps == 1:
                self.itl.add(out.end - out.start, out.itl_tokens)
            else:  # every sequence decodes in every step of a fast-forwarded run
                self.itl.add_many(out.step_durations(), out.itl_tokens / out.num_steps)
        for req in out.finished:
            for listener in self.finish_listeners:
                listener(r, req)
            for d in self._finish_listeners:
                d.observe_finish(r.view, req)
            tr = req.user
            rec = tr.record
            if r.pool == "prefill":
                self._dispatch_decode_leg(r, req, tr)
                continue
            rec.e2e_s = req.finish_time - rec.arrival_s
            rec.ttft_s = req.first_token_time - rec.arrival_s
            n = req.num_output_tokens
            rec.tpot_s = (req.last_token_time - req.first_token_time) / (n - 1) if n > 1 else 0.0
            if rec.cached_tokens == 0:
                rec.cached_tokens = max(req.num_cached_tokens, 0)

    def _dispatch_decode_leg(self, prefill: Replica, req: Request, tr: _Tracked) -> None:
        tr.record.cached_tokens = max(req.num_cached_tokens, 0)
        leg = _Tracked(tr.record, tr.trace, tr.record_id, decode_leg=True, origin=prefill)
        self._push(max(req.finish_time, self._now), DECODE_LEG, (leg, req))

    def _candidates(self, pool: str, now: float) -> list[ReplicaView]:
        return [r.view for r in self.replicas if r.pool == pool and r.serving(now)]

    def _submit(self, pool: str, tr: _Tracked, now: float, prefill_req: Request | None = None) -> None:
        cands = self._candidates(pool, now)
        if not cands:
            self._backlog[pool].append(tr)  # waits at the router for a replica (scale from zero)
            return
        t = tr.trace
        rid = f"{tr.record_id}-d" if tr.decode_leg else str(tr.record_id)
        blocks = None
        if t.prefix_blocks is not None and t.prefix_block_tokens is not None:
            blocks = BlockPrompt(t.prefix_blocks, t.prefix_block_tokens, t.input_len, tr.record_id, self._prefix_blocks)
        seen = DispatchRequest(rid, t.arrival_s, t.input_len, t.output_len, t.prompt_tokens, t.session, tr.decode_leg,
                               blocks)  # fmt: skip
        r = self.replicas[self.dispatchers[pool].choose(seen, cands, now).replica_id]
        self._advance(r, now)
        room = self.engine_config.scheduler.max_model_len - t.input_len
        if room < 1:  # a real server answers 400; the trace generator should not produce these
            tr.record.dropped = True
            rejected = getattr(self.dispatchers[pool], "observe_rejected", None)
            if rejected is not None:
                rejected(rid)
            return
        prompt = (t.prompt_tokens if t.prompt_tokens is not None else blocks if blocks is not None
                  else SyntheticPrompt(t.input_len, tr.record_id))  # fmt: skip
        req = Request(
            request_id=rid,
            prompt_token_ids=prompt,
            max_tokens=1 if pool == "prefill" else min(t.output_len, room),
            arrival_time=now,
            do_remote_decode=pool == "prefill",
            remote_prefill={"from": tr.origin.replica_id} if tr.decode_leg and tr.origin else None,
            user=tr,
        )
        if tr.decode_leg and prefill_req is not None and tr.origin is not None:
            tr.origin.engine.release_held(prefill_req.request_id)
        tr.record.replica = r.replica_id
        r.view.in_flight += 1
        overhead = self.latency_of(r).request_overhead_s
        if overhead > 0:  # the pod's API server holds the request first; the engine keeps stepping meanwhile
            r.admitting += 1
            self._push(now + overhead, ADMIT, (r, req))
        else:
            self._admit(r, req, now)

    def _admit(self, r: Replica, req: Request, now: float) -> None:
        self._advance(r, now)
        # arrival_time as vLLM's API server sets it (after HTTP), for finish listeners' engine-side TTFT
        r.engine.add_request(req, now, arrival_time=req.arrival_time + self.latency_of(r).client_overhead_s)
        self._schedule_wake(r)

    def _sync(self, now: float) -> None:
        for r in self.replicas:
            if r.deleted_s is not None:
                continue
            self._advance(r, now)
            e, v = r.engine, r.view
            v.in_flight = e.num_running + e.num_waiting + r.admitting
            v.running, v.waiting, v.kv_usage, v.synced_s = e.num_running, e.num_waiting, e.kv.usage, now
            if self.kv_events:
                events = e.kv.drain_events()
                if events:
                    for d in self._kv_listeners:
                        d.observe_kv_events(now, v, events)
            self._maybe_delete(r, now)

    def run(
        self,
        trace: Iterable[TraceRequest],
        *,
        controller: Controller | None = None,
        until_s: float | None = None,
        drain: bool = True,
    ) -> ClusterResult:
        """Replay ``trace`` (sorted by arrival). Without ``until_s``, runs until every request finished."""
        trace = list(trace)
        records = [RequestRecord(t.arrival_s, t.input_len, t.output_len) for t in trace]
        for i, (t, rec) in enumerate(zip(trace, records, strict=True)):
            self._push(t.arrival_s, ARRIVAL, _Tracked(rec, t, i))
        last_arrival = trace[-1].arrival_s if trace else 0.0
        self._horizon = until_s if until_s is not None else last_arrival
        self._controlled = controller is not None
        self._push(self.sync_interval_s, SYNC)
        if controller is not None:
            self._push(controller.interval_s, CONTROL, controller)
        events, handlers, pop = self._events, self._handlers, heapq.heappop
        end = 0.0  # the last event's time, not counting grace-period ends (they change nothing once idle)
        while events:
            t, _, kind, payload = pop(events)
            if until_s is not None and t > until_s:
                break
            self._now = t
            handlers[kind](t, payload)
            if kind is not KILL:
                end = t
        if drain and until_s is None:
            for r in self.replicas:
                if r.deleted_s is None:
                    self._advance(r, math.inf)
                    end = max(end, r.engine.busy_until)
        for waiting in self._backlog.values():
            for tr in waiting:
                tr.record.dropped = True
        rs: dict[str, float] = {}
        vs: dict[str, float] = {}
        for r in self.replicas:
            stop = r.deleted_s if r.deleted_s is not None else end
            rs[r.pool] = rs.get(r.pool, 0.0) + max(0.0, stop - r.created_s)
            if r.variant:
                vs[r.variant] = vs.get(r.variant, 0.0) + max(0.0, stop - r.created_s)
        steps = sum(r.engine.num_steps for r in self.replicas)
        return ClusterResult(records, rs, self.timeline, self.itl, steps, end, vs)

    # -- event handlers: one per kind, called at the event's time ------------------------------------------------
    def _on_arrival(self, now: float, tr: _Tracked) -> None:
        self._submit(self._entry_pool(), tr, now)

    def _on_decode_leg(self, now: float, payload: tuple[_Tracked, Request]) -> None:
        leg, prefill_req = payload
        self._submit("decode", leg, now, prefill_req)

    def _on_admit(self, now: float, payload: tuple[Replica, Request]) -> None:
        r, req = payload
        r.admitting -= 1
        if r.deleted_s is not None:  # killed while in the pod's API server
            req.user.record.killed = True
            r.killed += 1
            return
        self._admit(r, req, now)

    def _on_wake(self, now: float, r: Replica) -> None:
        if r.deleted_s is None:
            self._advance(r, math.nextafter(now, math.inf))

    def _on_sync(self, now: float, _: None) -> None:
        self._sync(now)
        if now < self._horizon or self._busy(now, self._horizon, self._controlled):
            self._push(now + self.sync_interval_s, SYNC)

    def _on_control(self, now: float, controller: Controller) -> None:
        controller.tick(now, self)
        if now < self._horizon or self._busy(now, self._horizon, True):
            self._push(now + controller.interval_s, CONTROL, controller)

    def _on_kill(self, now: float, r: Replica) -> None:
        """The grace period of a draining replica ended: the kubelet kills the pod and what it still holds."""
        if r.deleted_s is not None:
            return
        self._advance(r, now)
        self._maybe_delete(r, now)  # it may have finished its work since the last sync
        if r.deleted_s is not None:
            return
        for rid in list(r.engine.requests):
            req = r.engine.abort_request(rid, now)
            if req is not None and isinstance(req.user, _Tracked):
                req.user.record.killed = True
                r.killed += 1
        for rid in list(r.engine.held):
            r.engine.release_held(rid)
        r.deleted_s = now
        self._record_timeline(now)

    def _on_ready(self, now: float, _: Replica) -> None:
        self._record_timeline(now)
        for pool, waiting in self._backlog.items():
            self._backlog[pool] = []
            for tr in waiting:
                self._submit(pool, tr, now)

    def _entry_pool(self) -> str:
        return "prefill" if self.pd else "aggregated"

    def _busy(self, now: float, horizon: float, controlled: bool) -> bool:
        """Keep the clock running while engines work, or while a backlog can still be served: a replica is
        starting, or a controller may start one (for at most ``backlog_wait_s`` past the trace)."""
        if any(r.admitting or r.engine.has_work() for r in self.replicas if r.deleted_s is None):
            return True
        if not any(self._backlog.values()):
            return False
        starting = any(r.deleted_s is None and r.ready_s > now for r in self.replicas)
        return starting or (controlled and now < horizon + self.backlog_wait_s)

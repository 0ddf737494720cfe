"""Virtual-clock driver: N replicas of the engine core, a trace, a dispatcher and an outside controller.

Time advances only through the event queue (arrivals, state syncs, controller ticks, replicas becoming ready).
A replica's engine is advanced lazily up to the time of an event that concerns it, so pure-decode stretches
between events run in closed form (see ``EngineCore.advance``).

What a dispatcher sees, like a real router: its own in-flight count per replica (completions become known at
the next state sync, every ``sync_interval_s``) and engine stats (running, waiting, KV usage) as of that sync.

Replica lifecycle: ``set_replicas(pool, n)`` starts replicas that serve after ``startup_s`` (the cold start) or
drains surplus ones (no new requests, deleted when idle). Replica-seconds count from start to deletion.

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
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from kvscale.histogram import LogHistogram
from kvscale.latency import LatencyModel
from simulator.engine import EngineConfig, EngineCore, StepOutput
from simulator.request import Request, SyntheticPrompt
from simulator.workload import TraceRequest

POOLS = ("aggregated", "prefill", "decode")


@dataclass(slots=True)
class Replica:
    replica_id: int
    pool: str
    engine: EngineCore
    created_s: float
    ready_s: float
    draining: bool = False
    deleted_s: float | None = None
    in_flight: int = 0  # as the dispatcher counts it (dispatched minus completions known at the last sync)
    synced_running: int = 0
    synced_waiting: int = 0
    synced_kv_usage: float = 0.0
    next_wake: float = -1.0
    admitting: int = 0  # dispatched requests still in the API server's per-request overhead (not in the engine)

    def serving(self, now: float) -> bool:
        return self.deleted_s is None and not self.draining and now >= self.ready_s


class Dispatcher(Protocol):
    def choose(self, req: TraceRequest, candidates: Sequence[Replica], now: float) -> Replica: ...


class RoundRobin:
    def __init__(self) -> None:
        self._n = itertools.count()

    def choose(self, req: TraceRequest, candidates: Sequence[Replica], now: float) -> Replica:
        return candidates[next(self._n) % len(candidates)]


class RandomChoice:
    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, req: TraceRequest, candidates: Sequence[Replica], now: float) -> Replica:
        return self._rng.choice(candidates)


class LeastRequest:
    """Fewest in-flight requests (router-counted), ties broken by the synced queue."""

    def choose(self, req: TraceRequest, candidates: Sequence[Replica], now: float) -> Replica:
        return min(candidates, key=lambda r: (r.in_flight, r.synced_waiting, r.replica_id))


DISPATCHERS: dict[str, Callable[[], Dispatcher]] = {
    "round-robin": RoundRobin,
    "random": RandomChoice,
    "least-request": LeastRequest,
}


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


@dataclass
class ClusterResult:
    records: list[RequestRecord]
    replica_seconds: dict[str, float]
    timeline: list[tuple[float, str, int, int]]  # (time, pool, serving, total incl. starting/draining)
    itl: LogHistogram
    wall_steps: int
    end_s: float

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


@dataclass(order=True, slots=True)
class _Event:
    time: float
    order: int
    kind: str = field(compare=False)
    payload: object = field(compare=False, default=None)


class Cluster:
    def __init__(
        self,
        latency: LatencyModel,
        engine_config: EngineConfig | None = None,
        *,
        replicas: dict[str, int] | None = None,
        startup_s: float = 0.0,
        dispatcher: Dispatcher | dict[str, Dispatcher] | None = None,
        sync_interval_s: float = 0.2,
        fast_forward: bool = True,
        backlog_wait_s: float = 3600.0,
    ) -> None:
        self.latency = latency
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
        if isinstance(dispatcher, dict):
            self.dispatchers = dispatcher
        else:
            d = dispatcher or LeastRequest()
            self.dispatchers = {p: d for p in initial}
        self.replicas: list[Replica] = []
        self._ids = itertools.count()
        self._events: list[_Event] = []
        self._order = itertools.count()
        self.timeline: list[tuple[float, str, int, int]] = []
        self.itl = LogHistogram()
        self._backlog: dict[str, list[_Tracked]] = {p: [] for p in POOLS}
        self._now = 0.0
        # Called as fn(replica, request) when a request (or a P/D prefill leg) finishes on a replica, e.g. to keep
        # per-replica request counters and latency histograms like a real engine's /metrics.
        self.finish_listeners: list[Callable[[Replica, Request], None]] = []
        for pool, n in initial.items():
            for _ in range(n):
                self._start_replica(pool, 0.0, ready_now=True)
        self._record_timeline(0.0)

    # -- replicas ------------------------------------------------------------------------------------------------
    def _start_replica(self, pool: str, now: float, *, ready_now: bool = False) -> Replica:
        engine = EngineCore(self.engine_config, self.latency)
        ready = now if ready_now else now + self.startup_s
        r = Replica(next(self._ids), pool, engine, created_s=now, ready_s=ready)
        self.replicas.append(r)
        if not ready_now:
            self._push(ready, "ready", r)  # also when startup_s is 0: the router backlog is flushed then
        return r

    def pool_replicas(self, pool: str, *, include_draining: bool = False) -> list[Replica]:
        return [
            r for r in self.replicas if r.pool == pool and r.deleted_s is None and (include_draining or not r.draining)
        ]

    def set_replicas(self, pool: str, n: int, now: float | None = None) -> None:
        """Scale a pool to ``n`` replicas (starting ones count; the newest are drained first)."""
        now = self._now if now is None else now
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}")
        n = max(0, int(n))
        live = self.pool_replicas(pool)
        if n > len(live):
            # undrain first (a pod being deleted cannot come back in Kubernetes, so we start new ones)
            for _ in range(n - len(live)):
                self._start_replica(pool, now)
        elif n < len(live):
            victims = sorted(live, key=lambda r: (r.ready_s <= now, r.in_flight, -r.replica_id))[: len(live) - n]
            for r in victims:
                r.draining = True
                self._maybe_delete(r, now)
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
    def _push(self, t: float, kind: str, payload: object = None) -> None:
        heapq.heappush(self._events, _Event(t, next(self._order), kind, payload))

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
                self._push(t, "wake", r)

    def _harvest(self, r: Replica, out: StepOutput) -> None:
        if out.itl_tokens:  # each such token's gap is its step's duration (the engine steps back to back)
            if out.num_steps == 1:
                self.itl.add(out.end - out.start, out.itl_tokens)
            else:  # every sequence decodes in every step of a fast-forwarded run
                self.itl.add_many(out.step_durations(), out.itl_tokens / out.num_steps)
        for req in out.finished:
            for listener in self.finish_listeners:
                listener(r, req)
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
        self._push(max(req.finish_time, self._now), "decode_leg", (leg, req))

    def _candidates(self, pool: str, now: float) -> list[Replica]:
        return [r for r in self.replicas if r.pool == pool and r.serving(now)]

    def _submit(self, pool: str, tr: _Tracked, now: float, prefill_req: Request | None = None) -> None:
        cands = self._candidates(pool, now)
        if not cands:
            self._backlog[pool].append(tr)  # waits at the router for a replica (scale from zero)
            return
        r = self.dispatchers[pool].choose(tr.trace, cands, now)
        self._advance(r, now)
        t = tr.trace
        room = self.engine_config.scheduler.max_model_len - t.input_len
        if room < 1:  # a real server answers 400; the trace generator should not produce these
            tr.record.dropped = True
            return
        prompt = t.prompt_tokens if t.prompt_tokens is not None else SyntheticPrompt(t.input_len, tr.record_id)
        req = Request(
            request_id=f"{tr.record_id}{'-d' if tr.decode_leg else ''}",
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
        r.in_flight += 1
        overhead = self.latency.request_overhead_s
        if overhead > 0:  # the pod's API server holds the request first; the engine keeps stepping meanwhile
            r.admitting += 1
            self._push(now + overhead, "admit", (r, req))
        else:
            self._admit(r, req, now)

    def _admit(self, r: Replica, req: Request, now: float) -> None:
        self._advance(r, now)
        # arrival_time as vLLM's API server sets it (after HTTP), for finish listeners' engine-side TTFT
        r.engine.add_request(req, now, arrival_time=req.arrival_time + self.latency.client_overhead_s)
        self._schedule_wake(r)

    def _sync(self, now: float) -> None:
        for r in self.replicas:
            if r.deleted_s is not None:
                continue
            self._advance(r, now)
            e = r.engine
            r.in_flight = e.num_running + e.num_waiting + r.admitting
            r.synced_running, r.synced_waiting, r.synced_kv_usage = e.num_running, e.num_waiting, e.kv.usage
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
            self._push(t.arrival_s, "arrival", _Tracked(rec, t, i))
        last_arrival = trace[-1].arrival_s if trace else 0.0
        horizon = until_s if until_s is not None else last_arrival
        self._push(self.sync_interval_s, "sync")
        if controller is not None:
            self._push(controller.interval_s, "control", controller)
        while self._events:
            ev = heapq.heappop(self._events)
            if until_s is not None and ev.time > until_s:
                break
            now = self._now = ev.time
            if ev.kind == "arrival":
                self._submit(self._entry_pool(), ev.payload, now)  # type: ignore[arg-type]
            elif ev.kind == "decode_leg":
                leg, preq = ev.payload  # type: ignore[misc]
                self._submit("decode", leg, now, preq)
            elif ev.kind == "sync":
                self._sync(now)
                if now < horizon or self._busy(now, horizon, controller is not None):
                    self._push(now + self.sync_interval_s, "sync")
            elif ev.kind == "control":
                ev.payload.tick(now, self)  # type: ignore[attr-defined]
                if now < horizon or self._busy(now, horizon, True):
                    self._push(now + ev.payload.interval_s, "control", ev.payload)  # type: ignore[attr-defined]
            elif ev.kind == "admit":
                r, req = ev.payload  # type: ignore[misc]
                r.admitting -= 1
                self._admit(r, req, now)
            elif ev.kind == "wake":
                r = ev.payload
                if r.deleted_s is None:  # type: ignore[union-attr]
                    self._advance(r, math.nextafter(now, math.inf))  # type: ignore[arg-type]
            elif ev.kind == "ready":
                self._record_timeline(now)
                for pool, waiting in self._backlog.items():
                    self._backlog[pool] = []
                    for tr in waiting:
                        self._submit(pool, tr, now)
        end = self._now
        if drain and until_s is None:
            for r in self.replicas:
                if r.deleted_s is None:
                    self._advance(r, math.inf)
                    end = max(end, r.engine.busy_until)
        for waiting in self._backlog.values():
            for tr in waiting:
                tr.record.dropped = True
        rs: dict[str, float] = {}
        for r in self.replicas:
            stop = r.deleted_s if r.deleted_s is not None else end
            rs[r.pool] = rs.get(r.pool, 0.0) + max(0.0, stop - r.created_s)
        steps = sum(r.engine.num_steps for r in self.replicas)
        return ClusterResult(records, rs, self.timeline, self.itl, steps, end)

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

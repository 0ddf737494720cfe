"""The router's policy :class:`~router.policies.Pipeline` as the virtual-clock cluster's dispatcher.

One policy object, two drivers: the aiohttp proxy calls ``Pipeline.select`` per HTTP request; here the simulator's
:class:`~simulator.cluster.Cluster` does, per trace request, through :class:`PipelineDispatcher`. The pipeline is
built from the same registry and presets as ``kvscale router serve`` and is fed what a real router sees, no more:

* each replica as a :class:`~router.backends.Backend`: its in-flight count (the cluster's, refreshed from the
  engines at every sync, plus the requests dispatched since) and its engine stats as of the last sync (running,
  waiting, KV usage; the sync interval is the router's scrape interval);
* the prompt: token ids in the body (``context_token_ids`` reads them, as for a client that sends ids), and as
  text one word per token (the router's rendering of an id prompt), so text-matching scorers see exactly the
  sharing the trace records; prompts without ids get a unique text;
* KV events as each replica's engine publishes them, delivered after ``kv_event_delay_s`` and dropped with
  probability ``kv_event_drop`` (a batch per replica per sync), into the router's own KV-event index;
* each request's end: the plugins' ``on_finish`` with the TTFT and duration the router would observe, when the
  engine finishes it (the cluster calls :meth:`PipelineDispatcher.observe_finish`), so plugins that count open
  work (``slo``'s queued prefill and decodes, Dynamo's active blocks) release it as the proxy's hooks do;
* the virtual clock as ``Services.clock``.

What differs from the proxy (documented approximations): the "response started" hook runs at dispatch (the proxy
runs it at the first byte), and a request the filters reject everywhere (the proxy's 503) goes to the least loaded
replica and is counted in :attr:`PipelineDispatcher.rejected`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from kvscale.engine_stats import EngineStats
from kvscale.kv_events import KVEvent
from router.backends import Backend
from router.context import RequestContext, render_token_ids
from router.pd import pd_kv_scorer, rank_prefill
from router.policies import Outcome, Pipeline, Services, build_pipeline, load_registry
from router.prefix_index import PrefixIndex
from simulator.cluster import DispatchRequest, ReplicaView

DEFAULT_MODEL = "sim-model"


def policy_names(extra: Mapping[str, Any] | None = None) -> list[str]:
    """Every policy the router knows (its presets plus ``extra`` specs)."""
    return sorted({*load_registry().presets, *(extra or {})})


class _IdPromptContext(RequestContext):
    """The context of a token-id prompt whose text, the router's rendering of an id prompt (one word per token),
    is made the first time a policy reads ``prompt``: the text-matching scorers do, the load-only and KV-event
    ones never (for 15k-token prompts the rendering was ~12 % of a ``kv-events`` replay)."""

    @property
    def prompt(self) -> str:  # type: ignore[override]
        text = self.__dict__.get("_text")
        if text is None:
            text = self.__dict__["_text"] = render_token_ids(self.body["prompt"])
        return text

    @prompt.setter
    def prompt(self, value: str | None) -> None:
        self.__dict__["_text"] = value


class PipelineDispatcher:
    """Routes the cluster's requests with the router's pipeline ``policy`` (a preset or an ``extra`` spec)."""

    def __init__(
        self,
        policy: str,
        *,
        extra_policies: Mapping[str, Any] | None = None,
        seed: int = 0,
        block_size: int = 16,
        kv_event_delay_s: float = 0.0,
        kv_event_drop: float = 0.0,
        model: str = DEFAULT_MODEL,
        prefix_index_capacity: int = 200_000,
    ) -> None:
        if kv_event_delay_s < 0 or not 0 <= kv_event_drop <= 1:
            raise ValueError("kv_event_delay_s must be >= 0 and kv_event_drop in [0, 1]")
        self.now = 0.0
        self.model, self.block_size = model, block_size
        self.services = Services(clock=lambda: self.now, rng=random.Random(seed),
                                 prefix_index=PrefixIndex(prefix_index_capacity))  # fmt: skip
        registry = load_registry()
        specs = {**registry.presets, **(extra_policies or {})}
        if policy not in specs:
            raise ValueError(f"unknown router policy {policy!r}; known: {', '.join(sorted(specs))}")
        self.pipeline: Pipeline = build_pipeline(policy, specs[policy], registry, self.services)
        self.policy = policy
        self.kv_event_delay_s, self.kv_event_drop = kv_event_delay_s, kv_event_drop
        self._drop_rng = random.Random(seed + 1)
        self._backends: dict[int, Backend] = {}
        self._open: dict[str, tuple[RequestContext, Backend]] = {}  # dispatched, not finished: for on_finish
        self._pending: deque[tuple[float, str, list[KVEvent]]] = deque()
        self.rejected = 0
        self.kv_batches_dropped = 0

    @property
    def uses_kv_events(self) -> bool:
        """True when the policy reads the engines' KV events (a plugin created the KV-event index)."""
        return "kvevents" in self.services.extras

    # -- what the router sees ------------------------------------------------------------------------------------
    def _backend(self, v: ReplicaView) -> Backend:
        b = self._backends.get(v.replica_id)
        if b is None:
            # a mixed pool's replica carries its variant's latency model as the pod label the slo scorer reads
            labels = {"kvscale.io/latency-model": v.variant} if v.variant else {}
            b = self._backends[v.replica_id] = Backend(f"http://{v.name}", role=v.role, labels=labels,
                                                       configured_models=frozenset({self.model}))  # fmt: skip
        b.in_flight = v.in_flight
        if v.synced_s is not None and b.stats_at != v.synced_s:
            b.stats = EngineStats("vllm", v.synced_s, float(v.running), float(v.waiting), v.kv_usage,
                                  block_size=self.block_size, models=frozenset({self.model}))  # fmt: skip
            b.stats_at = v.synced_s
        return b

    def _context(self, req: DispatchRequest) -> RequestContext:
        ids: list[int] | None = req.prompt_token_ids
        if ids is None and req.block_prompt is not None:
            ids = req.block_prompt.token_ids()
        if ids is None:
            text = f"request {req.request_id}: a prompt shared with no other"
            body = {"model": self.model, "prompt": text, "max_tokens": req.output_len, "stream": True}
            return RequestContext(req.request_id, self.model, "completions", text, body, {}, stream=True,
                                  policy=self.policy, started=self.now)  # fmt: skip
        body = {"model": self.model, "prompt": ids, "max_tokens": req.output_len, "stream": True}
        return _IdPromptContext(req.request_id, self.model, "completions", None, body, {}, stream=True,
                                policy=self.policy, started=self.now)  # fmt: skip

    # -- the cluster's Dispatcher interface ------------------------------------------------------------------------
    def choose(self, req: DispatchRequest, candidates: Sequence[ReplicaView], now: float) -> ReplicaView:
        self.now = now
        self._deliver(now)
        backends = [self._backend(v) for v in candidates]
        ctx = self._context(req)
        chosen = self.pipeline.select(ctx, backends)
        if chosen is None:
            self.rejected += 1
            chosen = min(backends, key=lambda b: b.in_flight)
        ctx.tried.append(chosen.url)
        chosen.in_flight += 1
        self.pipeline.on_response_start(ctx, chosen)
        self._open[req.request_id] = (ctx, chosen)
        return candidates[backends.index(chosen)]

    def observe_rejected(self, request_id: str) -> None:
        """The replica refused a request this dispatcher sent (prompt beyond ``max_model_len``: vLLM's 400)."""
        opened = self._open.pop(request_id, None)
        if opened is not None:
            self.pipeline.on_finish(opened[0], opened[1], Outcome(400, "invalid"))

    def observe_finish(self, view: ReplicaView, req: Any) -> None:
        """A request this dispatcher sent finished (the cluster calls this): the plugins' ``on_finish``, with the
        TTFT and duration the router would have observed, at the finish time."""
        opened = self._open.pop(req.request_id, None)
        if opened is None:
            return
        ctx, backend = opened
        self.now = max(self.now, req.finish_time)
        started = ctx.started if ctx.started is not None else req.arrival_time
        ttft = req.first_token_time - started if req.first_token_time >= 0 else None
        self.pipeline.on_finish(ctx, backend, Outcome(200, None, ttft, max(0.0, req.finish_time - started),
                                                      req.num_prompt_tokens, req.num_output_tokens,
                                                      max(req.num_cached_tokens, 0)))  # fmt: skip

    def observe_kv_events(self, now: float, view: ReplicaView, events: list[KVEvent]) -> None:
        """A replica's engine published ``events`` (the cluster calls this at each sync)."""
        if self.kv_event_drop and self._drop_rng.random() < self.kv_event_drop:
            self.kv_batches_dropped += 1
            return
        self._pending.append((now + self.kv_event_delay_s, f"http://{view.name}", events))

    def _deliver(self, now: float) -> None:
        mgr = self.services.extras.get("kvevents")
        pending = self._pending
        while pending and pending[0][0] <= now:
            _, url, events = pending.popleft()
            if mgr is not None:
                for ev in events:
                    mgr.index.apply(url, ev)


class PrefillDispatcher(PipelineDispatcher):
    """P/D: the prefill leg's pod, chosen as ``kvscale router serve`` chooses it (:func:`router.pd.rank_prefill`:
    most prompt tokens in the pod's cache per the KV-event index, then fewest in flight), with the KV-event scorer
    of ``policy`` when it has one. The decode leg goes through a :class:`PipelineDispatcher` of the
    ``least-request`` policy, as the proxy's P/D handler does."""

    def __init__(self, policy: str, **kw: Any) -> None:
        super().__init__(policy, **kw)
        self.kv = pd_kv_scorer(self.services, self.pipeline)

    def choose(self, req: DispatchRequest, candidates: Sequence[ReplicaView], now: float) -> ReplicaView:
        self.now = now
        self._deliver(now)
        backends = [self._backend(v) for v in candidates]
        chosen = rank_prefill(self._context(req), backends, self.kv)[0]
        chosen.in_flight += 1
        return candidates[backends.index(chosen)]


def cluster_dispatchers(policy: str, pd: bool, **kw: Any) -> tuple[Any, PipelineDispatcher, bool]:
    """What a :class:`~simulator.cluster.Cluster` routes with under router ``policy``: its ``dispatcher`` argument,
    the dispatcher whose counters report (aggregated: the one; P/D: the prefill leg's) and whether the cluster must
    record KV events. P/D as the router's P/D handler: the prefill pod by cached tokens then load
    (:class:`PrefillDispatcher`), the decode pod by ``least-request``. ``kw``: :class:`PipelineDispatcher`'s."""
    if not pd:
        d = PipelineDispatcher(policy, **kw)
        return d, d, d.uses_kv_events
    d = PrefillDispatcher(policy, **kw)
    return {"prefill": d, "decode": PipelineDispatcher("least-request", **kw)}, d, True

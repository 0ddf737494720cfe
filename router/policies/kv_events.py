"""Scorer ``kv-events``: precise prefix-cache affinity from the engines' own KV events, and the ``kv-events`` policy.

Each backend's ZMQ KV-event stream feeds one shared :class:`router.kvevents.KVEventsManager` (kept in
``Services.extras["kvevents"]``; subscribers follow the pool's membership). The prompt is tokenized with the
model's tokenizer (``tokenizer``: a local directory; none = the simulator's fallback tokenizer), hashed into
blocks of the backend's block size (``vllm:cache_config_info``), and looked up: score = cached prompt tokens the
backend would serve / prompt tokens — exactly the ``cached_tokens`` the engine will report, not a guess.

Where a backend publishes: its ``kv-events`` label (``--backend URL,kv-events=tcp://HOST:PORT``, optional
``kv-replay=tcp://HOST:PORT``), else ``tcp://<backend host>:<port>`` from this scorer's config (Kubernetes pods,
like vLLM's ``--kv-events-config '{"endpoint": "tcp://*:5557"}'``).

The ``kv-events`` policy combines it with load: ``bounded-load`` drops pods over 1.25x the mean in-flight (so a hot
prefix spreads), then kv-events (weight 2) + least-request (weight 1) rank.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from router.kvevents import EventSource, KVEventsCollector, KVEventsManager
from router.kvevents.tokens import context_token_ids, shared_tokenizer
from router.policies.base import Scorer

EXTRAS_KEY = "kvevents"


def lora_of(ctx: Any, backends: Any) -> str | None:
    """The LoRA adapter a request names: its model is served but is none of the engines' base model names."""
    for b in backends:
        if b.stats is not None and b.stats.models:
            return None if ctx.model in b.stats.models else ctx.model
    return None


class KVEventsScorer(Scorer):
    name = "kv-events"

    @dataclass(frozen=True)
    class Config:
        tokenizer: str | None = None  # local Hugging Face tokenizer directory of the served model
        port: int = 5557  # ZMQ PUB port on the backend's host (when the backend has no kv-events label)
        replay_port: int = 0  # ZMQ replay ROUTER port (0 = none)
        topic: str = "kv-events"
        max_blocks_per_backend: int = 262_144
        default_block_size: int = 16  # until the backend's vllm:cache_config_info or first event says otherwise
        speculative: bool = True  # count a just-routed request's blocks as held until the engine's events arrive

        def validate(self) -> None:
            if not 0 < self.port < 65536 or not 0 <= self.replay_port < 65536:
                raise ValueError("port and replay_port must be TCP ports")
            if self.max_blocks_per_backend < 1 or self.default_block_size < 1:
                raise ValueError("max_blocks_per_backend and default_block_size must be >= 1")

    def __init__(self, config: Config, services: Any) -> None:
        super().__init__(config, services)
        extras = services.extras
        mgr = extras.get(EXTRAS_KEY)
        if mgr is None:
            mgr = extras[EXTRAS_KEY] = KVEventsManager(
                max_blocks_per_backend=config.max_blocks_per_backend,
                default_block_size=config.default_block_size,
                clock=services.clock,
            )
            registry = extras.get("registry")
            if registry is not None:
                registry.register(KVEventsCollector(mgr))
        self.manager: KVEventsManager = mgr
        self.tokenizer = shared_tokenizer(extras, config.tokenizer)
        self._synced: tuple[int, int] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._unsettled: deque[Any] = deque(maxlen=10_000)  # scored requests whose backend is not known yet

    def source_for(self, backend: Any) -> EventSource:
        labels = backend.labels
        endpoint = labels.get("kv-events")
        replay = labels.get("kv-replay")
        host = urlsplit(backend.url).hostname or "127.0.0.1"
        if not endpoint:
            endpoint = f"tcp://{host}:{self.config.port}"
        if not replay and self.config.replay_port:
            replay = f"tcp://{host}:{self.config.replay_port}"
        return EventSource(endpoint, labels.get("kv-topic", self.config.topic), replay or None)

    def _sync(self) -> None:
        """Keep one subscriber per pool backend (checked per request: cheap; re-synced on membership change)."""
        pool = self.services.pool
        if pool is None:
            return
        key = (id(pool), pool.version)
        if key == self._synced or (self._sync_task is not None and not self._sync_task.done()):
            return
        self._synced = key
        sources = {b.url: self.source_for(b) for b in pool}
        self._sync_task = asyncio.get_running_loop().create_task(self.manager.sync(sources))

    def cached_tokens(self, ctx: Any, backends: Any) -> tuple[list[int] | None, dict[str, int]]:
        """(prompt token ids, backend URL -> predicted cached tokens); cached in ``ctx.state`` for other plugins."""
        hit = ctx.state.get("kv_cached_tokens")
        tokens = context_token_ids(ctx, self.tokenizer)
        if hit is not None and set(hit) >= {b.url for b in backends}:
            return tokens, hit
        if not tokens:
            return tokens, {}
        mgr = self.manager
        for b in backends:
            if b.stats is not None:
                mgr.set_block_size(b.url, b.stats.block_size)
        hashes: dict[int, list[int]] = {}
        hit = mgr.predict_cached_tokens(tokens, [b.url for b in backends], lora_of(ctx, backends), hashes)
        ctx.state["kv_cached_tokens"] = hit
        ctx.state["kv_hashes"] = hashes
        return tokens, hit

    def settle(self) -> None:
        """Requests scored earlier now know their backend (the proxy appends it to ``ctx.tried`` right after the
        pick): register their blocks there speculatively until that backend's own events arrive."""
        if not self.config.speculative:
            self._unsettled.clear()
            return
        keep: deque[Any] = deque(maxlen=self._unsettled.maxlen)
        mgr = self.manager
        while self._unsettled:
            ctx = self._unsettled.popleft()
            if ctx.tried:
                url = ctx.tried[-1]
                hashes = ctx.state.get("kv_hashes", {}).get(mgr.block_size(url))
                if hashes:
                    mgr.speculate(url, hashes)
            elif self.services.clock() - ctx.started < 5.0:
                keep.append(ctx)
        self._unsettled = keep

    def on_response_start(self, ctx, backend) -> None:
        self.settle()

    def on_pool_change(self) -> None:
        self._sync()

    def score(self, ctx, backends):
        self._sync()
        self.settle()
        tokens, hit = self.cached_tokens(ctx, backends)
        self._unsettled.append(ctx)
        if not tokens:
            return dict.fromkeys(backends, 0.0)
        n = len(tokens)
        return {b: hit.get(b.url, 0) / n for b in backends}


PLUGINS = (KVEventsScorer,)
POLICIES = {
    "kv-events": {
        "filters": [{"type": "bounded-load"}],
        "scorers": [{"type": "kv-events", "weight": 2.0}, {"type": "least-request", "weight": 1.0}],
    }
}

"""The router's view of all backends' KV caches: one subscriber per backend, one index, prefix-hit predictions."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

import zmq.asyncio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.kvevents.index import DEFAULT_MAX_BLOCKS_PER_BACKEND, KVBlockIndex, request_hashes
from router.kvevents.subscriber import EventSource, KVEventSubscriber

DEFAULT_BLOCK_SIZE = 16


def cached_tokens(num_prompt_tokens: int, matched_blocks: int, block_size: int) -> int:
    """Prompt tokens an engine serves from its prefix cache, given the leading blocks it holds.

    vLLM always recomputes the last prompt token (it needs its logits), so at most ``(n - 1) // block_size`` full
    blocks can hit."""
    if num_prompt_tokens <= 0:
        return 0
    return min(matched_blocks, (num_prompt_tokens - 1) // block_size) * block_size


class KVEventsManager:
    """Keeps a :class:`KVEventSubscriber` per backend in step with the backend set (call :meth:`sync`)."""

    def __init__(
        self,
        *,
        max_blocks_per_backend: int = DEFAULT_MAX_BLOCKS_PER_BACKEND,
        default_block_size: int = DEFAULT_BLOCK_SIZE,
        replay_timeout_s: float = 2.0,
        speculative_ttl_s: float = 10.0,
        max_speculative_per_backend: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = KVBlockIndex(max_blocks_per_backend)
        self.default_block_size = default_block_size
        self.replay_timeout_s = replay_timeout_s
        self.clock = clock
        self.subscribers: dict[str, KVEventSubscriber] = {}
        self.block_sizes: dict[str, int] = {}  # from vllm:cache_config_info (EngineStats.block_size)
        self._ctx: zmq.asyncio.Context | None = None
        # Speculative entries: blocks of requests just routed to a backend, until its events can confirm them.
        self.speculative_ttl_s = speculative_ttl_s
        self.max_speculative_per_backend = max_speculative_per_backend
        self._spec: dict[str, OrderedDict[int, float]] = {}

    def _context(self) -> zmq.asyncio.Context:
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        return self._ctx

    async def sync(self, sources: Mapping[str, EventSource]) -> None:
        """Subscribe to new backends, drop gone ones (and their index entries), resubscribe changed sources."""
        for backend in list(self.subscribers):
            if sources.get(backend) != self.subscribers[backend].source:
                await self.subscribers.pop(backend).close()
                self.index.remove_backend(backend)
        for backend, source in sources.items():
            if backend not in self.subscribers:
                sub = KVEventSubscriber(backend, source, self.index, self._context(),
                                        replay_timeout_s=self.replay_timeout_s, clock=self.clock)  # fmt: skip
                sub.start()
                self.subscribers[backend] = sub

    async def close(self) -> None:
        for sub in self.subscribers.values():
            await sub.close()
        self.subscribers.clear()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def set_block_size(self, backend: str, block_size: int | None) -> None:
        if block_size:
            self.block_sizes[backend] = block_size

    def block_size(self, backend: str) -> int:
        return self.block_sizes.get(backend) or self.index.block_size(backend) or self.default_block_size

    def speculate(self, backend: str, hashes: list[int]) -> None:
        """The router just sent a request with these block hashes to ``backend``: count them as held there for
        ``speculative_ttl_s`` (its prefill has not stored them yet; without this, requests sharing a prefix that
        arrive during the first one's prefill would all look like misses and spread over every backend)."""
        if self.speculative_ttl_s <= 0 or not hashes:
            return
        spec = self._spec.setdefault(backend, OrderedDict())
        until = self.clock() + self.speculative_ttl_s
        for h in hashes:
            spec[h] = until
            spec.move_to_end(h)
        while len(spec) > self.max_speculative_per_backend:
            spec.popitem(last=False)

    def _speculative_match(self, backend: str, hashes: list[int], now: float) -> int:
        spec = self._spec.get(backend)
        if not spec:
            return 0
        n = 0
        for h in hashes:
            until = spec.get(h)
            if until is None or until < now:
                break
            n += 1
        while spec and next(iter(spec.values())) < now:  # expired entries sit at the front (insertion order)
            spec.popitem(last=False)
        return n

    def predict_cached_tokens(
        self,
        token_ids: list[int],
        backends: Iterable[str],
        lora_name: str | None = None,
        hashes_out: dict[int, list[int]] | None = None,
    ) -> dict[str, int]:
        """For each backend, the prompt tokens its prefix cache would serve right now (0 when none).

        Speculative entries (:meth:`speculate`) count too. ``hashes_out`` receives the request's block hashes per
        block size (to pass to :meth:`speculate` once a backend is chosen)."""
        backends = list(backends)
        by_size: dict[int, list[str]] = {}
        for b in backends:
            by_size.setdefault(self.block_size(b), []).append(b)
        out = dict.fromkeys(backends, 0)
        n = len(token_ids)
        now = self.clock()
        for bs, group in by_size.items():
            hashes = request_hashes(token_ids, bs, lora_name)
            if hashes_out is not None:
                hashes_out[bs] = hashes
            matched = self.index.match(hashes)
            for b in group:
                m = max(matched.get(b, 0), self._speculative_match(b, hashes, now))
                out[b] = cached_tokens(n, m, bs)
        return out

    def forget(self, backend: str) -> None:
        self._spec.pop(backend, None)


class KVEventsCollector(Collector):
    """Prometheus view of a :class:`KVEventsManager` (register it in the router's registry)."""

    def __init__(self, manager: KVEventsManager) -> None:
        self.manager = manager

    def collect(self):  # type: ignore[no-untyped-def]  # prometheus_client's Collector protocol
        m = self.manager
        yield GaugeMetricFamily("kvscale_router_kv_index_blocks", "Distinct KV blocks in the KV-event index",
                                value=m.index.num_blocks)  # fmt: skip
        s = m.index.stats
        c = CounterMetricFamily("kvscale_router_kv_index_block_events", "KV block events applied to the index",
                                labels=["kind"])  # fmt: skip
        for kind, v in (("stored", s.stored_blocks), ("removed", s.removed_blocks), ("unmapped", s.unmapped_blocks),
                        ("evicted", s.evicted_blocks)):  # fmt: skip
            c.add_metric([kind], v)
        yield c
        g = CounterMetricFamily("kvscale_router_kv_events_gaps", "KV-event sequence gaps by outcome",
                                labels=["outcome"])  # fmt: skip
        subs = list(m.subscribers.values())
        g.add_metric(["replayed"], sum(x.stats.gaps_replayed for x in subs))
        g.add_metric(["cleared"], sum(x.stats.gaps_cleared for x in subs))
        yield g
        yield CounterMetricFamily("kvscale_router_kv_events_restarts", "KV-event publishers seen restarting",
                                  value=sum(x.stats.restarts for x in subs))  # fmt: skip
        yield CounterMetricFamily("kvscale_router_kv_events_batches", "KV-event batches applied",
                                  value=sum(x.stats.batches for x in subs))  # fmt: skip

"""Picker ``dynamo-kv``: NVIDIA Dynamo's KV-aware worker selection, and the ``peer:dynamo-kv`` policy.

A faithful port of Dynamo's ``DefaultWorkerSelector`` (``--router-mode kv``) onto kvscale's plugin contract, with
Dynamo's defaults, so kvscale's own policies can be compared against it on the same traces.

Algorithm (per request, over the candidates in ``scores``; the preset has no scorers, so the totals are ignored)
---------------------------------------------------------------------------------------------------------------
* ``isl`` = prompt tokens; ``hashes`` = chained hashes of the prompt's *full* blocks of ``block_size`` tokens
  (Dynamo: ``compute_seq_hashes_for_tracking``, ``tokens.len() / block_size`` blocks).
* ``overlap(w)`` = leading prompt blocks cached on worker ``w`` according to its KV events (Dynamo: the radix tree's
  ``find_matches`` depth). Here: kvscale's shared KV-event index (``Services.extras["kvevents"]``, the one
  :class:`router.policies.kv_events.KVEventsScorer` owns; an inner instance of that scorer tokenizes, hashes and
  keeps the ZMQ subscribers in step with the pool).
* Per worker the router tracks its *active sequences* (Dynamo ``ActiveSequences``): the requests it sent there and
  that have not finished, each with its block hashes and its prefill tokens ``isl - overlap·block_size``.
  ``active_blocks(w)`` = distinct block hashes over those requests (a prefix shared by two active requests counts
  once); ``active_prefill_tokens(w)`` = sum of prefill tokens of the requests whose prefill has not completed.
* ``potential_prefill_tokens(w) = active_prefill_tokens(w) + max(0, isl - overlap(w)·block_size)``
  ``potential_decode_blocks(w) = active_blocks(w) + |{h in hashes : h not active on w}|``
  ``logit(w) = overlap_score_weight · potential_prefill_tokens(w) / block_size + potential_decode_blocks(w)``
  (lower is better; no normalization is needed: ``softmax_sample`` divides by the logit range itself).
* ``softmax_sample(logits, temperature)``: temperature 0 → every worker with the minimum logit; ties are broken by
  the smaller radix-tree size (blocks the worker holds, counted only for workers with ``overlap > 0``, else 0, as in
  ``OverlapScores.tree_sizes``), then at random (``Services.rng``). Temperature > 0 → if all logits are equal,
  uniform; else ``p_i ∝ exp(-(logit_i / (max - min)) / temperature)``, sampled by one uniform draw over the
  cumulative probabilities in candidate order.
* After the pick the request is added to the chosen worker's active sequences (``add_request``); the first byte
  marks its prefill completed (``mark_prefill_completed``: Dynamo does it on the first token); the end of the
  attempt frees it (``free``). Stale requests are force-expired after 300 s (Dynamo's ``EXPIRY_DURATION``).

Defaults (all Dynamo's)
-----------------------
* ``overlap_score_weight = 1.0``, ``temperature = 0.0`` (Dynamo's ``router_temperature``): ``KvRouterConfig::default``.
* ``block_size = 16``: Dynamo's router uses the worker's registered KV block size; its vLLM worker defaults vLLM's
  ``block_size`` to 16 (``update_engine_config_with_dynamo``). Here the engine's own block size is used when known
  (``vllm:cache_config_info`` or its KV events), ``block_size`` until then.
* ``use_kv_events = true`` (overlap from KV events, no TTL-based approximate index), ``router_track_active_blocks =
  true``, ``router_track_output_blocks = false`` (no output blocks added during decode), ``router_assume_kv_reuse =
  true`` (real block hashes, so shared prefixes dedupe in the active blocks), ``router_replica_sync = false`` (one
  router's own view), ``router_queue_threshold = None`` and no busy thresholds (no queueing, no busy filter).
* KV events are not speculated: with ``use_kv_events`` Dynamo's index changes only on events (routing decisions
  feed the index only in its approximate mode). ``kv_events`` passes config to the inner
  :class:`~router.policies.kv_events.KVEventsScorer` (``tokenizer``, ``port``, …; its ``speculative`` defaults to
  False here).

Sources (github.com/ai-dynamo/dynamo; files at the commits stored in the reference index)
------------------------------------------------------------------------------------------
* ``lib/llm/src/kv_router/scheduler.rs`` @ db19bd2a659d4cb04998fb4101cd0dbfbbeba9d4: ``DefaultWorkerSelector::
  select_worker`` (the logit), ``softmax_sample``, the tree-size tie-break. (An earlier version, @ 00564be89016c26794846
  b1eb66e37e5f7ad3dc8, also divided the logits by their maximum before sampling: a positive scale that the range
  normalization cancels, so both versions sample identically.)
* ``lib/llm/src/kv_router/sequence.rs`` @ 581ee33e434f3f99b84f6ea99fcf0a3fda26a685: ``ActiveSequences``
  (``add_request``, ``new_tokens``, ``new_blocks``, ``active_blocks``, ``potential_blocks_and_tokens``,
  ``mark_prefill_completed``, ``free``, ``force_expiry``).
* ``lib/llm/src/kv_router/config.rs`` @ 79a21ca4f5200e76a2bcc19580eb6176298c7e59: ``KvRouterConfig::default``,
  ``compute_seq_hashes_for_tracking``.
* ``lib/llm/src/kv_router.rs`` @ ecd2979910e8ddc97f9aaf02f4dba7b61ae7d930: ``KvRouter::find_best_match``.
* ``lib/kv-router/src/radix_tree.rs`` @ b74cb184a36e4306c562df76d5ca1a5eb9628ab7: ``find_matches`` (prefix depth,
  ``tree_sizes``).
* ``docs/router/kv_cache_routing.md`` @ 391befc4e29521d6c6ee5eb63660cdc04a7a85c7 (flags and their defaults, the
  cost function, the request lifecycle); ``components/src/dynamo/vllm/args.py`` @ b6d5e48722e494c650c285c0f2370
  c3e28f37a1b (block size 16).

Approximations (kvscale is not Dynamo)
--------------------------------------
* Request end without ``on_finish``: kvscale's virtual-clock evaluator calls only ``on_response_start`` (at
  dispatch). So before each decision every candidate's active sequences are trimmed, oldest first, to
  ``backend.in_flight`` (the router's in-flight count, refreshed from the engines in the evaluator): a FIFO stand-in
  for Dynamo's exact ``free``. Behind the proxy ``on_finish`` frees exactly and ``in_flight`` (which also counts
  other policies' requests) is never below this plugin's count, so the trim then only catches leaks.
* Prefill completion: the proxy calls ``on_response_start`` at the first byte (Dynamo: first token), but the
  evaluator calls it at dispatch, so there a worker's queued prefill of *other* requests is always 0 and the
  prefill term is the new request's own uncached blocks.
* ``overlap`` = max(the index's leading-block match, predicted cached tokens // block size): the latter only adds
  speculative entries when ``kv_events.speculative`` is turned on; vLLM's "last token is recomputed" cap is not
  applied (Dynamo's radix depth is not capped either).
* Per backend its own block size (Dynamo assumes one for all workers); data-parallel ranks are not modelled (one
  backend = one worker). Per-request overrides (``RouterConfigOverride``) and Dynamo's optional queueing and
  busy thresholds (off by default) are not ported.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.kvevents import request_hashes
from router.policies.base import Picker, parse_config
from router.policies.kv_events import KVEventsScorer, lora_of

__all__ = ["ActiveSequences", "DynamoKVPicker", "softmax_probabilities"]

EXPIRY_S = 300.0  # Dynamo's EXPIRY_DURATION for stale requests
STATE_KEY = "dynamo_kv"  # ctx.state: backend URL -> this plugin's key of the request there


def softmax_probabilities(logits: Sequence[float], temperature: float) -> list[float]:
    """Dynamo's ``softmax_sample`` distribution for ``temperature > 0`` (lower logits are likelier)."""
    lo, hi = min(logits), max(logits)
    if lo == hi:
        return [1.0 / len(logits)] * len(logits)
    span = hi - lo
    scaled = [-(v / span) / temperature for v in logits]
    top = max(scaled)
    exps = [math.exp(s - top) for s in scaled]
    total = sum(exps)
    return [e / total for e in exps]


@dataclass
class _Seq:
    hashes: tuple[int, ...]
    prefill_tokens: int  # 0 once the prefill completed
    added_at: float


class ActiveSequences:
    """One worker's active requests as the router tracks them (Dynamo's ``ActiveSequences``)."""

    __slots__ = ("_refs", "_seqs", "prefill_tokens")

    def __init__(self) -> None:
        self._seqs: OrderedDict[int, _Seq] = OrderedDict()  # in the order they were added
        self._refs: dict[int, int] = {}  # block hash -> active requests holding it
        self.prefill_tokens = 0  # prefill tokens of the requests whose prefill has not completed

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def active_blocks(self) -> int:
        return len(self._refs)

    def new_blocks(self, hashes: Sequence[int]) -> int:
        return len(hashes) - sum(map(self._refs.__contains__, hashes))  # at C speed: called per worker per request

    def add(self, key: int, hashes: Sequence[int], prefill_tokens: int, now: float) -> None:
        if key in self._seqs:
            return
        self._seqs[key] = _Seq(tuple(hashes), prefill_tokens, now)
        self.prefill_tokens += prefill_tokens
        refs = self._refs
        for h in hashes:
            refs[h] = refs.get(h, 0) + 1

    def mark_prefill_completed(self, key: int) -> None:
        seq = self._seqs.get(key)
        if seq is not None:
            self.prefill_tokens -= seq.prefill_tokens
            seq.prefill_tokens = 0

    def free(self, key: int) -> None:
        seq = self._seqs.pop(key, None)
        if seq is None:
            return
        self.prefill_tokens -= seq.prefill_tokens
        refs = self._refs
        for h in seq.hashes:
            n = refs.get(h, 0) - 1
            if n > 0:
                refs[h] = n
            else:
                refs.pop(h, None)

    def trim(self, keep: int, expire_before: float) -> None:
        """Free the oldest requests beyond ``keep`` and those added before ``expire_before``."""
        seqs = self._seqs
        while seqs:
            key, seq = next(iter(seqs.items()))
            if len(seqs) <= keep and seq.added_at >= expire_before:
                break
            self.free(key)


class DynamoKVPicker(Picker):
    name = "dynamo-kv"

    @dataclass(frozen=True)
    class Config:
        overlap_score_weight: float = 1.0  # Dynamo --kv-overlap-score-weight
        temperature: float = 0.0  # Dynamo --router-temperature
        block_size: int = 16  # until the engine reports its own (Dynamo: the worker's kv_cache_block_size)
        kv_events: dict[str, Any] = field(default_factory=dict)  # config of the inner kv-events scorer

        def validate(self) -> None:
            if not math.isfinite(self.overlap_score_weight) or self.overlap_score_weight < 0:
                raise ValueError("overlap_score_weight must be a finite number >= 0")
            if not math.isfinite(self.temperature) or self.temperature < 0:
                raise ValueError("temperature must be a finite number >= 0")
            if self.block_size < 2:
                raise ValueError("block_size must be > 1 (as Dynamo asserts)")
            _kv_config(self)

    def __init__(self, config: Config, services: Any) -> None:
        super().__init__(config, services)
        self._kv = KVEventsScorer(_kv_config(config), services)
        self.manager = self._kv.manager
        self._workers: dict[str, ActiveSequences] = {}
        self._keys = itertools.count(1)

    # -- Dynamo's cost -----------------------------------------------------------------------------------------------
    def _block_size(self, url: str) -> int:
        mgr = self.manager
        return mgr.block_sizes.get(url) or mgr.index.block_size(url) or self.config.block_size

    def _prepare(self, ctx: Any, backends: Sequence[Any]) -> dict[Any, tuple[float, int, int, list[int]]]:
        """Per backend: (logit, overlap blocks, tree size, block hashes), after trimming the active sequences."""
        self._kv.score(ctx, backends)  # subscribers in step with the pool; tokenize, hash, cache in ctx.state
        tokens, hit = self._kv.cached_tokens(ctx, backends)
        isl = len(tokens) if tokens else 0
        now = self.services.clock()
        hashes_by_bs: dict[int, list[int]] = ctx.state.get("kv_hashes", {}) if tokens else {}
        matched: dict[int, dict[str, int]] = {}
        w = self.config.overlap_score_weight
        index = self.manager.index
        out: dict[Any, tuple[float, int, int, list[int]]] = {}
        for b in backends:
            url = b.url
            bs = self._block_size(url)
            hashes = hashes_by_bs.get(bs)
            if hashes is None:
                hashes = hashes_by_bs[bs] = request_hashes(tokens, bs, lora_of(ctx, backends)) if tokens else []
            m = matched.get(bs)
            if m is None:
                m = matched[bs] = index.match(hashes)
            overlap = m.get(url, 0)
            if self.manager.block_size(url) == bs:  # ``hit`` was counted in this block size
                overlap = max(overlap, hit.get(url, 0) // bs)
            seqs = self._workers.get(url)
            if seqs is not None:
                seqs.trim(max(0, b.in_flight), now - EXPIRY_S)
                prefill_tokens = seqs.prefill_tokens + max(0, isl - overlap * bs)
                decode_blocks = seqs.active_blocks + seqs.new_blocks(hashes)
            else:
                prefill_tokens, decode_blocks = max(0, isl - overlap * bs), len(hashes)
            logit = w * prefill_tokens / bs + decode_blocks
            tree_size = index.backend_blocks(url) if overlap > 0 else 0
            out[b] = (logit, overlap, tree_size, hashes)
        ctx.state["dynamo_kv_isl"] = isl
        return out

    def logits(self, ctx: Any, backends: Sequence[Any]) -> dict[Any, float]:
        """Dynamo's cost per backend for this request (lower is better); records nothing."""
        return {b: v[0] for b, v in self._prepare(ctx, backends).items()}

    def _sample(self, prepared: Mapping[Any, tuple[float, int, int, list[int]]]) -> Any:
        rng = self.services.rng
        backends = list(prepared)
        logits = [prepared[b][0] for b in backends]
        t = self.config.temperature
        if t == 0.0:
            lo = min(logits)
            tied = [b for b, v in zip(backends, logits, strict=True) if v == lo]
            if len(tied) == 1:
                return tied[0]
            sizes = [prepared[b][2] for b in tied]
            if any(s != sizes[0] for s in sizes):
                smallest = min(sizes)
                tied = [b for b, s in zip(tied, sizes, strict=True) if s == smallest]
            return tied[0] if len(tied) == 1 else rng.choice(tied)
        r = rng.random()
        cum = 0.0
        for b, p in zip(backends, softmax_probabilities(logits, t), strict=True):
            cum += p
            if r <= cum:
                return b
        return backends[-1]

    def pick(self, ctx, scores: Mapping) -> Any:
        prepared = self._prepare(ctx, list(scores))
        chosen = self._sample(prepared)
        _, overlap, _, hashes = prepared[chosen]
        bs = self._block_size(chosen.url)
        isl = ctx.state.get("dynamo_kv_isl", 0)
        seqs = self._workers.get(chosen.url)
        if seqs is None:
            seqs = self._workers[chosen.url] = ActiveSequences()
        key = next(self._keys)
        seqs.add(key, hashes, max(0, isl - overlap * bs), self.services.clock())
        ctx.state.setdefault(STATE_KEY, {})[chosen.url] = key
        return chosen

    # -- the request lifecycle -----------------------------------------------------------------------------------------
    def on_response_start(self, ctx, backend) -> None:
        self._kv.on_response_start(ctx, backend)
        key = ctx.state.get(STATE_KEY, {}).get(backend.url)
        seqs = self._workers.get(backend.url)
        if key is not None and seqs is not None:
            seqs.mark_prefill_completed(key)

    def on_finish(self, ctx, backend, outcome) -> None:
        key = ctx.state.get(STATE_KEY, {}).pop(backend.url, None)
        seqs = self._workers.get(backend.url)
        if key is not None and seqs is not None:
            seqs.free(key)

    def on_pool_change(self) -> None:
        self._kv.on_pool_change()
        pool = self.services.pool
        if pool is not None:
            live = {b.url for b in pool}
            for url in [u for u in self._workers if u not in live]:
                del self._workers[url]

    def active(self, url: str) -> ActiveSequences | None:
        """The router's tracked active sequences on backend ``url`` (for tests and debugging)."""
        return self._workers.get(url)


def _kv_config(config: DynamoKVPicker.Config) -> Any:
    raw = {"speculative": False, "default_block_size": config.block_size, **config.kv_events}
    return parse_config(KVEventsScorer.Config, raw, "kv_events")


PLUGINS = (DynamoKVPicker,)
POLICIES = {"peer:dynamo-kv": {"picker": {"type": "dynamo-kv"}}}

"""llm-d's default scheduling profile (the inference scheduler / llm-d-router "EPP"): the ``peer:llm-d`` and
``peer:llm-d-precise`` policies, and the scorers they need.

A port of the Gateway API Inference Extension (GIE) / llm-d scorers onto kvscale's plugin contract, with llm-d's
defaults and weights, so kvscale's own policies can be compared against llm-d on the same traces.

Policies
--------
* ``peer:llm-d`` (llm-d's "inference-scheduling" well-lit path = GIE's ``default-plugins.yaml``):
  ``queue-scorer`` x2 + ``kv-cache-utilization-scorer`` x2 + ``prefix-cache-scorer`` x3, ``max-score-picker``.
* ``peer:llm-d-precise`` (llm-d's "precise-prefix-cache-aware" path): ``precise-prefix-cache-scorer`` x2 +
  ``kv-cache-utilization-scorer`` x1 + ``queue-scorer`` x1, ``max-score-picker``. (llm-d's ``decode-filter`` has
  nothing to do here: kvscale never offers ``prefill`` backends to a policy.)

Totals are ``Σ weight · score`` (GIE's scheduler profile sums ``score · weight`` per endpoint; kvscale's pipeline
does the same and a scorer's missing endpoint adds 0, as in GIE). The picker is kvscale's ``max-score`` (reused, not
copied): the highest total, exact ties uniformly at random, which is GIE's ``max-score-picker`` (shuffle, then a
stable sort by score, take the first).

Scorers (``name``: what llm-d computes)
---------------------------------------
``llm-d-prefix`` — GIE's approximate ``prefix-cache-scorer`` (router-side, no KV events):

* Input bytes: the completion prompt (UTF-8); for chat, the JSON of the ``messages`` list (GIE: ``json.Marshal``
  of the messages; here ``json.dumps`` compact, non-ASCII kept).
* Block size in characters = ``block_size_tokens · 4`` (``averageCharactersPerToken``). With ``auto_tune`` the
  token block size is the first candidate's engine block size (``vllm:cache_config_info`` → ``EngineStats.
  block_size``; GIE: ``CacheBlockSize`` of ``pods[0]``), else ``block_size_tokens`` (16). vLLM's 16 → 64 chars,
  GIE's historical ``DefaultBlockSize = 64`` characters.
* Hashes: a prompt shorter than one block gets none (score 0 everywhere); longer input is truncated to
  ``max_prefix_blocks`` (256) blocks; only full blocks count. ``h0 = xxh64(model + cache_salt)``, ``h_i =
  xxh64(block_i bytes || h_{i-1} as 8 little-endian bytes)`` (cespare/xxhash ``Sum64`` = XXH64, seed 0).
* Index (GIE ``indexer``): ``hash -> set(pods)`` plus one LRU of hashes per pod, created on the pod's first add with
  capacity = its ``num_gpu_blocks`` when ``auto_tune`` and known (GIE: ``CacheNumGPUBlocks``), else
  ``lru_capacity_per_server`` (31250). Re-adding a hash refreshes it; evicting one removes the pod from that hash.
  Lookups never touch recency.
* Match (GIE ``matchLongestPrefix``, greedy): walk the request's hashes in order, stop at the first hash no pod has;
  every pod holding the current hash gets +1. (So a pod missing an earlier block still counts later ones that
  another pod keeps alive: GIE's behaviour, kept.) Score = matched / total blocks.
* Learning (GIE ``PreRequest``): right after the pick, the request's hashes are added for the chosen pod, whatever
  the outcome. kvscale: the chosen URL is known once the router appends it to ``ctx.tried`` (right after
  ``select``), so each scorer call first records the earlier requests' picks, and ``on_response_start`` records too
  (idempotent: one record per request and backend). Backends that leave the pool are dropped (GIE: every 2 min).

``llm-d-queue`` — ``queue-scorer``: over the candidates with scraped metrics, ``(max - waiting) / (max - min)`` of
the engines' waiting queue (``vllm:num_requests_waiting``); all equal → 1. Candidates never scraped are left unscored
(0 here) and do not enter the range (llm-d-router; older GIE read zero-valued metrics instead).

``llm-d-kv-utilization`` — ``kv-cache-utilization-scorer``: ``1 - kv_usage`` (``vllm:kv_cache_usage_perc``), never
scraped → unscored. Metrics are used however old they are (neither scorer checks staleness). kvscale's ``least-kv``
differs (blended score, stale → 0.5), hence these two small plugins.

``llm-d-precise-prefix`` — llm-d's ``precise-prefix-cache-scorer`` (llm-d-kv-cache ``LongestPrefixScorer``):
prompt tokenized with the model's tokenizer, cut into full blocks of the engine's block size (a trailing partial
block is dropped), looked up in an index fed by the engines' KV events. ``matched(pod)`` = consecutive blocks from
block 0 the pod holds; score = ``min(1, matched / total blocks)`` (``absoluteScoredPods``). ``normalization=
"min-max"`` gives the earlier llm-d releases' ``indexedScoresToNormalizedScoredPods``: over the pods matching at
least the first block, ``(m - min) / (max - min)``, all equal → 1, others 0. Reuses
:class:`~router.policies.kv_events.KVEventsScorer` (tokenizer, the shared KV-event index in
``Services.extras["kvevents"]``, ZMQ subscribers, block sizes, LoRA keys); only the normalization is llm-d's.
``speculative`` defaults to False (llm-d's ``speculativeIndexing`` plugin default; when enabled, kvscale's manager
TTL applies, 10 s, not llm-d's 2 s).

Sources (files at the commits stored in the reference index)
------------------------------------------------------------
* llm-d/llm-d ``guides/inference-scheduling/scheduler/inference-scheduling.values.yaml`` @
  086f217d643a6932b261a60f8f337b2ca2629d80 (queue 2, kv-util 2, prefix 3), on
  ``guides/recipes/scheduler/base.values.yaml`` @ 955190d9d24fb78d8fb8d0bee3d7e6af4e5beb71 (image
  llm-d-inference-scheduler v0.7.0, GIE chart v1.4.0); ``guides/inference-scheduling/gaie-inference-scheduling/
  values.yaml`` @ 126f65d65f425be25f9f23a8e495cc0070f24421 (``default-plugins.yaml``).
* kubernetes-sigs/gateway-api-inference-extension ``config/charts/inferencepool/templates/epp-config.yaml`` @
  0ae94dfbf9dcdf8b7f42bc74e849239c7b8f020a (``default-plugins.yaml``: the same 2/2/3).
* llm-d/llm-d ``guides/precise-prefix-cache-aware/scheduler/precise-prefix-cache-aware.values.yaml`` @
  955190d9d24fb78d8fb8d0bee3d7e6af4e5beb71 (precise 2, kv-util 1, queue 1; v0.8.0-rc.1) and llm-d/llm-d-inference-
  scheduler ``deploy/config/epp-precise-prefix-cache-config.yaml`` @ 17d999e09becdfc2f4bf9b26bad49b289036d4ca (the
  same). The older guide ``guides/precise-prefix-cache-aware/gaie-kv-events/values.yaml`` @
  126f65d65f425be25f9f23a8e495cc0070f24421 (v0.5.0) used 3/2/2.
* GIE ``pkg/epp/scheduling/framework/plugins/prefixcachescorer/plugin.go`` and ``indexer.go`` @
  a172f54a01a5d54ae4933897316a175f880c30ad (defaults 64 chars / 256 blocks / 31250, ``autoTune``, ``hashPrompt``,
  ``matchLongestPrefix``, ``PreRequest``, the per-pod LRU); ``pkg/epp/framework/plugins/requestcontrol/dataproducer/
  approximateprefix/plugin.go`` @ 014fd184a61db5b8c3e3644d6ff5fac950036cd7 (block size in tokens, 16 x 4 chars;
  ``CacheNumGPUBlocks`` capacity).
* GIE ``pkg/epp/scheduling/framework/plugins/scorer/queue.go`` @ c729d434c1e66b964aec1cba51ccc55cbb82af45 and
  ``.../kvcacheutilizationscorer/kvcache_utilization.go`` @ a172f54a01a5d54ae4933897316a175f880c30ad; llm-d/llm-d-
  router ``pkg/epp/framework/plugins/scheduling/scorer/queuedepth/queue.go`` and ``.../kvcacheutilization/
  kvcache_utilization.go`` @ 2342697faf4e5a1a3ebf5e95d9ca5c903ba64c4a (unscraped endpoints unscored).
* GIE ``pkg/epp/scheduling/framework/plugins/picker/max_score_picker.go`` @ 02308be307b248a4ce2e908d34945178468f3f39.
* llm-d/llm-d-router ``pkg/epp/framework/plugins/scheduling/scorer/preciseprefixcache/precise_prefix_cache.go`` @
  0b59e4edb532ede6338d2ced835b3e09cedfdcaf and ``utils.go`` @ 83a9aea0276ff7080b5adeef0a16c02d37296636
  (``absoluteScoredPods``; total = floor(tokens / block size)); llm-d/llm-d-kv-cache ``pkg/kvcache/
  kvblock_scorer.go`` @ 05c77d51f200994395d6c6659011b25cc06e8599 (``LongestPrefixScorer``), ``pkg/kvcache/
  backend.go`` @ 5fe8e2050c072d7fda8719ed592787fe59769920 (tier weights gpu 1.0, cpu 0.8);
  llm-d/llm-d-inference-scheduler ``pkg/plugins/scorer/utils.go`` @ 2202f3ca54371e64d835b2257a4bb802b2184ecb
  (the earlier min-max normalization).

Approximations and deviations
-----------------------------
* Pods are kvscale backend URLs (GIE: namespaced names). Chat input is our JSON of the messages, not Go's
  ``json.Marshal`` of GIE's message structs (escaping and field order may differ; only affinity within one router
  matters, not equality with GIE's hashes).
* llm-d-router's main branch (after GIE v1.5) hashes 4-byte pseudo-tokens in blocks of at least 64 tokens (256
  bytes), keeps a trailing partial block and caps at 131072 tokens; set ``block_size_tokens`` / ``auto_tune`` /
  ``max_prefix_blocks`` to approach it (``min_block_size_tokens = 64``, ``max_prefix_blocks = 2048``); the partial
  block and its slightly different chaining are not modelled. Its ``max-score-picker`` breaks ties by round-robin
  rotation instead of at random; we keep GIE's random tie-break.
* Precise: blocks on every tier weigh 1 (kvscale's index keeps no CPU tier: llm-d's cpu weight 0.8 is not applied);
  no hybrid/sliding-window attention groups. The engine's actual block size is used (llm-d:
  ``tokenProcessorConfig.blockSize``, which must be set to it).
* In kvscale's virtual-clock evaluator the prompt text is one word per token (~6 characters), so the approximate
  scorer's 64-character blocks hold ~11 tokens and 256 blocks reach ~2.7k tokens: that is what llm-d's character
  heuristic would do with such text, and is kept on purpose.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from router.policies.base import Scorer
from router.policies.kv_events import KVEventsScorer

AVERAGE_CHARACTERS_PER_TOKEN = 4  # GIE averageCharactersPerToken
DEFAULT_BLOCK_SIZE_TOKENS = 16  # GIE DefaultBlockSizeTokens (vLLM's default block size)
DEFAULT_MAX_PREFIX_BLOCKS = 256  # GIE DefaultMaxPrefixBlocks
DEFAULT_LRU_CAPACITY_PER_SERVER = 31250  # GIE DefaultLRUCapacityPerServer
_SETTLE_WINDOW_S = 5.0  # a scored request whose pick is not known within this long is dropped from the queue


def input_bytes(ctx: Any) -> bytes:
    """The bytes GIE's prefix scorer hashes: the completion prompt, or the chat messages as JSON."""
    if ctx.endpoint == "chat" and isinstance(ctx.body.get("messages"), list):
        return json.dumps(ctx.body["messages"], separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
    return ctx.prompt.encode("utf-8", "surrogatepass")


def gie_prefix_hashes(data: bytes, model: str, block_chars: int, max_blocks: int, cache_salt: str = "") -> list[int]:
    """GIE ``hashPrompt``: chained XXH64 hashes of the full ``block_chars``-byte blocks of ``data`` (at most
    ``max_blocks``), seeded by the model name and cache salt; empty when ``data`` is shorter than one block."""
    if block_chars <= 0 or len(data) < block_chars:
        return []
    data = data[: block_chars * max_blocks]
    digest = xxhash.xxh64_intdigest
    prev = digest((model + cache_salt).encode("utf-8", "replace"))
    out: list[int] = []
    for i in range(0, len(data) - block_chars + 1, block_chars):
        prev = digest(data[i : i + block_chars] + prev.to_bytes(8, "little"))
        out.append(prev)
    return out


class ApproxPrefixIndexer:
    """GIE's prefix ``indexer``: ``hash -> pods`` plus one LRU of hashes per pod (capacity fixed at creation).

    As in GIE, ``add`` updates the LRU first and ``hash -> pods`` after, so a single request with more blocks than
    the pod's capacity leaves its own evicted blocks listed for the pod (never at the defaults: 256 < 31250)."""

    def __init__(self, default_capacity: int = DEFAULT_LRU_CAPACITY_PER_SERVER) -> None:
        self.default_capacity = default_capacity
        self.hash_to_pods: dict[int, set[str]] = {}
        self.pod_lru: dict[str, OrderedDict[int, None]] = {}
        self.capacity: dict[str, int] = {}

    def add(self, hashes: Iterable[int], pod: str, num_gpu_blocks: int = 0) -> None:
        hashes = list(hashes)
        lru = self.pod_lru.get(pod)
        if lru is None:
            lru = self.pod_lru[pod] = OrderedDict()
            self.capacity[pod] = num_gpu_blocks if num_gpu_blocks > 0 else self.default_capacity
        cap = self.capacity[pod]
        for h in hashes:  # golang-lru Add: refresh an existing key, else insert and evict the oldest past capacity
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            if len(lru) > cap:
                old, _ = lru.popitem(last=False)
                self._evicted(old, pod)
        for h in hashes:  # then hashToPods, as GIE does (after the LRU adds)
            self.hash_to_pods.setdefault(h, set()).add(pod)

    def _evicted(self, h: int, pod: str) -> None:
        pods = self.hash_to_pods.get(h)
        if pods is not None:
            pods.discard(pod)
            if not pods:
                del self.hash_to_pods[h]

    def get(self, h: int) -> set[str]:
        return self.hash_to_pods.get(h, set())

    def remove_pod(self, pod: str) -> None:
        lru = self.pod_lru.pop(pod, None)
        self.capacity.pop(pod, None)
        for h in lru or ():
            self._evicted(h, pod)

    def pods(self) -> list[str]:
        return list(self.pod_lru)

    def match_longest_prefix(self, hashes: Sequence[int]) -> dict[str, int]:
        """GIE ``matchLongestPrefix``: stop at the first hash no pod holds; each holder of a hash gets +1."""
        res: dict[str, int] = {}
        for h in hashes:
            pods = self.hash_to_pods.get(h)
            if not pods:
                break
            for pod in pods:
                res[pod] = res.get(pod, 0) + 1
        return res


@dataclass
class _PrefixState:
    hashes: list[int]
    backends: dict[str, Any]  # url -> Backend (for its num_gpu_blocks when the pick is recorded)
    recorded: set[str] = field(default_factory=set)


class LlmdPrefixScorer(Scorer):
    """GIE/llm-d approximate ``prefix-cache-scorer`` (see the module docstring)."""

    name = "llm-d-prefix"

    @dataclass(frozen=True)
    class Config:
        auto_tune: bool = True  # block size from the engine's block size, LRU capacity from its GPU blocks
        block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS
        chars_per_token: int = AVERAGE_CHARACTERS_PER_TOKEN
        min_block_size_tokens: int = 0  # 0 = no floor (llm-d-router main: 64)
        max_prefix_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS
        lru_capacity_per_server: int = DEFAULT_LRU_CAPACITY_PER_SERVER

        def validate(self) -> None:
            if min(self.block_size_tokens, self.chars_per_token, self.max_prefix_blocks,
                   self.lru_capacity_per_server) < 1 or self.min_block_size_tokens < 0:  # fmt: skip
                raise ValueError("block_size_tokens, chars_per_token, max_prefix_blocks and lru_capacity_per_server "
                                 "must be >= 1, min_block_size_tokens >= 0")  # fmt: skip

    def __init__(self, config: Config, services: Any) -> None:
        super().__init__(config, services)
        self.indexer = ApproxPrefixIndexer(config.lru_capacity_per_server)
        self._key = f"llm-d-prefix:{id(self)}"
        self._unsettled: deque[Any] = deque(maxlen=10_000)  # scored requests whose pick is not recorded yet

    def block_size_tokens(self, backends: Sequence[Any]) -> int:
        cfg = self.config
        bs = cfg.block_size_tokens
        if cfg.auto_tune and backends:
            stats = backends[0].stats
            if stats is not None and stats.block_size and stats.block_size > 0:
                bs = stats.block_size
        return max(bs, cfg.min_block_size_tokens)

    def hashes(self, ctx: Any, backends: Sequence[Any]) -> list[int]:
        salt = ctx.body.get("cache_salt") if isinstance(ctx.body, Mapping) else None
        block_chars = self.block_size_tokens(backends) * self.config.chars_per_token
        return gie_prefix_hashes(input_bytes(ctx), ctx.model, block_chars, self.config.max_prefix_blocks,
                                 salt if isinstance(salt, str) else "")  # fmt: skip

    def _record(self, ctx: Any, url: str) -> None:
        st: _PrefixState | None = ctx.state.get(self._key)
        if st is None or url in st.recorded:
            return
        st.recorded.add(url)
        if not st.hashes:
            return
        b = st.backends.get(url)
        stats = b.stats if b is not None else None
        gpu_blocks = stats.num_gpu_blocks if self.config.auto_tune and stats is not None else None
        self.indexer.add(st.hashes, url, gpu_blocks or 0)

    def settle(self) -> None:
        """Record the picks of earlier scored requests (the router appends the pick to ``ctx.tried``)."""
        keep: deque[Any] = deque(maxlen=self._unsettled.maxlen)
        now = self.services.clock()
        while self._unsettled:
            ctx = self._unsettled.popleft()
            if ctx.tried:
                for url in ctx.tried:
                    self._record(ctx, url)
            elif now - ctx.started < _SETTLE_WINDOW_S:
                keep.append(ctx)
        self._unsettled = keep

    def score(self, ctx, backends):
        self.settle()
        hashes = self.hashes(ctx, backends)
        prev: _PrefixState | None = ctx.state.get(self._key)
        st = _PrefixState(hashes, {b.url: b for b in backends}, prev.recorded if prev is not None else set())
        ctx.state[self._key] = st
        self._unsettled.append(ctx)
        total = len(hashes)
        if total == 0:
            return dict.fromkeys(backends, 0.0)
        matched = self.indexer.match_longest_prefix(hashes)
        return {b: matched.get(b.url, 0) / total for b in backends}

    def on_response_start(self, ctx, backend) -> None:
        self.settle()
        self._record(ctx, backend.url)

    def on_pool_change(self) -> None:
        pool = self.services.pool
        if pool is None:
            return
        live = {b.url for b in pool}
        for pod in self.indexer.pods():
            if pod not in live:
                self.indexer.remove_pod(pod)


class LlmdQueueScorer(Scorer):
    """llm-d ``queue-scorer``: min-max normalized waiting queue, shortest 1, longest 0, all equal 1."""

    name = "llm-d-queue"

    def score(self, ctx, backends):
        queues = {b: b.stats.waiting for b in backends if b.stats is not None}
        if not queues:
            return {}
        lo, hi = min(queues.values()), max(queues.values())
        if hi == lo:
            return dict.fromkeys(queues, 1.0)
        return {b: (hi - q) / (hi - lo) for b, q in queues.items()}


class LlmdKvUtilizationScorer(Scorer):
    """llm-d ``kv-cache-utilization-scorer``: ``1 - kv_usage``."""

    name = "llm-d-kv-utilization"

    def score(self, ctx, backends):
        return {b: 1.0 - b.stats.kv_usage for b in backends if b.stats is not None}


class LlmdPrecisePrefixScorer(KVEventsScorer):
    """llm-d ``precise-prefix-cache-scorer`` on kvscale's KV-event index (see the module docstring)."""

    name = "llm-d-precise-prefix"

    @dataclass(frozen=True)
    class Config(KVEventsScorer.Config):
        speculative: bool = False  # llm-d's speculativeIndexing defaults to false
        normalization: str = "absolute"  # "absolute" (llm-d now) | "min-max" (earlier llm-d releases)

        def validate(self) -> None:
            super().validate()
            if self.normalization not in ("absolute", "min-max"):
                raise ValueError("normalization must be 'absolute' or 'min-max'")

    def matched_blocks(self, ctx: Any, backends: Sequence[Any]) -> tuple[dict[Any, int], dict[Any, int]]:
        """(backend -> leading prompt blocks it holds, backend -> prompt full blocks at its block size)."""
        tokens, hit = self.cached_tokens(ctx, backends)
        if not tokens:
            return {}, {}
        mgr = self.manager
        by_size: dict[int, list[int]] = ctx.state.get("kv_hashes", {})
        matches: dict[int, dict[str, int]] = {}
        matched: dict[Any, int] = {}
        totals: dict[Any, int] = {}
        for b in backends:
            bs = mgr.block_size(b.url)
            hashes = by_size.get(bs, [])
            if bs not in matches:
                matches[bs] = mgr.index.match(hashes) if hashes else {}
            m = matches[bs].get(b.url, 0)
            if self.config.speculative:  # speculative entries, as far as the cached-token prediction shows them
                m = max(m, hit.get(b.url, 0) // bs)
            matched[b] = m
            totals[b] = len(hashes)
        return matched, totals

    def score(self, ctx, backends):
        self._sync()
        self.settle()
        matched, totals = self.matched_blocks(ctx, backends)
        self._unsettled.append(ctx)
        if self.config.normalization == "min-max":
            hits = {b: m for b, m in matched.items() if m > 0}
            if not hits:
                return dict.fromkeys(backends, 0.0)
            lo, hi = min(hits.values()), max(hits.values())
            return {b: (1.0 if hi == lo else (hits[b] - lo) / (hi - lo)) if b in hits else 0.0 for b in backends}
        return {b: min(1.0, matched[b] / totals[b]) if totals.get(b) else 0.0 for b in backends}


PLUGINS = (LlmdPrefixScorer, LlmdQueueScorer, LlmdKvUtilizationScorer, LlmdPrecisePrefixScorer)
POLICIES = {
    "peer:llm-d": {
        "scorers": [
            {"type": "llm-d-queue", "weight": 2.0},
            {"type": "llm-d-kv-utilization", "weight": 2.0},
            {"type": "llm-d-prefix", "weight": 3.0},
        ],
        "picker": {"type": "max-score"},
    },
    "peer:llm-d-precise": {
        "scorers": [
            {"type": "llm-d-precise-prefix", "weight": 2.0},
            {"type": "llm-d-kv-utilization", "weight": 1.0},
            {"type": "llm-d-queue", "weight": 1.0},
        ],
        "picker": {"type": "max-score"},
    },
}

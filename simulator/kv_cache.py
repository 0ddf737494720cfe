"""KV block manager with automatic prefix caching, after vLLM v1's ``BlockPool``/``KVCacheManager``.

* ``num_blocks`` blocks of ``block_size`` tokens, reference-counted.
* Free blocks sit in an LRU queue; a freed block keeps its hash (and stays a cache hit) until the queue hands it
  out again, which evicts it. Requests free their blocks tail first, so a prompt's last blocks go first.
* Full blocks are hashed with chained hashes and registered as soon as their tokens are scheduled; several blocks
  may carry the same hash (two requests with the same prefix in one step).
* Optional KV-event recording in vLLM's vocabulary (``BlockStored``/``BlockRemoved``/``AllBlocksCleared``).

Block state lives in flat lists (reference counts, hashes) rather than objects: replicas have tens of thousands
of blocks and the virtual-clock driver creates many replicas.
"""

from __future__ import annotations

from collections import OrderedDict

from kvscale.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from simulator.request import Request


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        record_events: bool = False,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, dict[int, None]] = {}  # hash -> block ids holding it
        self.record_events = record_events
        self.events: list[KVEvent] = []
        # prefix-cache counters in tokens, like vllm:prefix_cache_queries / _hits
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- queries -------------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (cached-but-free blocks count as free), as vllm:kv_cache_usage_perc."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def computed_prefix(self, req: Request) -> list[int]:
        """Block ids of the longest cached prefix of a request that has nothing computed yet.

        Like vLLM, at least the last token is always recomputed (its logits are needed), so a fully cached prompt
        hits all but its last block."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        hit: list[int] = []
        cached = self.cached
        for h in req.block_hashes[:max_blocks]:
            holders = cached.get(h)
            if not holders:
                break
            hit.append(next(iter(holders)))
        return hit

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    # -- allocation ----------------------------------------------------------------------------------------------
    def allocate(self, req: Request, num_new_tokens: int, computed: list[int] | None = None) -> bool:
        """Give ``req`` the blocks it needs to hold ``num_new_tokens`` more tokens (after ``computed`` cached
        blocks are attached). Returns False, changing nothing, when not enough blocks are free."""
        bs = self.block_size
        ref = self.ref_cnt
        free_queue = self.free_queue
        n_computed = len(computed) if computed else 0
        total_tokens = req.num_computed_tokens + n_computed * bs + num_new_tokens
        n_new = -(-total_tokens // bs) - len(req.block_ids) - n_computed
        if computed:
            # cached blocks we are about to touch may themselves be sitting in the free queue
            reusable_free = sum(1 for b in computed if ref[b] == 0)
            if n_new > len(free_queue) - reusable_free:
                return False
            for b in computed:
                if ref[b] == 0:
                    del free_queue[b]
                ref[b] += 1
            req.block_ids.extend(computed)
            req.num_hashed_blocks = len(req.block_ids)
        elif n_new > len(free_queue):
            return False
        if n_new > 0:
            self.take_blocks(req, n_new)
        if self.enable_prefix_caching and req.num_hashed_blocks < len(req.block_hashes):
            self.cache_full_blocks(req, min(total_tokens, req.num_tokens))
        return True

    def take_blocks(self, req: Request, n: int) -> None:
        """Append ``n`` blocks from the head of the free queue to the request, evicting cached ones.
        The caller has checked that ``n <= num_free_blocks``."""
        free_queue, hashes, ref, ids = self.free_queue, self.block_hash, self.ref_cnt, req.block_ids
        for _ in range(n):
            b = free_queue.popitem(last=False)[0]
            if hashes[b] is not None:
                self._evict(b)
            ref[b] = 1
            ids.append(b)

    def cache_full_blocks(self, req: Request, num_tokens: int) -> None:
        """Register the hashes of the request's blocks that are full within its first ``num_tokens`` tokens."""
        first = req.num_hashed_blocks
        n_full = min(num_tokens // self.block_size, len(req.block_hashes), len(req.block_ids))
        if n_full <= first:
            return
        hashes, ids, cached = self.block_hash, req.block_ids, self.cached
        for i in range(first, n_full):
            b = ids[i]
            h = req.block_hashes[i]
            hashes[b] = h
            holders = cached.get(h)
            if holders is None:
                cached[h] = {b: None}
            else:
                holders[b] = None
        req.num_hashed_blocks = n_full
        if self.record_events:
            bs = self.block_size
            self.events.append(
                BlockStored(
                    block_hashes=req.block_hashes[first:n_full],
                    parent_block_hash=req.block_hashes[first - 1] if first > 0 else None,
                    token_ids=req.token_slice(first * bs, n_full * bs),
                    block_size=bs,
                    lora_id=None,
                    medium="GPU",
                    lora_name=req.lora_name,
                )
            )

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        assert h is not None
        holders = self.cached.get(h)
        if holders is not None:
            holders.pop(b, None)
            if not holders:
                del self.cached[h]
        self.block_hash[b] = None
        if self.record_events:
            self.events.append(BlockRemoved(block_hashes=[h], medium="GPU"))

    def free(self, req: Request) -> None:
        """Release a request's blocks, tail first (so a prompt's last blocks are evicted first)."""
        ref, free_queue = self.ref_cnt, self.free_queue
        for b in reversed(req.block_ids):
            ref[b] -= 1
            if ref[b] == 0:
                free_queue[b] = None
        req.block_ids = []
        req.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash (vLLM refuses while blocks are in use; so do we)."""
        if len(self.free_queue) != self.num_blocks:
            return False
        self.block_hash = [None] * self.num_blocks
        self.cached.clear()
        if self.record_events:
            self.events.append(AllBlocksCleared())
        return True

    def drain_events(self) -> list[KVEvent]:
        ev, self.events = self.events, []
        return ev

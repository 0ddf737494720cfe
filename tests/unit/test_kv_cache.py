"""KV block manager: allocation, reference counts, prefix caching, LRU eviction, usage and KV events."""

from __future__ import annotations

import pytest

from kvscale.hashing import block_hashes
from kvscale.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from simulator.kv_cache import KVCacheManager
from simulator.request import Request
from simulator.scheduler import Scheduler, SchedulerConfig

BS = 4  # small blocks keep the arithmetic readable


def make_req(tokens: list[int] | range, rid: str = "r") -> Request:
    r = Request(rid, list(tokens), max_tokens=4, arrival_time=0.0)
    r.block_hashes = block_hashes(r.prompt_token_ids, BS)
    return r


def admit(kv: KVCacheManager, r: Request) -> int:
    """Schedule a whole waiting prompt as the scheduler does (cached prefix first); returns the hit in tokens."""
    computed = kv.computed_prefix(r)
    hit = len(computed) * kv.block_size
    assert kv.allocate(r, r.num_tokens - hit, computed)
    r.num_computed_tokens = r.num_tokens
    return hit


def snapshot(kv: KVCacheManager, *reqs: Request) -> tuple:
    return (
        list(kv.free_queue),
        list(kv.ref_cnt),
        list(kv.block_hash),
        {h: list(b) for h, b in kv.cached.items()},
        [(list(r.block_ids), r.num_hashed_blocks) for r in reqs],
        len(kv.events),
    )


# -- allocation and reference counts ------------------------------------------------------------------------------


def test_allocate_takes_blocks_from_the_free_queue_and_free_returns_them_tail_first() -> None:
    kv = KVCacheManager(8, BS)
    r = make_req(range(10))  # 2 full blocks + 2 tokens
    admit(kv, r)
    assert r.block_ids == [0, 1, 2]
    assert [kv.ref_cnt[b] for b in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert kv.num_free_blocks == 5
    # only full blocks are hashed
    assert kv.block_hash[:3] == [r.block_hashes[0], r.block_hashes[1], None]
    assert r.num_hashed_blocks == 2

    kv.free(r)
    assert r.block_ids == [] and r.num_hashed_blocks == 0
    assert kv.ref_cnt == [0] * 8
    assert list(kv.free_queue) == [3, 4, 5, 6, 7, 2, 1, 0]  # never-used blocks first, then the request's, tail first
    # freed blocks keep their hashes: still cache hits
    assert set(kv.cached) == set(r.block_hashes)


def test_allocate_grows_one_block_at_a_time_while_decoding() -> None:
    kv = KVCacheManager(8, BS)
    r = make_req(range(4))
    admit(kv, r)
    assert len(r.block_ids) == 1
    for n_tokens_after, n_blocks in [(5, 2), (6, 2), (7, 2), (8, 2), (9, 3)]:
        assert kv.allocate(r, 1)
        r.num_computed_tokens = n_tokens_after
        assert len(r.block_ids) == n_blocks, n_tokens_after


def test_shared_prefix_blocks_are_reference_counted() -> None:
    kv = KVCacheManager(8, BS)
    a, b = make_req(range(10), "a"), make_req(range(10), "b")
    admit(kv, a)
    assert admit(kv, b) == 8
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert [kv.ref_cnt[x] for x in a.block_ids] == [2, 2, 1]
    kv.free(a)
    assert [kv.ref_cnt[x] for x in b.block_ids] == [1, 1, 1]
    assert a.block_ids == []
    assert kv.num_free_blocks == 8 - 3  # only a's private tail block came back
    kv.free(b)
    assert kv.num_free_blocks == 8


# -- prefix hits -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_len", "expected_hit"),
    [
        (1, 0),
        (4, 0),  # one full block, but the last token is always recomputed
        (5, 4),
        (10, 8),
        (12, 8),  # three full blocks: hit capped at (12 - 1) // 4 = 2 blocks
        (13, 12),
    ],
)
def test_prefix_hit_after_a_finished_request_with_the_same_prompt(prompt_len: int, expected_hit: int) -> None:
    kv = KVCacheManager(16, BS)
    first = make_req(range(prompt_len), "first")
    assert admit(kv, first) == 0
    kv.free(first)
    again = make_req(range(prompt_len), "again")
    assert admit(kv, again) == expected_hit
    assert (kv.prefix_queries, kv.prefix_hits) == (0, 0)  # recorded by the scheduler, not by allocate


def test_prefix_hit_stops_at_the_first_different_block() -> None:
    kv = KVCacheManager(16, BS)
    a = make_req([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    admit(kv, a)
    kv.free(a)
    b = make_req([1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11, 12, 13])  # differs in block 1: blocks 1 and 2 miss
    assert kv.computed_prefix(b) == [0]  # a's first block
    assert admit(kv, b) == 4


def test_no_prefix_caching_means_no_hits_and_no_hashes() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    a = make_req(range(10))
    admit(kv, a)
    kv.free(a)
    assert kv.cached == {} and kv.block_hash == [None] * 8
    assert admit(kv, make_req(range(10), "b")) == 0


# -- LRU eviction -------------------------------------------------------------------------------------------------


def test_cached_blocks_are_evicted_only_when_handed_out_again_tail_first() -> None:
    kv = KVCacheManager(8, BS)
    a = make_req(range(13))  # blocks 0,1,2 full (hashes h0,h1,h2), block 3 holds one token
    admit(kv, a)
    h0, h1, h2 = a.block_hashes
    kv.free(a)
    assert list(kv.free_queue) == [4, 5, 6, 7, 3, 2, 1, 0]

    # c1 takes the four never-used blocks: every cached block survives
    c1 = make_req(range(1000, 1016), "c1")
    admit(kv, c1)
    assert c1.block_ids == [4, 5, 6, 7]
    assert kv.computed_prefix(make_req(range(13), "probe")) == [0, 1, 2]

    # c2 takes block 3 (no hash) and block 2 (a's tail full block): only h2 is evicted
    c2 = make_req(range(2000, 2008), "c2")
    admit(kv, c2)
    assert c2.block_ids == [3, 2]
    assert h2 not in kv.cached and h0 in kv.cached and h1 in kv.cached
    assert kv.block_hash[2] == c2.block_hashes[1]
    assert kv.computed_prefix(make_req(range(13), "again")) == [0, 1]


def test_usage_fraction_counts_cached_but_free_blocks_as_free() -> None:
    kv = KVCacheManager(8, BS)
    assert kv.usage == 0.0
    a = make_req(range(10))
    admit(kv, a)
    assert kv.usage == pytest.approx(3 / 8)
    b = make_req(range(10), "b")
    admit(kv, b)  # shares two blocks: one more block in use
    assert kv.usage == pytest.approx(4 / 8)
    kv.free(a)
    kv.free(b)
    assert kv.usage == 0.0
    assert kv.cached  # still cached


# -- duplicate hashes --------------------------------------------------------------------------------------------


def test_same_prompt_twice_in_one_step_shares_the_prefix_and_duplicates_the_capped_block() -> None:
    kv = KVCacheManager(8, BS)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    prompt = list(range(8))  # exactly two full blocks
    a = Request("a", prompt, 4, 0.0)
    b = Request("b", list(prompt), 4, 0.0)
    for r in (a, b):
        r.block_hashes = block_hashes(r.prompt_token_ids, BS)
        sched.add(r)
    batch = sched.schedule(0.0)
    assert [(r.request_id, n) for r, n in batch.items] == [("a", 8), ("b", 4)]
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 4)  # b hits a's block registered this very step
    assert (kv.prefix_queries, kv.prefix_hits) == (16, 4)
    h0, h1 = a.block_hashes
    assert b.block_ids[0] == a.block_ids[0]
    assert list(kv.cached[h0]) == [a.block_ids[0]]
    assert sorted(kv.cached[h1]) == sorted([a.block_ids[1], b.block_ids[1]])  # two blocks carry the same hash

    # evicting one holder of h1 leaves the other one serving hits
    kv.free(a)  # a's block 1 goes to the free queue, block 0 is still held by b
    filler = make_req(range(500, 500 + 4 * kv.num_free_blocks), "filler")
    admit(kv, filler)
    assert a.block_ids == [] and kv.num_free_blocks == 0
    assert list(kv.cached[h1]) == [b.block_ids[1]]
    kv.free(filler)
    assert admit(kv, make_req([*prompt, 8], "c")) == 8


# -- allocation failure -------------------------------------------------------------------------------------------


def test_allocate_returns_false_and_changes_nothing_when_blocks_are_short() -> None:
    kv = KVCacheManager(4, BS)
    a = make_req(range(12), "a")
    admit(kv, a)  # 3 of 4 blocks
    b = make_req(range(100, 108), "b")
    before = snapshot(kv, a, b)
    assert not kv.allocate(b, 8)
    assert snapshot(kv, a, b) == before
    assert kv.allocate(b, 4)  # one block still fits


def test_allocate_with_a_cached_prefix_counts_reused_free_blocks_and_changes_nothing_on_failure() -> None:
    kv = KVCacheManager(4, BS, record_events=True)
    a = make_req(range(9), "a")  # blocks 0,1 full (cached), block 2 partial
    admit(kv, a)
    kv.free(a)
    c = make_req(range(100, 108), "c")
    admit(kv, c)  # takes block 3 and block 2 (no hash): free queue is [1, 0], both cached
    assert list(kv.free_queue) == [1, 0]
    b = make_req(range(9), "b")
    computed = kv.computed_prefix(b)
    assert computed == [0, 1]
    before = snapshot(kv, a, b, c)
    # b needs its two cached blocks (taken out of the free queue) plus one new block: does not fit
    assert not kv.allocate(b, 1, computed)
    assert snapshot(kv, a, b, c) == before
    kv.free(c)
    assert kv.allocate(b, 1, computed)
    assert b.block_ids[:2] == [0, 1] and len(b.block_ids) == 3


def test_rejects_non_positive_sizes() -> None:
    with pytest.raises(ValueError):
        KVCacheManager(0, BS)
    with pytest.raises(ValueError):
        KVCacheManager(8, 0)


# -- KV events ---------------------------------------------------------------------------------------------------


def test_no_events_unless_recording() -> None:
    kv = KVCacheManager(8, BS)
    a = make_req(range(10))
    admit(kv, a)
    kv.free(a)
    assert kv.drain_events() == []


def test_block_stored_events_chain_parents_and_carry_the_prompt_tokens() -> None:
    kv = KVCacheManager(8, BS, record_events=True)
    prompt = [7, 3, 9, 1, 5, 5, 2, 8, 6, 4]
    r = make_req(prompt)
    r.lora_name = "adapter"
    h0, h1 = r.block_hashes
    # chunked prefill: 5 tokens, then the remaining 5
    assert kv.allocate(r, 5)
    r.num_computed_tokens = 5
    assert kv.allocate(r, 5)
    r.num_computed_tokens = 10
    events = kv.drain_events()
    assert events == [
        BlockStored([h0], None, prompt[0:4], BS, lora_id=None, medium="GPU", lora_name="adapter"),
        BlockStored([h1], h0, prompt[4:8], BS, lora_id=None, medium="GPU", lora_name="adapter"),
    ]
    assert kv.drain_events() == []  # drained

    # a whole prompt in one go gives one event for all of its blocks
    kv2 = KVCacheManager(8, BS, record_events=True)
    admit(kv2, make_req(prompt))
    assert kv2.drain_events() == [BlockStored([h0, h1], None, prompt[:8], BS)]


def test_block_removed_events_on_eviction_tail_first() -> None:
    kv = KVCacheManager(3, BS, record_events=True)
    a = make_req(range(9))  # blocks 0, 1 cached; block 2 partial
    admit(kv, a)
    h0, h1 = a.block_hashes
    kv.free(a)
    kv.drain_events()
    b = make_req(range(100, 112), "b")  # needs all three blocks: evicts in free-queue order 2 (no hash), 1, 0
    admit(kv, b)
    events = kv.drain_events()
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert removed == [BlockRemoved([h1], "GPU"), BlockRemoved([h0], "GPU")]
    assert events[-1] == BlockStored(b.block_hashes[:3], None, list(range(100, 112)), BS)


def test_reset_prefix_cache_refuses_while_blocks_are_in_use() -> None:
    kv = KVCacheManager(8, BS, record_events=True)
    a = make_req(range(10))
    admit(kv, a)
    kv.drain_events()
    assert kv.reset_prefix_cache() is False
    assert kv.drain_events() == []
    assert set(kv.cached) == set(a.block_hashes)

    kv.free(a)
    assert kv.reset_prefix_cache() is True
    assert kv.drain_events() == [AllBlocksCleared()]
    assert kv.cached == {} and kv.block_hash == [None] * 8
    assert admit(kv, make_req(range(10), "b")) == 0

"""KV-event index: engine hashes mapped onto ours, prefix matches, removals, resets and the memory bound.

Events come from the simulator's real KV cache manager / engine core (``record_events=True``); to show that the
engine's hash function does not matter, engine hashes are passed through a seeded bijection before the index sees
them, as a vLLM pod (sha256 with a per-process seed) would give different ids for the same blocks.
"""

from __future__ import annotations

import random

import pytest

from kvscale.hashing import block_hashes
from kvscale.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvscale.latency import LatencyModel, StepCoefficients
from router.kvevents import KVBlockIndex, KVEventsManager, cached_tokens, request_hashes
from simulator.engine import EngineConfig, EngineCore
from simulator.request import Request
from simulator.scheduler import SchedulerConfig

BS = 4
MASK = 2**64 - 1


def reseed(events: list[KVEvent], seed: int) -> list[KVEvent]:
    """The same events as an engine with another hash seed would publish them (a bijection on 64-bit ids)."""
    def f(h: int | None) -> int | None:
        return None if h is None else ((h ^ seed) * 0x9E3779B97F4A7C15) & MASK

    out: list[KVEvent] = []
    for ev in events:
        if isinstance(ev, BlockStored):
            out.append(BlockStored([f(h) for h in ev.block_hashes], f(ev.parent_block_hash), ev.token_ids,
                                   ev.block_size, lora_name=ev.lora_name))  # fmt: skip
        elif isinstance(ev, BlockRemoved):
            out.append(BlockRemoved([f(h) for h in ev.block_hashes]))
        else:
            out.append(ev)
    return out


def stored(tokens: list[int], engine_hashes: list[int], parent: int | None = None, lora: str | None = None):
    return BlockStored(engine_hashes, parent, tokens, BS, lora_name=lora)


def test_same_tokens_on_two_engines_with_different_hashes_map_to_one_entry() -> None:
    idx = KVBlockIndex()
    toks = list(range(100, 112))  # three blocks
    idx.apply("a", stored(toks, [11, 12, 13]))
    idx.apply("b", stored(toks[:8], [901, 902]))
    ours = request_hashes([*toks, 1, 2], BS)
    assert idx.match(ours) == {"a": 3, "b": 2}
    assert idx.num_blocks == 3
    # a child block stored later chains from the parent's engine hash
    idx.apply("b", stored(toks[8:12], [903], parent=902))
    assert idx.match(ours) == {"a": 3, "b": 3}
    # a different prefix shares nothing even with equal later tokens
    assert idx.match(request_hashes([7, 7, 7, 7, *toks[4:]], BS)) == {}


def test_removal_duplicates_clear_and_unknown_parent() -> None:
    idx = KVBlockIndex()
    toks = list(range(40, 48))
    idx.apply("a", stored(toks, [1, 2]))
    idx.apply("a", stored(toks, [1, 2]))  # two engine blocks with the same hash (same prefix in one step)
    ours = request_hashes(toks, BS)
    idx.apply("a", BlockRemoved([2]))
    assert idx.match(ours) == {"a": 2}  # one copy of block 2 is still cached
    idx.apply("a", BlockRemoved([2]))
    assert idx.match(ours) == {"a": 1}
    idx.apply("a", BlockRemoved([999]))  # unknown: ignored
    idx.apply("a", stored(list(range(4)), [50], parent=777))  # parent never seen: cannot be mapped
    assert idx.stats.unmapped_blocks == 1
    idx.apply("a", AllBlocksCleared())
    assert idx.match(ours) == {} and idx.num_blocks == 0 and idx.backend_blocks("a") == 0


def test_lora_blocks_are_kept_apart_from_base_model_blocks() -> None:
    idx = KVBlockIndex()
    toks = list(range(8))
    idx.apply("a", stored(toks, [1, 2], lora="sql"))
    assert idx.match(request_hashes(toks, BS)) == {}
    assert idx.match(request_hashes(toks, BS, "sql")) == {"a": 2}


def test_memory_is_bounded_per_backend() -> None:
    idx = KVBlockIndex(max_blocks_per_backend=100)
    rng = random.Random(0)
    for i in range(1000):  # removals never arrive: only the cap keeps the index small
        idx.apply("a", stored([rng.randrange(30000) for _ in range(BS)], [i]))
    assert idx.backend_blocks("a") == 100 and idx.num_blocks == 100
    assert idx.stats.evicted_blocks == 900
    idx.remove_backend("a")
    assert idx.num_blocks == 0 and idx.backends == []


def test_cached_tokens_always_recomputes_the_last_token() -> None:
    assert cached_tokens(16, 4, 4) == 12
    assert cached_tokens(17, 4, 4) == 16
    assert cached_tokens(17, 2, 4) == 8
    assert cached_tokens(0, 3, 4) == 0


def _model() -> LatencyModel:
    return LatencyModel(name="unit", coefficients=StepCoefficients(1e-3, 1e-6, 0.0, 1e-5, 0.0))


@pytest.mark.parametrize("seed", [0, 1])
def test_index_predicts_the_engine_prefix_hits_under_eviction(seed: int) -> None:
    """Two simulated engines with small caches (evictions happen); after every step the index's prediction of the
    cached tokens for a probe prompt equals what the engine's prefix cache would give it."""
    rng = random.Random(seed)
    cfg = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512),
                       block_size=BS, num_gpu_blocks=96)  # fmt: skip
    engines = {name: EngineCore(cfg, _model(), record_events=True) for name in ("p0", "p1")}
    salts = {"p0": 0xABC, "p1": 0x123}
    prefixes = [[rng.randrange(100, 30000) for _ in range(rng.choice([8, 16, 24]))] for _ in range(6)]
    mgr = KVEventsManager(default_block_size=BS)
    idx = mgr.index
    now, n, hits = 0.0, 0, 0
    for _ in range(120):
        for name, eng in engines.items():
            if rng.random() < 0.5:
                prompt = rng.choice(prefixes) + [rng.randrange(100, 30000) for _ in range(rng.randrange(1, 9))]
                eng.add_request(Request(f"{name}-{n}", prompt, rng.randrange(1, 6), now), now)
                n += 1
            out = eng.step(now)
            for ev in reseed(eng.kv.drain_events(), salts[name]):
                idx.apply(name, ev)
        now += 0.01
        probe = [*rng.choice(prefixes), 5, 6, 7]
        predicted = mgr.predict_cached_tokens(probe, engines)
        hits += sum(v > 0 for v in predicted.values())
        for name, eng in engines.items():
            r = Request("probe", probe, 1, now)
            r.block_hashes = block_hashes(probe, BS)
            assert predicted[name] == len(eng.kv.computed_prefix(r)) * BS, (name, out)
    assert idx.stats.removed_blocks > 0  # evictions were exercised
    assert hits > 50  # and so were hits

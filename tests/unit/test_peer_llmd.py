"""Unit tests of the llm-d peer policies (``peer:llm-d``, ``peer:llm-d-precise``) and their scorers."""

from __future__ import annotations

import json
import random

import pytest
import xxhash

from kvscale.engine_stats import EngineStats
from kvscale.kv_events import BlockStored
from router.backends import Backend
from router.context import RequestContext
from router.policies import PluginConfigError, Services, build_pipeline, load_registry
from router.policies.peer_llmd import ApproxPrefixIndexer, gie_prefix_hashes
from router.prefix_index import PrefixIndex

BS = 16  # engine block size (tokens)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture
def services() -> Services:
    return Services(clock=Clock(), rng=random.Random(0), prefix_index=PrefixIndex())


def backend(url: str, running: float = 0.0, waiting: float = 0.0, kv: float = 0.0, gpu_blocks: int | None = None):
    b = Backend(url)
    b.stats = EngineStats("vllm", 0.0, running, waiting, kv, block_size=BS, num_gpu_blocks=gpu_blocks)
    b.stats_at = 0.0
    return b


def words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 30000) for _ in range(n)]


def ctx(rid: str, prompt, model: str = "m") -> RequestContext:
    text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return RequestContext(rid, model, "completions", text, {"model": model, "prompt": prompt}, {})


def pipeline(registry, services, name: str):
    return build_pipeline(name, registry.presets[name], registry, services)


def scorer_of(p, name: str):
    return next(s for s, _ in p.scorers if s.name == name)


def serve(p, c: RequestContext, chosen: Backend) -> None:
    """What the router does after the pick: remember it, then the first byte arrives."""
    c.tried.append(chosen.url)
    p.on_response_start(c, chosen)


def test_presets_use_llmds_weights_and_max_score_picker(registry, services):
    p = pipeline(registry, services, "peer:llm-d")
    assert {s.name: w for s, w in p.scorers} == {"llm-d-queue": 2.0, "llm-d-kv-utilization": 2.0, "llm-d-prefix": 3.0}
    assert p.picker.name == "max-score"
    q = pipeline(registry, services, "peer:llm-d-precise")
    assert {s.name: w for s, w in q.scorers} == {
        "llm-d-precise-prefix": 2.0, "llm-d-kv-utilization": 1.0, "llm-d-queue": 1.0}  # fmt: skip
    assert q.picker.name == "max-score"
    with pytest.raises(PluginConfigError):
        build_pipeline("bad", {"scorers": [{"type": "llm-d-precise-prefix", "config": {"normalization": "x"}}]},
                       registry, services)  # fmt: skip


def test_prefix_affinity_after_a_request_is_served(registry, services):
    rng = random.Random(1)
    p = pipeline(registry, services, "peer:llm-d")
    bs = [backend(f"http://b{i}") for i in range(3)]
    system = words(rng, 200)  # ~1200 chars: 18 blocks of 64
    first = ctx("r0", system + words(rng, 5))
    chosen = p.select(first, bs)
    serve(p, first, chosen)
    prefix = scorer_of(p, "llm-d-prefix")
    for i in range(10):
        c = ctx(f"r{i + 1}", system + words(rng, 5))
        scores = prefix.score(c, bs)
        assert scores[chosen] > 0.8 and all(scores[b] == 0.0 for b in bs if b is not chosen)
        assert p.select(c, bs) is chosen
        serve(p, c, chosen)
    # an unrelated prompt matches nowhere
    assert set(prefix.score(ctx("other", words(rng, 200)), bs).values()) == {0.0}


def test_prefix_learns_at_the_pick_not_at_the_first_byte(registry, services):
    """GIE records the pick in PreRequest: the next request already sees it, before any response started."""
    rng = random.Random(2)
    p = pipeline(registry, services, "peer:llm-d")
    bs = [backend(f"http://b{i}") for i in range(4)]
    prompt = words(rng, 150)
    first = ctx("a", prompt)
    chosen = p.select(first, bs)
    first.tried.append(chosen.url)  # the router's bookkeeping only: no on_response_start
    second = ctx("b", prompt)
    assert scorer_of(p, "llm-d-prefix").score(second, bs)[chosen] == 1.0
    assert p.select(second, bs) is chosen


def test_prefix_hashing_matches_gie(registry, services):
    p = pipeline(registry, services, "peer:llm-d")
    prefix = scorer_of(p, "llm-d-prefix")
    bs = [backend("http://a")]
    text = "x" * 63
    assert prefix.hashes(ctx("s", text), bs) == []  # shorter than one 64-char block (16 tokens x 4)
    text = "".join(chr(97 + i % 26) for i in range(64 * 300 + 10))
    hashes = prefix.hashes(ctx("l", text), bs)
    assert len(hashes) == 256  # truncated to maxPrefixBlocksToMatch
    prev = xxhash.xxh64_intdigest(b"m")  # h0 = hash(model)
    for i in range(3):
        prev = xxhash.xxh64_intdigest(text[i * 64 : (i + 1) * 64].encode() + prev.to_bytes(8, "little"))
        assert hashes[i] == prev
    # auto_tune: the engine's block size sets the block length (32 tokens -> 128 chars)
    b32 = backend("http://c")
    b32.stats = EngineStats("vllm", 0.0, 0, 0, 0.0, block_size=32)
    assert len(prefix.hashes(ctx("l", text[:1280]), [b32])) == 10
    # another model never shares hashes; chat input is the messages' JSON
    assert gie_prefix_hashes(b"y" * 128, "m1", 64, 256) != gie_prefix_hashes(b"y" * 128, "m2", 64, 256)
    msgs = [{"role": "user", "content": "z" * 200}]
    chat = RequestContext("c", "m", "chat", "ignored", {"model": "m", "messages": msgs}, {})
    blob = json.dumps(msgs, separators=(",", ":")).encode()
    assert prefix.hashes(chat, bs) == gie_prefix_hashes(blob, "m", 64, 256)


def test_indexer_lru_per_server_and_greedy_match():
    idx = ApproxPrefixIndexer(default_capacity=3)
    idx.add([1, 2, 3], "a")
    assert idx.match_longest_prefix([1, 2, 3, 4]) == {"a": 3}
    idx.add([4], "a")  # capacity 3: hash 1 (the oldest) is evicted for a
    assert idx.get(1) == set() and idx.match_longest_prefix([1, 2, 3]) == {}
    idx.add([1, 2], "b", num_gpu_blocks=10)
    assert idx.capacity["b"] == 10
    # GIE's greedy walk: a holds 2,3 but not 1; b keeps the walk alive through block 1, so a still counts 2 and 3
    assert idx.match_longest_prefix([1, 2, 3]) == {"b": 2, "a": 2}
    idx.add([2], "a")  # re-adding refreshes recency: 3 is now a's oldest
    idx.add([9], "a")
    assert "a" not in idx.get(3) and "a" in idx.get(2)
    idx.remove_pod("a")
    assert idx.pods() == ["b"] and idx.get(4) == set()


def test_prefix_lru_capacity_comes_from_the_engines_gpu_blocks(registry, services):
    rng = random.Random(3)
    p = pipeline(registry, services, "peer:llm-d")
    prefix = scorer_of(p, "llm-d-prefix")
    small = backend("http://small", gpu_blocks=20)
    one, two = words(rng, 200), words(rng, 200)  # 18 blocks of 64 chars each
    for rid, prompt in (("x", one), ("y", two)):
        c = ctx(rid, prompt)
        p.select(c, [small])
        serve(p, c, small)
    assert prefix.indexer.capacity["http://small"] == 20
    assert len(prefix.indexer.pod_lru["http://small"]) == 20
    # the second prompt pushed the first one's leading blocks out: the greedy walk stops at block 0
    assert prefix.score(ctx("z", one), [small])[small] == 0.0
    assert prefix.score(ctx("w", two), [small])[small] == 1.0
    big = backend("http://big")  # no num_gpu_blocks: lruCapacityPerServer
    c = ctx("v", one)
    p.select(c, [big])
    serve(p, c, big)
    assert prefix.indexer.capacity["http://big"] == 31250


def test_queue_scorer_min_max_normalization(registry, services):
    q = scorer_of(pipeline(registry, services, "peer:llm-d"), "llm-d-queue")
    a, b, c = backend("http://a", waiting=0), backend("http://b", waiting=5), backend("http://c", waiting=10)
    assert q.score(ctx("r", "p"), [a, b, c]) == {a: 1.0, b: 0.5, c: 0.0}
    b2, c2 = backend("http://b", waiting=3), backend("http://c", waiting=3)
    assert q.score(ctx("r", "p"), [b2, c2]) == {b2: 1.0, c2: 1.0}  # all equal: neutral 1
    fresh = Backend("http://new")  # never scraped: unscored, and outside the range
    assert q.score(ctx("r", "p"), [a, b, fresh]) == {a: 1.0, b: 0.0}


def test_kv_utilization_scorer(registry, services):
    kv = scorer_of(pipeline(registry, services, "peer:llm-d"), "llm-d-kv-utilization")
    a, b = backend("http://a", kv=0.25), backend("http://b", kv=0.9)
    fresh = Backend("http://new")
    s = kv.score(ctx("r", "p"), [a, b, fresh])
    assert s[a] == pytest.approx(0.75) and s[b] == pytest.approx(0.1) and fresh not in s


def test_weights_combine_as_llmds(registry, services):
    """A holds the prefix but a long queue and a half-full cache; B is idle with a small cache use.
    llm-d's 3/2/2: A = 3*1 + 2*0 + 2*0.5 = 4.0 > B = 0 + 2*1 + 2*0.8 = 3.6. (Equal weights would pick B.)"""
    rng = random.Random(4)
    p = pipeline(registry, services, "peer:llm-d")
    a, b = backend("http://a"), backend("http://b")
    prompt = words(rng, 120)
    warm = ctx("w", prompt)
    assert p.select(warm, [a]) is a
    serve(p, warm, a)
    a.stats = EngineStats("vllm", 1.0, 4, 10, 0.5, block_size=BS)
    b.stats = EngineStats("vllm", 1.0, 0, 0, 0.2, block_size=BS)
    c = ctx("c", prompt)
    totals = {x: 0.0 for x in (a, b)}
    for s, w in p.scorers:
        sc = s.score(c, [a, b])
        for x in totals:
            totals[x] += w * sc.get(x, 0.0)
    assert totals[a] == pytest.approx(4.0) and totals[b] == pytest.approx(3.6)
    assert p.select(c, [a, b]) is a
    b.stats = EngineStats("vllm", 2.0, 0, 0, 0.0, block_size=BS)  # B's cache empties: 0 + 2 + 2 = 4.0
    a.stats = EngineStats("vllm", 2.0, 4, 10, 0.6, block_size=BS)  # and A fills: 3 + 0 + 0.8 = 3.8
    assert p.select(ctx("d", prompt), [a, b]) is b


def precise_setup(registry, services, config: dict | None = None):
    """The ``peer:llm-d-precise`` preset, or the same with the precise scorer's config overridden."""
    spec = json.loads(json.dumps(registry.presets["peer:llm-d-precise"]))
    if config:
        spec["scorers"][0]["config"] = config
    p = build_pipeline("precise", spec, registry, services)
    return p, scorer_of(p, "llm-d-precise-prefix")


def test_precise_prefers_the_pod_holding_the_blocks(registry, services):
    rng = random.Random(5)
    p, precise = precise_setup(registry, services)
    a, b, c = backend("http://a"), backend("http://b"), backend("http://c")
    tokens = words(rng, 4 * BS + 5)  # 4 full blocks + a partial one
    idx = services.extras["kvevents"].index
    idx.apply(b.url, BlockStored([11, 12], None, tokens[: 2 * BS], BS))
    idx.apply(c.url, BlockStored([21], None, tokens[:BS], BS))
    r = ctx("q", tokens)
    scores = precise.score(r, [a, b, c])
    assert scores == {a: 0.0, b: 0.5, c: 0.25}  # consecutive blocks held / floor(tokens / block size)
    assert p.select(ctx("q2", tokens), [a, b, c]) is b
    idx.apply(c.url, BlockStored([22, 23, 24], 21, tokens[BS : 4 * BS], BS))
    assert precise.score(ctx("q3", tokens), [a, b, c])[c] == 1.0  # all 4 full blocks: capped at 1
    assert p.select(ctx("q4", tokens), [a, b, c]) is c


def test_precise_does_not_speculate_by_default(registry, services):
    rng = random.Random(6)
    p, precise = precise_setup(registry, services)
    bs = [backend(f"http://b{i}") for i in range(3)]
    tokens = words(rng, 5 * BS)
    first = ctx("a", tokens)
    chosen = p.select(first, bs)
    serve(p, first, chosen)
    # no KV event arrived: llm-d (speculativeIndexing false) sees no cached block anywhere
    assert set(precise.score(ctx("b", tokens), bs).values()) == {0.0}


def test_precise_min_max_normalization(registry, services):
    rng = random.Random(7)
    _, precise = precise_setup(registry, services, {"normalization": "min-max"})
    a, b, c = backend("http://a"), backend("http://b"), backend("http://c")
    tokens = words(rng, 8 * BS)
    idx = services.extras["kvevents"].index
    idx.apply(b.url, BlockStored([1, 2, 3, 4], None, tokens[: 4 * BS], BS))
    idx.apply(c.url, BlockStored([5], None, tokens[:BS], BS))
    assert precise.score(ctx("m", tokens), [a, b, c]) == {a: 0.0, b: 1.0, c: 0.0}  # min among hits -> 0
    idx.apply(a.url, BlockStored([6, 7], None, tokens[: 2 * BS], BS))
    s = precise.score(ctx("n", tokens), [a, b, c])
    assert s[b] == 1.0 and s[c] == 0.0 and s[a] == pytest.approx(1 / 3)

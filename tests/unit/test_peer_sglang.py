"""Unit tests of the ``sglang-cache-aware`` picker (SGLang model-gateway ``cache_aware`` re-implementation)."""

from __future__ import annotations

import random
import time

import pytest

from router.backends import Backend, BackendPool, BackendSpec
from router.context import RequestContext
from router.policies import PluginConfigError, Services, build_pipeline, load_registry
from router.policies.peer_sglang import ApproxTree, routing_text

PRESET = "peer:sglang-cache-aware"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def make(registry, clock=None, pool=None, **config):
    services = Services(clock=clock or Clock(), rng=random.Random(0), pool=pool)
    spec = {"picker": {"type": "sglang-cache-aware", "config": config}} if config else registry.presets[PRESET]
    return build_pipeline(PRESET, spec, registry, services)


def ctx(prompt: str, rid: str = "r", model: str = "m") -> RequestContext:
    return RequestContext(rid, model, "completions", prompt, {"model": model, "prompt": prompt}, {})


def three() -> list[Backend]:
    return [Backend("http://a"), Backend("http://b"), Backend("http://c")]


def loads(bs, *values):
    for b, v in zip(bs, values, strict=True):
        b.in_flight = v


def recount(tree: ApproxTree) -> dict[str, int]:
    """Characters per tenant, recomputed from the nodes (must equal the maintained counts)."""
    out: dict[str, int] = {}
    stack = [tree.root]
    while stack:
        node = stack.pop()
        for t in node.tenants:
            out[t] = out.get(t, 0) + len(node.text)
        stack.extend(node.children.values())
    return out


DOC = "You are a helpful assistant. " + "".join(f"fact {i} is {i * 7919 % 1000}. " for i in range(60))


def test_preset_is_registered_with_sglang_defaults(registry):
    assert registry.presets[PRESET] == {"picker": {"type": "sglang-cache-aware"}}
    cfg = make(registry).picker.config
    assert (cfg.cache_threshold, cfg.balance_abs_threshold, cfg.balance_rel_threshold) == (0.3, 64, 1.5)
    assert (cfg.eviction_interval_s, cfg.max_tree_size, cfg.low_match) == (60.0, 2**26, "min-load")


def test_repeated_prompt_follows_its_prefix_when_balanced(registry):
    p, bs = make(registry), three()
    loads(bs, 1, 0, 1)
    first = p.select(ctx(DOC + "Q: first?"), bs)
    assert first is bs[1]  # miss -> least loaded
    loads(bs, 0, 3, 0)  # b now the busiest, still balanced (3 - 0 <= 64)
    for i in range(5):
        assert p.select(ctx(DOC + f"Q: question {i}?"), bs) is bs[1]
    # without the shared prefix the same loads send the request to the least-loaded backend
    assert p.select(ctx("completely unrelated text " * 20), bs) is bs[0]


def test_imbalance_beyond_both_thresholds_goes_to_least_loaded(registry):
    p, bs = make(registry), three()
    loads(bs, 1, 0, 1)
    assert p.select(ctx(DOC + "Q0"), bs) is bs[1]
    # abs exceeded (65 > 64) but not rel (200 <= 135 * 1.5): still cache-aware
    loads(bs, 135, 200, 150)
    assert p.select(ctx(DOC + "Q1"), bs) is bs[1]
    # rel exceeded but not abs: still cache-aware
    loads(bs, 10, 60, 12)
    assert p.select(ctx(DOC + "Q2"), bs) is bs[1]
    # both exceeded: shortest queue regardless of the prefix, and the tree learns the prompt for it
    loads(bs, 10, 100, 20)
    assert p.select(ctx(DOC + "Q3"), bs) is bs[0]
    tree = p.picker.trees["m"]
    assert tree.char_count["http://a"] >= len(DOC)


def test_low_match_goes_to_smallest_tree_or_least_loaded(registry):
    p, bs = make(registry, low_match="smallest-tree"), three()
    tree = p.picker.trees.setdefault("m", ApproxTree())
    tree.insert("A" * 500, "http://a", 0.0)
    tree.insert("B" * 50, "http://b", 0.0)
    tree.insert("C" * 200, "http://c", 0.0)
    loads(bs, 0, 5, 1)  # least-loaded would be a
    # 20 % of the prompt matches a's text: below cache_threshold 0.3 -> miss -> smallest tree (b)
    prompt = "A" * 20 + "x" * 80
    assert p.select(ctx(prompt), bs) is bs[1]
    assert tree.char_count["http://b"] == 50 + len(prompt)
    # a high match still wins over the small tree
    assert p.select(ctx("C" * 200 + "tail"), bs) is bs[2]

    q, bs2 = make(registry), three()  # default low_match: least loaded
    tq = q.picker.trees.setdefault("m", ApproxTree())
    tq.insert("A" * 500, "http://a", 0.0)
    loads(bs2, 0, 5, 1)
    assert q.select(ctx("y" * 100), bs2) is bs2[0]


def test_eviction_bounds_the_tree_after_the_interval(registry):
    clock = Clock()
    p, bs = make(registry, clock, max_tree_size=100, eviction_interval_s=10), three()
    picker = p.picker
    loads(bs, 0, 1, 1)
    prompts = [chr(ord("a") + i) * 40 for i in range(6)]  # 40 chars each, no shared prefix
    for i, pr in enumerate(prompts):
        clock.t = 1000.0 + i  # still inside the first interval
        assert p.select(ctx(pr), bs) is bs[0]
    tree = picker.trees["m"]
    assert tree.char_count["http://a"] == 240 and recount(tree) == tree.char_count
    clock.t = 1010.0  # interval boundary: the next pick trims first
    p.select(ctx(""), bs)
    assert tree.char_count["http://a"] <= 100
    assert recount(tree) == tree.char_count
    # LRU: the oldest prompts went, the most recent one stayed
    assert tree.prefix_match(prompts[0], clock.t)[0] == 0
    assert tree.prefix_match(prompts[-1], clock.t)[0] == 40
    before = tree.node_count()
    for pr in prompts:  # back over the limit, but no trim until the next boundary
        clock.t = 1011.0
        p.select(ctx(pr), bs)
    assert tree.char_count["http://a"] > 100
    clock.t = 1020.0
    p.select(ctx(""), bs)
    assert tree.char_count["http://a"] <= 100 and tree.node_count() <= before + 1


def test_config_rejects_bad_values(registry):
    for bad in (
        {"cache_threshold": 1.5},
        {"cache_threshold": -0.1},
        {"balance_abs_threshold": -1},
        {"balance_rel_threshold": 0.5},
        {"eviction_interval_s": -1},
        {"max_tree_size": -5},
        {"low_match": "nearest"},
        {"balance_abs_threshold": 1.5},
        {"unknown": 1},
    ):
        with pytest.raises(PluginConfigError):
            make(registry, **bad)
    make(registry, balance_abs_threshold=0, balance_rel_threshold=1.0, eviction_interval_s=0)


def test_tree_splits_and_counts_stay_consistent():
    rng = random.Random(1)
    tree = ApproxTree()
    texts = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 12))) for _ in range(300)]
    for i, t in enumerate(texts):
        tree.insert(t, f"t{i % 3}", float(i))
        assert recount(tree) == tree.char_count
    for t in texts:
        matched, tenant = tree.prefix_match(t, 1e6)
        assert matched == len(t) and tenant is not None
    tree.evict(5)
    assert recount(tree) == tree.char_count and all(v <= 5 for v in tree.char_count.values())
    tree.remove_tenant("t1")
    assert "t1" not in tree.char_count and recount(tree) == tree.char_count


def test_departed_backends_are_forgotten(registry):
    clock = Clock()
    pool = BackendPool(clock)
    pool.update([BackendSpec("http://a"), BackendSpec("http://b")])
    p = make(registry, clock, pool)
    a, b = pool.get("http://a"), pool.get("http://b")
    a.in_flight = 1
    assert p.select(ctx(DOC), [a, b]) is b
    pool.update([BackendSpec("http://a")])
    p.on_pool_change()
    tree = p.picker.trees["m"]
    assert "http://b" not in tree.char_count and tree.prefix_match(DOC, clock.t) == (0, None)


def test_chat_text_is_sglang_routing_text():
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
            {"role": "assistant", "content": None, "reasoning_content": "hmm"},
        ],
    }
    c = RequestContext("r", "m", "chat", "<rendered>", body, {})
    assert routing_text(c) == "sys hi hmm"
    assert routing_text(ctx("plain")) == "plain"


def test_long_prompts_are_cheap(registry):
    p, bs = make(registry), three()
    base = "".join(random.Random(2).choice("abcdefghij ") for _ in range(90_000))
    t0 = time.perf_counter()
    chosen = {p.select(ctx(base + f" turn {i}"), bs).url for i in range(40)}
    assert time.perf_counter() - t0 < 5.0
    assert len(chosen) == 1  # all follow the first request's backend

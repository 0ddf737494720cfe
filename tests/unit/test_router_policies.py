"""Unit tests of the router's policy pipeline, plugin registry, strict config parsing and prefix index."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from kvscale.engine_stats import EngineStats
from kvscale.hashing import text_block_hashes
from router.backends import Backend, BackendPool, BackendSpec, EjectionPolicy, parse_backend_spec
from router.context import RequestContext, render_messages, validate_body
from router.errors import ApiError
from router.policies import (
    PluginConfigError,
    Scorer,
    Services,
    build_pipeline,
    build_policies,
    load_registry,
    parse_config,
)
from router.prefix_index import PrefixIndex


def ctx(prompt: str = "hello", model: str = "m", **kw) -> RequestContext:
    return RequestContext("r1", model, "completions", prompt, {"model": model, "prompt": prompt}, {}, **kw)


def backends(n: int, **kw) -> list[Backend]:
    return [Backend(f"http://b{i}", configured_models=frozenset({"m"}), **kw) for i in range(n)]


@pytest.fixture
def services() -> Services:
    return Services(rng=random.Random(0), prefix_index=PrefixIndex(1000))


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_registry_has_all_builtin_policies(registry):
    assert {"round-robin", "random", "least-request", "least-kv", "power-of-two", "prefix"} <= set(registry.presets)
    assert {"max-score", "round-robin", "random"} <= set(registry.names("picker"))
    assert {"least-request", "least-kv", "prefix"} <= set(registry.names("scorer"))


def test_round_robin_cycles(registry, services):
    p = build_policies(registry, services)["round-robin"]
    bs = backends(3)
    picks = [p.select(ctx(), bs).url for _ in range(6)]
    assert picks == [b.url for b in bs] * 2


def test_least_request_picks_the_idle_backend(registry, services):
    p = build_policies(registry, services)["least-request"]
    bs = backends(3)
    bs[0].in_flight, bs[1].in_flight, bs[2].in_flight = 5, 0, 3
    assert p.select(ctx(), bs) is bs[1]


def test_least_request_ties_spread(registry, services):
    p = build_policies(registry, services)["least-request"]
    bs = backends(4)
    counts = Counter(p.select(ctx(), bs).url for _ in range(400))
    assert len(counts) == 4 and min(counts.values()) > 50


def test_least_kv_prefers_free_cache_and_short_queue(registry, services):
    p = build_policies(registry, services)["least-kv"]
    bs = backends(3)
    now = services.clock()
    for b, kv, waiting in zip(bs, (0.9, 0.2, 0.2), (0, 0, 4), strict=True):
        b.stats, b.stats_at = EngineStats("vllm", now, 1, waiting, kv), now
    assert p.select(ctx(), bs) is bs[1]


def test_least_kv_treats_stale_stats_as_neutral(registry, services):
    scorer = registry.plugins[("scorer", "least-kv")](registry.plugins[("scorer", "least-kv")].Config(), services)
    b = backends(1)[0]
    b.stats, b.stats_at = EngineStats("vllm", 0, 0, 0, 0.0), services.clock() - 100
    assert scorer.score(ctx(), [b])[b] == 0.5


def test_power_of_two_never_picks_the_most_loaded(registry, services):
    p = build_policies(registry, services)["power-of-two"]
    bs = backends(3)
    bs[0].in_flight, bs[1].in_flight, bs[2].in_flight = 9, 1, 2
    picks = Counter(p.select(ctx(), bs).url for _ in range(300))
    assert "http://b0" not in picks and picks["http://b1"] > picks["http://b2"]


def test_prefix_affinity_follows_learned_prefix(registry, services):
    p = build_policies(registry, services)["prefix"]
    bs = backends(3)
    system = "You are a helpful assistant. " * 20  # 580 chars: 9 blocks of 64
    first = ctx(system + "question one")
    chosen = p.select(first, bs)
    p.on_response_start(first, chosen)
    for i in range(20):
        c = ctx(system + f"question {i} that differs")
        assert p.select(c, bs) is chosen
    assert services.prefix_index.hit_rate > 0.8


def test_prefix_hot_prefix_spreads_when_overloaded(registry, services):
    """The bounded-load guard: once the affine pod is far above the mean, the prefix no longer wins."""
    p = build_policies(registry, services)["prefix"]
    bs = backends(3)
    hot = "shared system prompt " * 30
    c0 = ctx(hot)
    chosen = p.select(c0, bs)
    p.on_response_start(c0, chosen)
    chosen.in_flight = 10
    assert p.select(ctx(hot + "x"), bs) is not chosen


def test_pipeline_filters_and_weights(registry, services):
    spec = {
        "filters": [{"type": "labels", "config": {"match": {"group": "long"}}}],
        "scorers": [{"type": "least-request", "weight": 2}],
        "picker": {"type": "max-score"},
    }
    p = build_pipeline("long", spec, registry, services)
    bs = backends(3)
    bs[0].labels, bs[1].labels = {"group": "long"}, {"group": "long"}
    bs[0].in_flight = 3
    assert p.select(ctx(), bs) is bs[1]
    bs[1].labels = {}
    bs[0].labels = {}
    assert p.select(ctx(), bs) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"scorers": [{"type": "nope"}]}, "unknown scorer 'nope'"),
        ({"scorers": [{"type": "least-kv", "config": {"kv_wieght": 1}}]}, "unknown field(s) ['kv_wieght']"),
        ({"scorers": [{"type": "least-kv", "config": {"kv_weight": "high"}}]}, "expected a number"),
        ({"scorers": [{"type": "least-kv", "weight": -1}]}, "weight must be"),
        ({"scorers": [{"type": "least-kv", "extra": 1}]}, "unknown field(s) ['extra']"),
        ({"filters": [{"type": "random-sample", "config": {"k": 0}}]}, "k must be"),
        ({"filters": [{"type": "random-sample", "config": {"k": 1.5}}]}, "expected an integer"),
        ({"picker": {"type": "max-score"}, "scorer": []}, "unknown field(s) ['scorer']"),
        ({"filters": [{"type": "role", "config": {"roles": ["mixed"]}}]}, "unknown role"),
    ],
)
def test_strict_config_parsing(registry, services, spec, message):
    with pytest.raises(PluginConfigError) as exc:
        build_pipeline("bad", spec, registry, services)
    assert message in str(exc.value)


def test_parse_config_fills_defaults_and_coerces_ints():
    @dataclass(frozen=True)
    class C:
        a: float = 1.0
        b: int = 2
        c: str | None = None

    assert parse_config(C, {"a": 3}, "x") == C(3.0, 2, None)
    with pytest.raises(PluginConfigError):
        parse_config(C, {"b": True}, "x")


def test_a_new_scorer_plugs_in(registry, services):
    class Fixed(Scorer):
        name = "fixed"

        def score(self, ctx, backends):
            return {b: (1.0 if b.url.endswith("2") else 0.0) for b in backends}

    registry.add(Fixed)
    try:
        p = build_pipeline("f", {"scorers": [{"type": "fixed"}]}, registry, services)
        assert p.select(ctx(), backends(3)).url == "http://b2"
    finally:
        del registry.plugins[("scorer", "fixed")]


def test_prefix_index_is_bounded_and_lru():
    idx = PrefixIndex(capacity=100)
    for i in range(1000):
        idx.insert([i * 7 + 1, i * 7 + 2], f"http://b{i % 3}")
    assert len(idx) == 100 and idx.evictions == 1900
    idx.insert([1, 2, 3], "http://a")
    idx.insert([1, 2], "http://b")
    assert idx.match([1, 2, 3], ["http://a", "http://b"]) == {"http://a": 3, "http://b": 2}
    idx.remove_backend("http://a")
    assert idx.match([1, 2, 3], ["http://a", "http://b"]) == {"http://a": 0, "http://b": 2}


def test_prompt_hashes_chain():
    a = text_block_hashes("x" * 64 + "y" * 64 + "z", 64)
    b = text_block_hashes("x" * 64 + "w" * 64, 64)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    assert text_block_hashes("short", 64) == []
    c = ctx("q" * 200)
    assert c.block_hashes(64) is c.block_hashes(64)


def test_render_messages_and_validation():
    text = render_messages([{"role": "system", "content": "be brief"},
                            {"role": "user", "content": [{"type": "text", "text": "hi"}]}])  # fmt: skip
    assert "be brief" in text and "hi" in text
    assert validate_body({"model": "m", "prompt": [1, 2, 3], "stream": True}, chat=False) == ("m", "1 2 3", True)
    for body, chat, param in [
        ([], False, None),
        ({"prompt": "x"}, False, "model"),
        ({"model": "m"}, False, "prompt"),
        ({"model": "m", "prompt": [1, "a"]}, False, "prompt"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, False, "stream"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, False, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, False, "max_tokens"),
        ({"model": "m", "messages": []}, True, "messages"),
        ({"model": "m", "messages": [{"content": "x"}]}, True, "messages"),
    ]:
        with pytest.raises(ApiError) as exc:
            validate_body(body, chat)
        assert exc.value.status == 400 and exc.value.param == param


def test_backend_spec_parsing():
    s = parse_backend_spec("http://p:8000/,role=prefill,model=a,model=b,group=long")
    assert s == BackendSpec("http://p:8000", frozenset({"a", "b"}), "prefill", {"group": "long"})
    for bad in ("p:8000", "http://p,role=master", "http://p,oops"):
        with pytest.raises(ValueError):
            parse_backend_spec(bad)


def test_pool_update_keeps_state_and_ejects_exponentially():
    now = [100.0]
    pool = BackendPool(lambda: now[0], EjectionPolicy(consecutive_failures=2, base_s=1.0, max_s=8.0))
    pool.update([BackendSpec("http://a", frozenset({"m"})), BackendSpec("http://b", frozenset({"m"}))])
    a = pool.get("http://a")
    a.in_flight = 3
    added, removed = pool.update([BackendSpec("http://a", frozenset({"m"}))])
    assert not added and [b.url for b in removed] == ["http://b"] and pool.get("http://a").in_flight == 3
    assert not pool.record_failure(a) and pool.record_failure(a)
    assert pool.available("m") == [] and a.ejected_until == 101.0
    now[0] = 101.5  # re-probe: eligible again; one more failure doubles the ejection
    assert pool.available("m") == [a]
    assert pool.record_failure(a) and a.ejected_until == 103.5
    now[0] = 104.0
    pool.record_success(a)
    assert not pool.record_failure(a)  # back to the full threshold after a success

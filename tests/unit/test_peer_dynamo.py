"""Unit tests of the ``peer:dynamo-kv`` policy: Dynamo's KV-router cost, softmax sampling and active-block tracking.

Every expected logit is worked out by hand from Dynamo's formula
``overlap_score_weight * potential_prefill_tokens / block_size + potential_decode_blocks`` (block size 16).
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from kvscale.engine_stats import EngineStats
from kvscale.kv_events import BlockStored
from router.backends import Backend
from router.context import RequestContext
from router.kvevents import request_hashes
from router.policies import PluginConfigError, Services, build_pipeline, load_registry
from router.policies.peer_dynamo import DynamoKVPicker, softmax_probabilities

BS = 16
PRESET = "peer:dynamo-kv"


@pytest.fixture(scope="module")
def registry():
    return load_registry()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(registry, config: dict | None = None, seed: int = 0):
    services = Services(clock=Clock(), rng=random.Random(seed))
    spec = registry.presets[PRESET] if config is None else {"picker": {"type": "dynamo-kv", "config": config}}
    pipeline = build_pipeline(PRESET, spec, registry, services)
    assert isinstance(pipeline.picker, DynamoKVPicker)
    return pipeline, pipeline.picker, services


def backend(url: str, in_flight: int = 0) -> Backend:
    b = Backend(url)
    b.stats = EngineStats("vllm", 0.0, 0.0, 0.0, 0.0, block_size=BS)
    b.in_flight = in_flight
    return b


def req(rid: str, tokens: list[int]) -> RequestContext:
    return RequestContext(rid, "m", "completions", " ".join(map(str, tokens)), {"model": "m", "prompt": tokens}, {})


def store(services: Services, url: str, tokens: list[int], first_engine_hash: int) -> None:
    """``url``'s engine publishes that it cached the full blocks of ``tokens`` (a chain from the root)."""
    n = len(tokens) // BS
    hashes = list(range(first_engine_hash, first_engine_hash + n))
    services.extras["kvevents"].index.apply(url, BlockStored(hashes, None, tokens[: n * BS], BS))


def route(pipeline, ctx: RequestContext, candidates: list[Backend], *, first_byte: bool = True) -> Backend:
    """What the proxy does: select, count the attempt in flight, and (optionally) see the first byte."""
    chosen = pipeline.select(ctx, candidates)
    ctx.tried.append(chosen.url)
    chosen.in_flight += 1
    if first_byte:
        pipeline.on_response_start(ctx, chosen)
    return chosen


P = list(range(1000, 1072))  # 72 tokens: 4 full blocks + 8


def test_preset_and_dynamo_defaults(registry) -> None:
    assert registry.presets[PRESET] == {"picker": {"type": "dynamo-kv"}}
    _, picker, services = make(registry)
    c = picker.config
    assert (c.overlap_score_weight, c.temperature, c.block_size) == (1.0, 0.0, 16)
    assert picker._kv.config.speculative is False  # Dynamo's index changes only on KV events
    assert services.extras["kvevents"] is picker.manager  # the shared KV-event index, created for the evaluator


def test_worker_holding_the_prefix_wins_when_loads_are_equal(registry) -> None:
    pipeline, picker, services = make(registry)
    a, b = backend("http://a"), backend("http://b")
    store(services, "http://a", P, 1)  # a caches P's 4 full blocks
    # a: 1.0 * (72 - 4*16)/16 + (0 active + 4 new blocks) = 4.5 ; b: 72/16 + 4 = 8.5
    assert picker.logits(req("q", P), [a, b]) == {a: 4.5, b: 8.5}
    for i in range(20):
        a.in_flight = b.in_flight = 0  # the previous picks finished
        assert pipeline.select(req(f"r{i}", P), [b, a]) is a
    # symmetric: once b holds a longer prefix than a (a's cache cleared), b wins
    services.extras["kvevents"].index.clear("http://a")
    store(services, "http://b", P, 101)
    a.in_flight = b.in_flight = 0
    assert picker.logits(req("q2", P), [a, b]) == {a: 8.5, b: 4.5}
    assert pipeline.select(req("s", P), [a, b]) is b


def _load_a_with_three_requests(pipeline, a: Backend, *, first_byte: bool) -> None:
    for i in range(3):  # 3 unrelated 64-token requests (4 blocks each) routed to a
        toks = list(range(10_000 * (i + 1), 10_000 * (i + 1) + 64))
        assert route(pipeline, req(f"u{i}", toks), [a], first_byte=first_byte) is a


Q = list(range(5000, 5048))  # 48 tokens: 3 full blocks


def test_heavy_active_decode_load_outweighs_a_small_overlap(registry) -> None:
    pipeline, picker, services = make(registry)
    a, b = backend("http://a"), backend("http://b")
    store(services, "http://a", Q[:16], 1)  # a caches Q's first block only
    _load_a_with_three_requests(pipeline, a, first_byte=True)
    assert a.in_flight == 3 and picker.active("http://a").active_blocks == 12
    # a: prefill (48 - 16)/16 = 2, decode 12 active + 3 new = 15 -> 17 ; b: 48/16 + 3 = 6
    assert picker.logits(req("q", Q), [a, b]) == {a: 17.0, b: 6.0}
    assert route(pipeline, req("q", Q), [a, b]) is b
    # Without the load, the overlap decides: a = 2 + 3 = 5 < b = 6
    _, picker2, services2 = make(registry)
    store(services2, "http://a", Q[:16], 1)
    a2, b2 = backend("http://a"), backend("http://b")
    assert picker2.logits(req("q", Q), [a2, b2]) == {a2: 5.0, b2: 6.0}


def test_overlap_score_weight_trades_prefill_against_decode(registry) -> None:
    for weight, expected, winner in ((10.0, (35.0, 33.0), "b"), (20.0, (55.0, 63.0), "a")):
        pipeline, picker, services = make(registry, {"overlap_score_weight": weight})
        a, b = backend("http://a"), backend("http://b")
        store(services, "http://a", Q[:16], 1)
        _load_a_with_three_requests(pipeline, a, first_byte=True)
        # a: w * 2 + 15 ; b: w * 3 + 3
        assert picker.logits(req("q", Q), [a, b]) == {a: expected[0], b: expected[1]}
        assert pipeline.select(req("q", Q), [a, b]).url == f"http://{winner}"


def test_queued_prefill_counts_until_the_first_byte(registry) -> None:
    pipeline, picker, services = make(registry)
    a, b = backend("http://a"), backend("http://b")
    store(services, "http://a", Q[:16], 1)
    _load_a_with_three_requests(pipeline, a, first_byte=False)
    # a: prefill (3*64 queued + 32 new)/16 = 14, decode 15 -> 29
    assert picker.logits(req("q", Q), [a, b]) == {a: 29.0, b: 6.0}
    assert picker.active("http://a").prefill_tokens == 192


def test_active_blocks_dedupe_shared_prefixes_and_free_on_finish(registry) -> None:
    pipeline, picker, _services = make(registry)
    a = backend("http://a")
    shared = list(range(1, 33))  # 2 blocks
    c1 = req("c1", shared + list(range(100, 132)))
    c2 = req("c2", shared + list(range(200, 232)))
    route(pipeline, c1, [a])
    route(pipeline, c2, [a])
    seqs = picker.active("http://a")
    assert seqs.active_blocks == 6  # 2 shared + 2 + 2, not 8
    # a third request with the shared prefix only adds its own blocks: 6 active + 2 new
    assert picker.logits(req("c3", shared + list(range(300, 332))), [a]) == {a: 4.0 + 8}
    pipeline.on_finish(c1, a, None)
    a.in_flight -= 1
    assert seqs.active_blocks == 4 and len(seqs) == 1
    pipeline.on_finish(c2, a, None)
    a.in_flight -= 1
    assert seqs.active_blocks == 0 and seqs.prefill_tokens == 0


def test_without_on_finish_the_in_flight_count_trims_oldest_first(registry) -> None:
    pipeline, picker, _services = make(registry)
    a, b = backend("http://a"), backend("http://b")
    _load_a_with_three_requests(pipeline, a, first_byte=False)  # the evaluator never calls on_finish
    a.in_flight = 1  # the engines report only one of them still running
    # a: prefill (64 queued + 48)/16 = 7, decode 4 + 3 = 7 -> 14 ; the survivor is the newest request (u2)
    assert picker.logits(req("q", Q), [a, b]) == {a: 14.0, b: 6.0}
    seqs = picker.active("http://a")
    assert len(seqs) == 1
    assert seqs.new_blocks(u_hashes(2)) == 0 and seqs.new_blocks(u_hashes(0)) == 4
    a.in_flight = 0
    assert picker.logits(req("q", Q), [a, b]) == {a: 6.0, b: 6.0}
    assert len(seqs) == 0


def u_hashes(i: int) -> list[int]:
    return request_hashes(list(range(10_000 * (i + 1), 10_000 * (i + 1) + 64)), BS)


def test_stale_requests_expire_after_300_s(registry) -> None:
    pipeline, picker, services = make(registry)
    a = backend("http://a")
    route(pipeline, req("old", P), [a])
    services.clock.now = 299.0
    assert picker.logits(req("q", Q), [a]) == {a: 3.0 + 4 + 3}
    services.clock.now = 301.0
    assert picker.logits(req("q2", Q), [a]) == {a: 3.0 + 3}


def test_softmax_probabilities_match_dynamo() -> None:
    # range 4: scaled = -v/4/T; p_a = 1 / (1 + exp(-(8.5 - 4.5)/4/T))
    for t in (1.0, 0.5, 0.25):
        pa, pb = softmax_probabilities([4.5, 8.5], t)
        assert pa == pytest.approx(1 / (1 + math.exp(-1 / t)))
        assert pa + pb == pytest.approx(1.0)
    assert softmax_probabilities([3.0, 3.0, 3.0], 2.0) == [1 / 3] * 3
    # the scale of the logits does not matter (Dynamo divides by their range), only their spread
    assert softmax_probabilities([45.0, 85.0], 1.0) == pytest.approx(softmax_probabilities([4.5, 8.5], 1.0))
    assert softmax_probabilities([0.0, 4.0], 1.0) == pytest.approx(softmax_probabilities([4.5, 8.5], 1.0))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_temperature_samples_in_proportion(registry, temperature: float) -> None:
    pipeline, _picker, services = make(registry, {"temperature": temperature})
    a, b = backend("http://a"), backend("http://b")
    store(services, "http://a", P, 1)  # logits a 4.5, b 8.5 (see above)
    n = 3000
    counts: Counter[str] = Counter()
    for i in range(n):
        a.in_flight = b.in_flight = 0  # keep the loads equal: every earlier pick has finished
        counts[pipeline.select(req(f"r{i}", P), [a, b]).url] += 1
    expected = 1 / (1 + math.exp(-1 / temperature))  # 0.731 at T=1, 0.881 at T=0.5
    assert counts["http://a"] / n == pytest.approx(expected, abs=0.03)
    assert counts["http://b"] > 0


def test_zero_temperature_ties_break_by_tree_size_then_at_random(registry) -> None:
    pipeline, picker, services = make(registry)
    a, b = backend("http://a"), backend("http://b")
    # no cache anywhere: equal logits, equal (zero) tree sizes -> random
    seen: Counter[str] = Counter()
    for i in range(200):
        _reset(a, b)
        seen[pipeline.select(req(f"r{i}", P), [a, b]).url] += 1
    assert seen["http://a"] > 50 and seen["http://b"] > 50
    # both cache P's blocks, but a also holds an unrelated chain: same logit, b's smaller tree wins
    store(services, "http://a", P, 1)
    store(services, "http://a", list(range(7000, 7064)), 50)
    store(services, "http://b", P, 101)
    _reset(a, b)
    assert picker.logits(req("q", P), [a, b]) == {a: 4.5, b: 4.5}
    for i in range(50):
        _reset(a, b)
        assert pipeline.select(req(f"t{i}", P), [a, b]) is b


def _reset(a: Backend, b: Backend) -> None:
    a.in_flight = b.in_flight = 0


def test_request_without_a_tokenizable_prompt_is_routed_by_load(registry) -> None:
    pipeline, picker, _services = make(registry)
    a, b = backend("http://a"), backend("http://b")
    _load_a_with_three_requests(pipeline, a, first_byte=True)
    ctx = RequestContext("x", "m", "completions", "", {"model": "m", "prompt": {"not": "a prompt"}}, {})
    assert picker.logits(ctx, [a, b]) == {a: 12.0, b: 0.0}
    assert pipeline.select(ctx, [a, b]) is b


@pytest.mark.parametrize(
    "config",
    [
        {"overlap_score_weight": -1.0},
        {"overlap_score_weight": float("inf")},
        {"temperature": -0.1},
        {"block_size": 1},
        {"block_size": 16.5},
        {"router_temperature": 0.5},  # Dynamo's flag name is not a field here
        {"kv_events": {"bogus": 1}},
        {"kv_events": {"port": 0}},
        {"kv_events": "tcp://x"},
    ],
)
def test_config_validation(registry, config: dict) -> None:
    with pytest.raises(PluginConfigError):
        make(registry, config)


def test_valid_config_is_accepted(registry) -> None:
    _, picker, _ = make(registry, {"overlap_score_weight": 0, "temperature": 2, "block_size": 64,
                                   "kv_events": {"port": 6000, "speculative": True}})  # fmt: skip
    assert picker.config.overlap_score_weight == 0.0 and picker.config.temperature == 2.0
    assert picker._kv.config.port == 6000 and picker._kv.config.speculative is True

"""Advanced routing plugins on the real pipeline classes (registry, Backend, RequestContext, EngineStats).

No engine here: backend state (in-flight counts, scraped stats, KV-event index contents) is set directly, as the
router's monitor and subscribers would set it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kvscale.engine_stats import EngineStats
from kvscale.kv_events import BlockStored
from kvscale.tokenizer import FallbackTokenizer
from router.backends import Backend, BackendPool
from router.context import RequestContext
from router.policies import Outcome, PluginConfigError, Services, build_policies, load_registry
from router.policies.kv_events import KVEventsScorer
from router.policies.length_buckets import LengthBucketFilter
from router.policies.lora_affinity import LoraAffinityScorer
from router.policies.session_affinity import SessionAffinityScorer, rendezvous_order
from router.policies.slo import SloScorer

TOK = FallbackTokenizer()


def ctx(prompt: str = "hello world", headers: dict[str, str] | None = None, model: str = "m",
        rid: str = "r1") -> RequestContext:  # fmt: skip
    return RequestContext(rid, model, "completions", prompt, {"model": model, "prompt": prompt}, headers or {})


def stats(**kw) -> EngineStats:
    return EngineStats(engine="vllm", at=0.0, running=kw.pop("running", 0), waiting=0, kv_usage=0.0, **kw)


def backends(n: int, **labels: str) -> list[Backend]:
    return [Backend(f"http://10.0.0.{i}:8000", labels=dict(labels)) for i in range(n)]


def test_registry_has_the_advanced_plugins_and_policies() -> None:
    reg = load_registry()
    assert {"kv-events", "slo", "session-affinity", "lora-affinity"} <= set(reg.names("scorer"))
    assert "length-bucket" in reg.names("filter")
    assert {"kv-events", "slo", "length-buckets", "session-affinity", "lora-affinity"} <= set(reg.presets)
    build_policies(reg, Services())  # every preset builds
    with pytest.raises(PluginConfigError, match="unknown field"):
        reg.create("scorer", {"type": "slo", "config": {"ttft_slo": 1}}, Services(), "test")
    with pytest.raises(PluginConfigError):
        reg.create("scorer", {"type": "kv-events", "config": {"port": 70000}}, Services(), "test")


# -- session affinity --------------------------------------------------------------------------------------------
def test_session_sticks_moves_when_overloaded_and_survives_membership_changes() -> None:
    s = SessionAffinityScorer(SessionAffinityScorer.Config(), Services())
    bs = backends(4)
    first = {}
    for i in range(40):
        sc = s.score(ctx(headers={"x-session-id": f"sess{i}"}), bs)
        first[i] = next(b for b, v in sc.items() if v == 1.0)
        assert sum(sc.values()) == 1.0
    assert len({b.url for b in first.values()}) == 4  # sessions spread
    assert all(s.score(ctx(headers={"x-session-id": f"sess{i}"}), bs)[first[i]] == 1.0 for i in range(40))
    # overload the backend of session 0: it moves to its next-ranked backend, deterministically
    first[0].in_flight = 10
    moved = next(b for b, v in s.score(ctx(headers={"x-session-id": "sess0"}), bs).items() if v == 1.0)
    assert moved is not first[0]
    assert moved.url == rendezvous_order("sess0", [b.url for b in bs])[1]
    first[0].in_flight = 0
    # removing one backend only moves the sessions that were on it
    gone = bs[2]
    rest = [b for b in bs if b is not gone]
    for i in range(40):
        sc = s.score(ctx(headers={"x-session-id": f"sess{i}"}), rest)
        now = next(b for b, v in sc.items() if v == 1.0)
        if first[i] is not gone:
            assert now is first[i]
    assert s.score(ctx(), bs) == dict.fromkeys(bs, 0.0)  # no header: neutral


# -- LoRA affinity -------------------------------------------------------------------------------------------------
def test_lora_affinity_prefers_loaded_then_free_slot() -> None:
    s = LoraAffinityScorer(LoraAffinityScorer.Config(), Services())
    a, b, c = backends(3)
    a.stats = stats(models=frozenset({"base"}), running_loras=frozenset({"sql"}), max_loras=1)
    b.stats = stats(models=frozenset({"base"}), running_loras=frozenset(), max_loras=1)
    c.stats = stats(models=frozenset({"base"}), running_loras=frozenset({"chat"}), max_loras=1)
    assert s.score(ctx(model="sql"), [a, b, c]) == {a: 1.0, b: 0.5, c: 0.0}
    assert s.score(ctx(model="base"), [a, b, c]) == {a: 0.0, b: 0.0, c: 0.0}


# -- length buckets ------------------------------------------------------------------------------------------------
def test_length_buckets_split_long_and_short() -> None:
    f = LengthBucketFilter(LengthBucketFilter.Config(threshold_tokens=100), Services())
    long_b = backends(1, group="long")
    short_b = [Backend("http://s1:8000"), Backend("http://s2:8000")]
    allb = long_b + short_b
    assert f.filter(ctx(" ".join(["w"] * 150)), allb) == long_b
    assert f.filter(ctx(" ".join(["w"] * 50)), allb) == short_b
    assert f.filter(ctx(" ".join(["w"] * 150)), short_b) == short_b  # no long group available: keep all


# -- kv-events scorer ----------------------------------------------------------------------------------------------
async def test_kv_events_scorer_scores_the_cached_prefix_fraction() -> None:
    pool = BackendPool(lambda: 0.0)
    services = Services(pool=pool)
    s = KVEventsScorer(KVEventsScorer.Config(default_block_size=4), services)
    a, b = Backend("http://a:8000", labels={"kv-events": "tcp://a:7000"}), Backend("http://b:9000")
    assert s.source_for(a).endpoint == "tcp://a:7000"
    assert s.source_for(b).endpoint == "tcp://b:5557" and s.source_for(b).replay_endpoint is None
    prompt = " ".join(f"x{i}" for i in range(17))
    toks = TOK.encode_prompt(prompt)
    s.manager.index.apply(a.url, BlockStored([1, 2, 3], None, toks[:12], 4))
    s.manager.index.apply(b.url, BlockStored([7], None, toks[:4], 4))
    sc = s.score(ctx(prompt), [a, b])
    assert sc[a] == pytest.approx(12 / 17) and sc[b] == pytest.approx(4 / 17)
    await s.manager.close()


# -- slo -----------------------------------------------------------------------------------------------------------
def test_slo_prediction_grows_with_queue_and_shrinks_with_cache() -> None:
    s = SloScorer(SloScorer.Config(max_num_batched_tokens=2048), Services())
    from router.policies.slo import _Load

    idle = s.predict(2000, 0, _Load())[0]
    cached = s.predict(2000, 1600, _Load())[0]
    queued = s.predict(2000, 0, _Load(pending_prefill=6000))[0]
    busy_itl = s.predict(100, 0, _Load(decoding=64, context=64_000))[1]
    assert cached < idle < queued
    assert busy_itl > s.predict(100, 0, _Load())[1]
    # the prefill part matches the latency model's own single-request prefill time (one step)
    lat = s.latency
    assert idle == pytest.approx(lat.prefill_time(2000, 0))


def test_slo_scorer_accounts_work_meets_slo_and_records(tmp_path: Path) -> None:
    rec = tmp_path / "slo.jsonl"
    clock = [0.0]
    services = Services(clock=lambda: clock[0])
    s = SloScorer(SloScorer.Config(ttft_slo_ms=500, max_num_batched_tokens=2048, record_path=str(rec)), services)
    a, b = backends(2)
    long_prompt = " ".join(f"w{i}" for i in range(8000))
    c1 = ctx(long_prompt, rid="r1")
    s.score(c1, [a, b])
    c1.tried.append(a.url)  # the proxy picked a
    c2 = ctx(long_prompt, rid="r2", headers={"x-kvscale-ttft-slo-ms": "100000"})
    sc2 = s.score(c2, [a, b])
    assert sc2[b] > sc2[a]  # a has c1's prefill queued ahead
    assert s.shared.loads[a.url].pending_prefill == 8000
    p2 = c2.state["slo"]["per_backend"]
    assert p2[a.url]["ttft_s"] > p2[b.url]["ttft_s"] and p2[b.url]["meets"]
    s.on_response_start(c1, a)
    assert s.shared.loads[a.url].pending_prefill == 0 and s.shared.loads[a.url].decoding == 1
    s.on_finish(c1, a, Outcome(200, None, 0.9, 1.2))
    assert s.shared.loads[a.url].decoding == 0 and s.shared.loads[a.url].context == 0
    line = json.loads(rec.read_text().splitlines()[0])
    assert line["request_id"] == "r1" and line["observed_ttft_s"] == 0.9
    assert s.shared.correction[a.url] != 1.0  # adapted toward observed / predicted
    # an impossible SLO: nobody meets it, the faster still wins
    c3 = ctx("short prompt", rid="r3", headers={"x-kvscale-ttft-slo-ms": "0.001"})
    sc3 = s.score(c3, [a, b])
    assert max(sc3.values()) <= 0.5


def test_kv_events_manager_needs_a_running_loop_only_when_syncing() -> None:
    pool = BackendPool(lambda: 0.0)
    services = Services(pool=pool)
    s = KVEventsScorer(KVEventsScorer.Config(), services)
    assert services.extras["kvevents"] is s.manager
    s2 = KVEventsScorer(KVEventsScorer.Config(), services)
    assert s2.manager is s.manager  # one manager per app
    asyncio.run(s.manager.close())


def test_slo_scorer_predicts_each_variant_with_its_own_latency_model() -> None:
    """A mixed pool (variant groups): the backend label names its hardware's model, so the slower variant is
    predicted slower and gets less of the traffic."""
    clock = [0.0]
    s = SloScorer(SloScorer.Config(variant_models={"a100": "llama-3-8b-a100-40gb-vllm-public"}),
                  Services(clock=lambda: clock[0]))  # fmt: skip
    h100 = Backend("http://10.0.0.1:8000", labels={"kvscale.io/latency-model": "llama-3-8b-h100-vllm-public"})
    a100 = Backend("http://10.0.0.2:8000", labels={"kvscale.io/latency-model": "a100"})
    plain = Backend("http://10.0.0.3:8000")
    assert s.model_for(h100).name == "llama-3-8b-h100-vllm-public"
    assert s.model_for(a100).name == "llama-3-8b-a100-40gb-vllm-public"
    assert s.model_for(plain) is s.latency
    prompt = " ".join(f"w{i}" for i in range(2000))
    picks = {h100.url: 0, a100.url: 0}
    for i in range(40):  # nothing finishes: each routed prefill queues on its backend
        c = ctx(prompt, rid=f"r{i}")
        scores = s.score(c, [h100, a100])
        best = max(scores, key=scores.get)
        c.tried.append(best.url)
        picks[best.url] += 1
    assert picks[h100.url] > 1.5 * picks[a100.url] > 0  # both used, the faster one about twice as much
    unknown = Backend("http://10.0.0.4:8000", labels={"kvscale.io/latency-model": "no-such-model"})
    assert s.model_for(unknown) is s.latency  # logged once, falls back to the default
    with pytest.raises(PluginConfigError, match=r"variant_models\.x"):
        load_registry().create("scorer", {"type": "slo", "config": {"variant_models": {"x": "nope"}}}, Services(),
                               "test")  # fmt: skip


def test_least_request_weighs_a_mixed_pool_by_each_variants_speed() -> None:
    """Envoy's weighted least request (weight / (active + 1)) with each backend's weight from its variant's latency
    model: the faster variant holds about as many more requests as it is faster; unlabelled pools are unchanged."""
    from router.policies.least_request import LeastRequestScorer

    s = LeastRequestScorer(LeastRequestScorer.Config(), Services())
    h100 = Backend("http://10.0.0.1:8000", labels={"kvscale.io/latency-model": "llama-3-8b-h100-vllm-public"})
    a100 = Backend("http://10.0.0.2:8000", labels={"kvscale.io/latency-model": "llama-3-8b-a100-40gb-vllm-public"})
    for _ in range(60):  # nothing finishes: each pick adds one in-flight request
        scores = s.score(ctx(), [h100, a100])
        max(scores, key=scores.get).in_flight += 1
    ratio = s._weight(h100) / s._weight(a100)
    assert 1.5 < ratio < 3.0
    assert h100.in_flight / a100.in_flight == pytest.approx(ratio, rel=0.15)
    plain = backends(2)
    plain[0].in_flight = 3
    assert s.score(ctx(), plain) == {plain[0]: 0.0, plain[1]: 1.0}  # the unweighted form

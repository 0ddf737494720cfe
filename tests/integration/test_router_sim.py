"""The router in front of real simulator pods (in-process ``simulator.server`` apps and ``kvscale sim serve``
subprocesses), driven by real clients (the ``openai`` SDK, aiohttp). Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from routers_for_tests import RunningRouter, router_in_thread, serve_router

from harness.simpods import Pod, sim_pod, sim_pod_process, step_model

MODEL = "sim-model"
SYSTEM = "You are a careful assistant who answers in short sentences. " * 8  # 472 chars: 7 prefix blocks


def assert_openai_error(body: dict, status: int) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@contextlib.asynccontextmanager
async def oai(url: str, key: str = "x") -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def sims() -> AsyncIterator[list[Pod]]:
    async with sim_pod() as a, sim_pod() as b:
        yield [a, b]


@pytest.fixture
async def router(sims: list[Pod], tmp_path: Path) -> AsyncIterator[RunningRouter]:
    async with serve_router([s.url for s in sims], policy="prefix", governance_log=str(tmp_path / "gov.jsonl"),
                            max_body_bytes=64 * 1024) as r:  # fmt: skip
        yield r


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def test_openai_sdk_through_the_router(router: RunningRouter, tmp_path: Path):
    async with oai(router.url) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        c = await client.completions.create(model=MODEL, prompt="the secret prompt words", max_tokens=5)
        assert c.usage.completion_tokens == 5 and c.choices[0].text
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [ch async for ch in stream]
        assert chunks[-1].usage.completion_tokens == 4
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) == 4
    lines = [json.loads(x) for x in (tmp_path / "gov.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(rec["status"] == 200 for rec in lines)
    comp = lines[0]
    assert comp["prompt_tokens"] == 4 and comp["completion_tokens"] == 5 and comp["sampling"]["max_tokens"] == 5
    assert len(comp["prompt_hash"]) == 32 and comp["backend"] in {s for s in router.state.pool.backends}
    assert lines[1]["completion_tokens"] == 4 and lines[1]["ttft_s"] > 0
    assert "secret" not in (tmp_path / "gov.jsonl").read_text()


async def test_streaming_bytes_pass_through_unchanged(sims: list[Pod], http: aiohttp.ClientSession):
    """The router relays the backend's SSE events as they are: same events, same fields, same framing (the
    simulator's ids, timestamps and sampled words differ between two calls, so those are left out)."""
    async with serve_router([sims[0].url]) as r:
        body = {"model": MODEL, "prompt": "a b c d", "max_tokens": 6, "stream": True, "seed": 1}
        async with http.post(r.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            via = await resp.read()
        async with http.post(sims[0].url + "/v1/completions", json=body) as resp:
            direct = await resp.read()
    def strip(raw: bytes) -> list[dict]:
        events = [json.loads(e[6:]) for e in raw.decode().split("\n\n") if e.startswith("data: {")]
        for ev in events:
            ev.pop("id"), ev.pop("created")
            for ch in ev["choices"]:
                ch["text"] = len(ch["text"]) > 0
        return events

    assert via.endswith(b"data: [DONE]\n\n") and strip(via) == strip(direct)


async def test_client_errors_in_openai_shape(router: RunningRouter, http: aiohttp.ClientSession):
    url = router.url
    cases = [
        ("/v1/completions", b"{not json", {}, 400),
        ("/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode(), {}, 404),
        ("/v1/completions", json.dumps({"model": MODEL}).encode(), {}, 400),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode(), {}, 400),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x"}).encode(), {"x-kvscale-policy": "bogus"}, 400),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x" * 70_000}).encode(), {}, 413),
        ("/v1/nothing", b"{}", {}, 404),
    ]
    for path, data, headers, status in cases:
        async with http.post(url + path, data=data, headers={"Content-Type": "application/json", **headers}) as r:
            assert r.status == status, (path, data[:60], await r.text())
            assert_openai_error(await r.json(), status)
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "kvscale_router_requests_total", status="404", model="other") == 1


async def test_backend_4xx_passes_through(router: RunningRouter, http: aiohttp.ClientSession):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 100_000}  # beyond the sim's max-model-len
    async with http.post(router.url + "/v1/completions", json=body) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"]


async def test_api_keys(sims: list[Pod], http: aiohttp.ClientSession):
    async with serve_router([sims[0].url], api_keys=frozenset({"k1", "k2"})) as r:
        async with oai(r.url, key="wrong") as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
        async with oai(r.url, key="k2") as good:
            assert (await good.completions.create(model=MODEL, prompt="x", max_tokens=1)).choices
        async with http.get(r.url + "/health") as resp:
            assert resp.status == 200  # probes need no key
        async with http.get(r.url + "/v1/models") as resp:
            assert resp.status == 401
            assert_openai_error(await resp.json(), 401)


async def test_policy_header_overrides(router: RunningRouter, http: aiohttp.ClientSession):
    seen = []
    for _ in range(6):
        async with http.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "p", "max_tokens": 1},
                             headers={"x-kvscale-policy": "round-robin"}) as r:  # fmt: skip
            assert r.status == 200
            seen.append(r.headers["x-kvscale-backend"])
    assert seen[0::2] == [seen[0]] * 3 and seen[1::2] == [seen[1]] * 3 and seen[0] != seen[1]


async def test_prefix_policy_sticks_and_hits_the_engine_cache(router: RunningRouter):
    backends = Counter()
    cached = []
    async with oai(router.url) as client:
        for i in range(8):
            c = await client.completions.create(model=MODEL, prompt=SYSTEM + f"question number {i}", max_tokens=1)
            cached.append(c.usage.prompt_tokens_details.cached_tokens)
    for rec in router.state.pool:
        backends[rec.url] = rec.requests_total
    assert sorted(backends.values()) == [0, 8], backends
    assert cached[0] == 0 and all(c >= 64 for c in cached[1:]), cached  # the engine reused the shared prefix
    idx = router.state.services.prefix_index
    assert len(idx) > 0 and idx.hit_rate > 0.5


async def test_kill_a_backend_mid_load_loses_no_request(tmp_path: Path, http: aiohttp.ClientSession):
    """Three ``kvscale sim serve`` processes; one is SIGKILLed while 120 non-streaming requests run (20 at a time).
    Requests it held or that were routed to it before ejection are retried elsewhere: every request succeeds."""
    pods = [sim_pod_process(step_model(0.01), log_path=tmp_path / f"sim-{i}.log") for i in range(3)]
    try:
        for p in pods:
            await asyncio.to_thread(p.start)
        async with serve_router([p.url for p in pods], policy="round-robin", health_interval_s=0.5) as r:
            sem = asyncio.Semaphore(20)
            statuses: list[int] = []

            async def one(i: int) -> None:
                async with sem, http.post(r.url + "/v1/completions",
                                          json={"model": MODEL, "prompt": f"req {i}", "max_tokens": 8}) as resp:
                    await resp.read()
                    statuses.append(resp.status)

            tasks = [asyncio.create_task(one(i)) for i in range(120)]
            while len(statuses) < 30:
                await asyncio.sleep(0.01)
            pods[1].process.popen.kill()  # SIGKILL mid-load
            await asyncio.gather(*tasks)
            assert Counter(statuses) == {200: 120}
            async with http.get(r.url + "/metrics") as m:
                text = await m.text()
            assert metric(text, "kvscale_router_retries_total") >= 1
            await asyncio.sleep(1.5)  # active health checks take it out of rotation
            dead = r.state.pool.get(pods[1].url)
            assert not dead.healthy or dead.ejected_until > r.state.clock()
            async with http.get(r.url + "/ready") as ready:
                assert (await ready.json())["available_backends"] == 2
    finally:
        for p in pods:
            await p.stop()


async def test_failure_after_first_byte_ends_stream_with_error_event(tmp_path: Path, http: aiohttp.ClientSession):
    pod = sim_pod_process(step_model(0.02), log_path=tmp_path / "sim.log")
    proc, url = pod.process, pod.url
    with proc:
        await asyncio.to_thread(proc.wait_http_ready, url + "/health", 60)
        async with serve_router([url]) as r:
            body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 500, "stream": True}
            async with http.post(r.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                first = await resp.content.readany()
                assert first.startswith(b"data: {")
                proc.popen.kill()
                rest = await resp.read()
    events = [e for e in (first + rest).decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2][6:])
    assert_openai_error(err, 502)
    texts = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-2]]
    assert 0 < len(texts) < 500  # partial output, never restarted (no duplicate)


async def test_client_disconnect_cancels_the_upstream_request(http: aiohttp.ClientSession):
    async with sim_pod(step_model(0.01)) as sim, serve_router([sim.url]) as r:
        body = {"model": MODEL, "prompt": "go", "max_tokens": 2000, "stream": True}
        resp = await http.post(r.url + "/v1/completions", json=body)
        await resp.content.readany()
        assert sim.sim.engine.scheduler.has_unfinished()
        resp.close()  # the client goes away mid-stream
        for _ in range(200):
            if not sim.sim.engine.scheduler.has_unfinished():
                break
            await asyncio.sleep(0.01)
        assert not sim.sim.engine.scheduler.has_unfinished()
        assert r.state.pool.get(sim.url).in_flight == 0


async def test_overload_answers_429_and_503(http: aiohttp.ClientSession):
    async with sim_pod(step_model(0.05)) as sim, serve_router([sim.url], max_concurrency=2, max_queue=2,
                                                            queue_timeout_s=0.2) as r:  # fmt: skip
        async def one() -> int:
            async with http.post(r.url + "/v1/completions",
                                 json={"model": MODEL, "prompt": "x", "max_tokens": 10}) as resp:  # fmt: skip
                if resp.status != 200:
                    assert_openai_error(await resp.json(), resp.status)
                    assert resp.headers["Retry-After"] == "1"
                return resp.status

        statuses = Counter(await asyncio.gather(*(one() for _ in range(8))))
    assert statuses[200] == 2 and statuses[429] == 4 and statuses[503] == 2, statuses


async def test_no_healthy_backend_is_503_with_retry_after(http: aiohttp.ClientSession, tmp_path: Path):
    pod = sim_pod_process(step_model(1e-3), log_path=tmp_path / "sim.log")
    proc, url = pod.process, pod.url
    with proc:
        await asyncio.to_thread(proc.wait_http_ready, url + "/health", 60)
        async with serve_router([url], health_interval_s=0.2, health_failure_threshold=1) as r:
            proc.stop()
            body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
            async with http.post(r.url + "/v1/completions", json=body) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                assert_openai_error(await resp.json(), 503)
            await asyncio.sleep(0.6)
            async with http.get(r.url + "/ready") as resp:
                assert resp.status == 503


async def test_metrics_exposes_router_series(router: RunningRouter, http: aiohttp.ClientSession):
    async with oai(router.url) as client:
        stream = await client.completions.create(model=MODEL, prompt=SYSTEM, max_tokens=3, stream=True)
        _ = [c async for c in stream]
    await asyncio.sleep(0.3)  # a scrape round
    async with http.get(router.url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "kvscale_router_requests_total", model=MODEL, policy="prefix", status="200") == 1
    assert metric(text, "kvscale_router_ttft_seconds_count", model=MODEL) == 1
    assert metric(text, "kvscale_router_itl_seconds_count", model=MODEL) >= 2
    assert metric(text, "kvscale_router_prefix_index_entries") == 7
    assert metric(text, "kvscale_router_scrape_seconds_count") >= 2
    for name in ("kvscale_router_retries_total", "kvscale_router_ejections_total", "kvscale_router_prefix_hit_rate"):
        assert name.removesuffix("_total") in text
    b = router.state.pool.get(router.state.pool.backends[next(iter(router.state.pool.backends))].url)
    assert b.stats is not None and b.stats.engine == "vllm" and b.stats_age(router.state.clock()) < 1.0


# -- fuzzing: any body gets a 2xx or a 4xx in OpenAI's shape, never a 5xx --------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_field = {
    "model": st.just(MODEL) | st.text(max_size=10) | _json,
    "prompt": st.text(max_size=80) | st.lists(st.integers(0, 3000), max_size=20) | _json,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                 "content": st.text(max_size=40)}), max_size=3) | _json,
    "stream": st.booleans() | _json,
    "max_tokens": st.integers(-2, 6) | _json,
}
_bodies = st.one_of(
    st.fixed_dictionaries({}, optional=_field).map(lambda d: json.dumps(d).encode()),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=60),
)


@pytest.fixture(scope="module")
def fuzz_env():
    """One simulator and one router for all fuzz examples, on a background loop thread."""

    @contextlib.asynccontextmanager
    async def start():
        async with sim_pod(step_model(1e-4)) as sim, serve_router([sim.url]) as r:
            yield r

    with router_in_thread(start) as url:
        yield url


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies, chat=st.booleans())
async def test_fuzzed_bodies_get_only_4xx(fuzz_env: str, body: bytes, chat: bool):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with aiohttp.ClientSession() as s, s.post(fuzz_env + path, data=body,
                                                    headers={"Content-Type": "application/json"}) as r:  # fmt: skip
        raw = await r.read()
    assert r.status < 500, (body, r.status, raw)
    if r.status != 200:
        assert_openai_error(json.loads(raw), r.status)

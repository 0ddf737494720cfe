"""Integration tests of ``kvscale sim serve``: real clients (the OpenAI SDK, aiohttp, ZMQ) over real sockets.

Each test starts its own in-process server (``aiohttp.web.AppRunner`` + ``TCPSite`` on a free port) with a latency
model built here, so step times are known; one test starts the real CLI as a subprocess. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import zmq
import zmq.asyncio
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from harness.procs import ManagedProcess, free_port
from kvscale.kv_events import BlockStored, decode_message
from kvscale.latency import LatencyModel, StepCoefficients
from kvscale.tokenizer import FallbackTokenizer
from simulator.engine import EngineConfig, EngineCore
from simulator.kv_publisher import KVEventsConfig
from simulator.scheduler import SchedulerConfig
from simulator.server import ServeConfig, SimServer

BLOCK = 16
MODEL = "sim-model"
# 80 words -> 80 tokens with the fallback tokenizer: five full blocks
LONG_PROMPT = " ".join(f"word{i}" for i in range(80))
TOKENIZER = FallbackTokenizer()
REPO = Path(__file__).resolve().parents[2]


def step_model(base_s: float) -> LatencyModel:
    """Every step takes exactly ``base_s`` seconds, whatever is in the batch (KV transfers are free)."""
    return LatencyModel(name=f"const-{base_s}", coefficients=StepCoefficients(base_s, 0.0, 0.0, 0.0, 0.0))


@dataclass
class Running:
    url: str
    port: int
    sim: SimServer

    @property
    def engine(self) -> EngineCore:
        return self.sim.engine


@contextlib.asynccontextmanager
async def serve(
    *,
    base_s: float = 1e-3,
    max_model_len: int = 2048,
    num_gpu_blocks: int = 4096,
    **config_kw: Any,
) -> AsyncIterator[Running]:
    """An in-process simulator on a free port (its ServeConfig.port is the real one), cleaned up on exit."""
    port = free_port()
    config = ServeConfig(model=MODEL, port=port, max_model_len=max_model_len, **config_kw)
    engine_config = EngineConfig(
        scheduler=SchedulerConfig(max_model_len=max_model_len),
        block_size=BLOCK,
        num_gpu_blocks=num_gpu_blocks,
        output_token_range=TOKENIZER.output_token_range(),
    )
    sim = SimServer(config, engine_config, step_model(base_s), FallbackTokenizer())
    runner = web.AppRunner(sim.app(), handler_cancellation=True)  # as `kvscale sim serve` (web.run_app) does
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield Running(f"http://127.0.0.1:{port}", port, sim)
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def oai(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    async with serve() as s:
        yield s


@pytest.fixture
async def client(server: Running) -> AsyncIterator[openai.AsyncOpenAI]:
    async with oai(server.url) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def wait_until(cond: Callable[[], bool], timeout: float = 2.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def assert_healthy(http: aiohttp.ClientSession, url: str) -> None:
    async with http.get(url + "/health") as r:
        assert r.status == 200
    async with http.post(
        url + "/v1/completions", json={"model": MODEL, "prompt": "still alive?", "max_tokens": 2}
    ) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["usage"]["completion_tokens"] == 2


def assert_openai_error(body: Any, status: int) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] == status
    return err


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], family: str, sample_name: str, **labels: str) -> float:
    matches = [
        s.value
        for s in families[family].samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (family, sample_name, labels, families[family].samples)
    return matches[0]


# ------------------------------------------------------------------------------------------------------------------
# basic endpoints and the OpenAI SDK


async def test_models_health_version(server: Running, http: aiohttp.ClientSession, client: openai.AsyncOpenAI):
    for path in ("/health", "/ping"):
        async with http.get(server.url + path) as r:
            assert r.status == 200
    async with http.get(server.url + "/version") as r:
        assert (await r.json())["version"] == "0.32.0"
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_dump()["max_model_len"] == 2048


async def test_completion_non_streaming(client: openai.AsyncOpenAI):
    resp = await client.completions.create(model=MODEL, prompt="Hello there, simulator!", max_tokens=7)
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    assert resp.model == MODEL
    (choice,) = resp.choices
    assert choice.finish_reason == "length"
    assert len(choice.text.split()) == 7  # the fallback tokenizer decodes each output id to " word"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(TOKENIZER.encode_prompt("Hello there, simulator!"))
    assert resp.usage.completion_tokens == 7
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7
    assert resp.usage.prompt_tokens_details.cached_tokens == 0


async def test_chat_non_streaming(client: openai.AsyncOpenAI):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}]
    resp = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    (choice,) = resp.choices
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert len(choice.message.content.split()) == 5
    assert resp.usage.prompt_tokens == len(TOKENIZER.encode_chat(messages))
    assert resp.usage.completion_tokens == 5
    # max_completion_tokens (the newer name) is honoured too
    resp = await client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3)
    assert resp.usage.completion_tokens == 3


async def _stream_completion(client: openai.AsyncOpenAI, max_tokens: int, **kw: Any) -> tuple[list[Any], Any]:
    stream = await client.completions.create(
        model=MODEL, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, **kw
    )
    chunks = [c async for c in stream]
    content = [c for c in chunks if c.choices]
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0] is chunks[-1] and not usage[0].choices
    return content, usage[0].usage


async def test_completion_streaming_usage_and_prefix_cache(client: openai.AsyncOpenAI):
    n_prompt = len(TOKENIZER.encode_prompt(LONG_PROMPT))
    assert n_prompt >= 3 * BLOCK
    content, usage = await _stream_completion(client, 9, prompt=LONG_PROMPT)
    assert len(content) == 9  # one chunk per token (one step each)
    assert [c.choices[0].finish_reason for c in content] == [None] * 8 + ["length"]
    assert all(c.choices[0].text for c in content)
    assert len({c.id for c in content}) == 1 and content[0].id.startswith("cmpl-")
    assert usage.prompt_tokens == n_prompt
    assert usage.completion_tokens == 9
    assert usage.prompt_tokens_details.cached_tokens == 0

    content, usage = await _stream_completion(client, 9, prompt=LONG_PROMPT)
    cached = usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < n_prompt
    assert cached % BLOCK == 0
    assert cached == (n_prompt - 1) // BLOCK * BLOCK  # all full blocks but the one holding the last token
    assert usage.completion_tokens == 9

    # a prompt given as token ids shares the cache with the same ids given as text
    ids = TOKENIZER.encode_prompt(LONG_PROMPT)
    _, usage = await _stream_completion(client, 2, prompt=ids)
    assert usage.prompt_tokens == n_prompt
    assert usage.prompt_tokens_details.cached_tokens == cached


async def test_chat_streaming(client: openai.AsyncOpenAI):
    messages = [{"role": "user", "content": LONG_PROMPT}]
    n_prompt = len(TOKENIZER.encode_chat(messages))
    for attempt in range(2):
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert chunks[0].object == "chat.completion.chunk"
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[0].choices[0].finish_reason is None
        content = [c for c in chunks[1:] if c.choices]
        assert len(content) == 6
        assert all(c.choices[0].delta.content for c in content)
        assert content[-1].choices[0].finish_reason == "length"
        assert chunks[-1].choices == []
        usage = chunks[-1].usage
        assert usage.prompt_tokens == n_prompt
        assert usage.completion_tokens == 6
        cached = usage.prompt_tokens_details.cached_tokens
        if attempt == 0:
            assert cached == 0
        else:
            assert 0 < cached < n_prompt and cached % BLOCK == 0


async def test_streaming_without_usage_has_no_usage_chunk(client: openai.AsyncOpenAI):
    stream = await client.completions.create(model=MODEL, prompt="a b c", max_tokens=4, stream=True)
    chunks = [c async for c in stream]
    assert len(chunks) == 4
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


# ------------------------------------------------------------------------------------------------------------------
# real-time pacing


async def test_tokens_are_paced_by_the_latency_model():
    """Every step takes ``step`` s: the first token leaves after one step (the prefill), then one per step, so a
    10-token request takes 10 steps. Lower bounds hold on every attempt (tokens are never early nor sent at once);
    the upper bounds on the best of three attempts, since a loaded test machine can only add delay."""
    step = 0.025
    attempts: list[tuple[float, float]] = []
    async with serve(base_s=step) as s, oai(s.url) as client:
        await client.completions.create(model=MODEL, prompt="warm up", max_tokens=1)  # connection set up
        for _ in range(3):
            t0 = time.perf_counter()
            stream = await client.completions.create(
                model=MODEL,
                prompt="how fast are you",
                max_tokens=10,
                stream=True,
                stream_options={"include_usage": True},
            )
            arrivals = []
            async for chunk in stream:
                if chunk.choices:
                    arrivals.append(time.perf_counter() - t0)
            e2e = time.perf_counter() - t0
            assert len(arrivals) == 10
            ttft = arrivals[0]
            assert ttft >= 0.9 * step, ttft
            assert e2e >= 0.9 * 10 * step, e2e
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            assert sorted(gaps)[len(gaps) // 2] >= 0.6 * step, gaps  # tokens trickle out, they are not sent at once
            assert arrivals[-1] - arrivals[0] >= 0.6 * 9 * step, arrivals
            attempts.append((ttft, e2e))
            if ttft <= 1.4 * step and e2e <= 1.4 * 10 * step:
                break
        assert s.engine.num_steps == 1 + 10 * len(attempts)  # warm-up + 10 per request: one step per token
    best_ttft, best_e2e = min(t for t, _ in attempts), min(e for _, e in attempts)
    assert best_ttft <= 1.4 * step, attempts
    assert best_e2e <= 1.4 * 10 * step, attempts


async def test_chat_role_chunk_comes_with_the_first_token():
    """vLLM sends the chat stream's role chunk when the first token exists; a client measuring TTFT by the first
    chunk must see at least the prefill step."""
    step = 0.1
    async with serve(base_s=step) as s, aiohttp.ClientSession() as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
        t0 = time.perf_counter()
        async with http.post(s.url + "/v1/chat/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    first = time.perf_counter() - t0
                    assert b'"role":"assistant"' in line
                    break
        assert first >= 0.9 * step, first


# ------------------------------------------------------------------------------------------------------------------
# errors


ERROR_CASES: list[tuple[str, str, bytes, int, str | None]] = [
    # (name, path, body, status, text the error's param contains)
    ("malformed JSON", "/v1/completions", b'{"model": ', 400, None),
    ("not JSON at all", "/v1/chat/completions", b"\xff\xfe garbage", 400, None),
    ("empty body", "/v1/completions", b"", 400, None),
    ("body is a list", "/v1/completions", b"[1, 2, 3]", 400, None),
    ("body is a string", "/v1/chat/completions", b'"hello"', 400, None),
    ("body is null", "/v1/completions", b"null", 400, None),
    ("unknown model", "/v1/completions", json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "model"),
    ("unknown model (chat)", "/v1/chat/completions",
     json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model"),
    ("model not a string", "/v1/completions", json.dumps({"model": 3, "prompt": "x"}).encode(), 400, "model"),
    ("max_tokens beyond max_model_len", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "x y", "max_tokens": 5000}).encode(), 400, "max_tokens"),
    ("max_completion_tokens too large", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 99999})
     .encode(), 400, "max_"),
    ("prompt longer than max_model_len", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": [1000] * 3000, "max_tokens": 1}).encode(), 400, None),
    ("text prompt longer than max_model_len", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "w " * 2100}).encode(), 400, None),
    ("chat longer than max_model_len", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "w " * 2100}]}).encode(), 400, None),
    ("max_tokens a string", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "x"}).encode(), 400, "max_tokens"),
    ("max_tokens a float", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2.5}).encode(), 400, "max_tokens"),
    ("max_tokens a bool", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "x", "max_tokens": True}).encode(), 400, "max_tokens"),
    ("max_tokens zero", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    ("stream not a boolean", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "x", "stream": "maybe"}).encode(), 400, "stream"),
    ("stream a list", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "x", "stream": [True]}).encode(), 400, "stream"),
    ("stream_options not an object", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "x", "stream": True, "stream_options": 1}).encode(), 400, "stream_options"),
    ("messages not a list", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": "hello"}).encode(), 400, "messages"),
    ("messages empty", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
    ("message without role", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": [{"content": "x"}]}).encode(), 400, "messages"),
    ("message content a number", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode(), 400, "messages"),
    ("prompt missing", "/v1/completions", json.dumps({"model": MODEL}).encode(), 400, "prompt"),
    ("prompt empty", "/v1/completions", json.dumps({"model": MODEL, "prompt": ""}).encode(), 400, "prompt"),
    ("prompt a dict", "/v1/completions", json.dumps({"model": MODEL, "prompt": {"a": 1}}).encode(), 400, "prompt"),
    ("token id out of range", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": [1, 2, 10**9]}).encode(), 400, "prompt"),
    ("negative token id", "/v1/completions", json.dumps({"model": MODEL, "prompt": [1, -2]}).encode(), 400, "prompt"),
    ("n=2", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "n": 2}).encode(), 400, "n"),
    ("temperature a string", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    ("kv_transfer_params a list", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "x", "kv_transfer_params": [1]}).encode(), 400, "kv_transfer_params"),
    # Python's json module raises ValueError (not JSONDecodeError) for integers over 4300 digits and
    # RecursionError for deep nesting: both must still be a 400, not a 500
    ("integer literal over 4300 digits", "/v1/completions",
     b'{"model": "sim-model", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),
    ("deeply nested JSON", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    # the P/D side channel validates its body the same way
    ("release: no request_id", "/kvscale/kv/release", b"{}", 400, "request_id"),
    ("release: not an object", "/kvscale/kv/release", b"[1]", 400, "request_id"),
    ("release: bad UTF-8", "/kvscale/kv/release", b"\xff\xfe\xfd", 400, "request_id"),
    ("release: integer over 4300 digits", "/kvscale/kv/release", b'{"request_id": ' + b"9" * 5000 + b"}", 400, None),
    ("release: deeply nested JSON", "/kvscale/kv/release", b"[" * 100_000, 400, None),
]  # fmt: skip


async def test_errors_are_openai_shaped(server: Running, http: aiohttp.ClientSession):
    for name, path, body, status, param in ERROR_CASES:
        async with http.post(server.url + path, data=body, headers={"Content-Type": "application/json"}) as r:
            text = await r.text()
            assert r.status == status, (name, r.status, text)
            assert r.content_type == "application/json", name
            err = assert_openai_error(json.loads(text), status)
            if param is not None:
                assert param in (err["param"] or ""), (name, err)
    assert server.engine.num_running == 0 and server.engine.num_waiting == 0
    assert not server.engine.requests  # nothing was admitted
    await assert_healthy(http, server.url)


async def test_errors_through_the_sdk(client: openai.AsyncOpenAI):
    with pytest.raises(openai.NotFoundError) as nf:
        await client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert nf.value.status_code == 404
    assert nf.value.param == "model"
    assert "nope" in nf.value.message
    with pytest.raises(openai.BadRequestError) as br:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)
    assert br.value.param == "max_tokens"
    assert "2048" in br.value.message
    with pytest.raises(openai.BadRequestError) as br:
        await client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert br.value.param == "messages"
    resp = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert resp.usage.completion_tokens == 2


# ------------------------------------------------------------------------------------------------------------------
# property test: no input makes the server fail


_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_json = st.recursive(
    _leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=8
)
_small_int = st.integers(min_value=-2, max_value=6)
_message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "system", "assistant", "tool"]) | _json,
        "content": st.text(max_size=60)
        | st.lists(
            st.fixed_dictionaries({}, optional={"type": st.just("text") | _json, "text": st.text(max_size=20) | _json}),
            max_size=3,
        )
        | _json,
        "name": _json,
    },
)
_FIELDS = {
    "model": st.sampled_from([MODEL, "other-model", ""]) | _json,
    "prompt": st.text(max_size=120)
    | st.lists(st.integers(min_value=-3, max_value=30_005), max_size=120)
    | st.lists(st.text(max_size=30) | st.lists(st.integers(0, 30_000), max_size=20), max_size=2)
    | _json,
    "messages": st.lists(_message, max_size=3) | _json,
    "max_tokens": _small_int | st.integers() | _json,
    "max_completion_tokens": _small_int | _json,
    "stream": st.booleans() | _json,
    "request_id": st.text(max_size=12) | _json,
    "n": st.integers(min_value=-1, max_value=3) | _json,
    "temperature": st.floats() | _json,
    "top_p": st.floats(0, 1) | _json,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | _json}) | _json,
    "kv_transfer_params": st.fixed_dictionaries(
        {}, optional={"do_remote_decode": st.booleans() | _json, "do_remote_prefill": st.booleans() | _json}
    )
    | _json,
}


@st.composite
def _random_objects(draw: st.DrawFn) -> bytes:
    """Objects mixing the API's keys (random values of random types) with unknown keys."""
    body = draw(st.fixed_dictionaries({}, optional=_FIELDS))
    body.update(draw(st.dictionaries(st.text(max_size=8), _json, max_size=2)))
    return json.dumps(body).encode()


_role = st.sampled_from(["user", "system", "assistant"])


@st.composite
def _near_valid(draw: st.DrawFn) -> bytes:
    """A valid request for both endpoints (small max_tokens), then up to two keys dropped or given random values."""
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": draw(st.text(min_size=1, max_size=120) | st.lists(st.integers(0, 29_999), min_size=1, max_size=100)),
        "messages": draw(
            st.lists(st.fixed_dictionaries({"role": _role, "content": st.text(max_size=60)}), min_size=1, max_size=3)
        ),
        "max_tokens": draw(st.integers(1, 6)),
    }
    options = {
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "n": st.just(1),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "max_completion_tokens": st.integers(1, 6),
        "kv_transfer_params": st.fixed_dictionaries(
            {}, optional={"do_remote_decode": st.booleans(), "do_remote_prefill": st.booleans()}
        ),
    }
    body.update(draw(st.fixed_dictionaries({}, optional=options)))
    for key in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=2, unique=True)):
        if draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = draw(_FIELDS[key])
    return json.dumps(body).encode()


_bodies = (
    _near_valid()
    | _near_valid()
    | _random_objects()
    | _json.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=64)
)


@pytest.fixture
async def fast_server() -> AsyncIterator[Running]:
    # a small context (chat requests without max_tokens generate up to max_model_len - prompt) and fast steps;
    # plenty of blocks (do_remote_decode requests hold theirs for the P/D hold timeout)
    async with serve(base_s=1e-4, max_model_len=128, num_gpu_blocks=16_384) as s:
        yield s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies)
async def test_no_input_breaks_the_server(fast_server: Running, http: aiohttp.ClientSession, body: bytes):
    for path in ("/v1/completions", "/v1/chat/completions", "/kvscale/kv/release"):
        async with http.post(fast_server.url + path, data=body, headers={"Content-Type": "application/json"}) as r:
            raw = await r.read()
            assert r.status < 500, (path, body, r.status, raw)
            event(f"{path} -> {r.status}{' stream' if r.content_type == 'text/event-stream' else ''}")
            if r.status != 200:
                assert_openai_error(json.loads(raw), r.status)
            elif r.content_type == "text/event-stream":
                events = [line for line in raw.decode().split("\n\n") if line]
                assert events[-1] == "data: [DONE]", raw
                for ev in events[:-1]:
                    chunk = json.loads(ev.removeprefix("data: "))
                    assert chunk["choices"] or chunk.get("usage"), chunk
            elif path == "/kvscale/kv/release":
                assert json.loads(raw) == {"released": False}  # no such held request
            else:
                resp = json.loads(raw)
                assert resp["choices"][0]["finish_reason"] == "length"
                assert resp["usage"]["completion_tokens"] >= 1
        # every admitted request ran to the end: nothing left behind in the engine
        assert fast_server.engine.num_running == 0 and fast_server.engine.num_waiting == 0
        assert not fast_server.engine.requests
    async with http.get(fast_server.url + "/health") as r:
        assert r.status == 200


# ------------------------------------------------------------------------------------------------------------------
# /metrics

VLLM_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
VLLM_COUNTERS = (
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:num_preemptions",
    "vllm:request_success",
)
VLLM_HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
    "vllm:request_time_per_output_token_seconds",
)


async def test_vllm_metrics(server: Running, http: aiohttp.ClientSession, client: openai.AsyncOpenAI):
    before = await scrape(http, server.url)
    for name in VLLM_GAUGES:
        assert before[name].type == "gauge", name
    for name in VLLM_COUNTERS:
        assert before[name].type == "counter", name
    for name in VLLM_HISTOGRAMS:
        assert before[name].type == "histogram", name
    assert before["vllm:cache_config_info"].type == "gauge"
    assert "vllm:lora_requests_info" not in before  # no adapters configured
    labels = {"model_name": MODEL, "engine": "0"}
    for name in ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:prefix_cache_hits"):
        assert sample(before, name, name + "_total", **labels) == 0

    max_tokens = [5, 5, 3]
    n_prompt = len(TOKENIZER.encode_prompt(LONG_PROMPT))
    await client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=5)
    await client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=5)  # prefix-cache hit
    chat = [{"role": "user", "content": "hello"}]
    await client.chat.completions.create(model=MODEL, messages=chat, max_tokens=3)
    n_chat = len(TOKENIZER.encode_chat(chat))

    m = await scrape(http, server.url)
    # every family but the info gauge carries vLLM's model_name and engine labels
    for name in (*VLLM_GAUGES, *VLLM_COUNTERS, *VLLM_HISTOGRAMS):
        for s in m[name].samples:
            assert s.labels.get("model_name") == MODEL and s.labels.get("engine") == "0", (name, s)
    assert sample(m, "vllm:num_requests_running", "vllm:num_requests_running", **labels) == 0
    assert sample(m, "vllm:num_requests_waiting", "vllm:num_requests_waiting", **labels) == 0
    assert sample(m, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", **labels) == 0  # cached blocks are free
    hit = (n_prompt - 1) // BLOCK * BLOCK
    assert sample(m, "vllm:prompt_tokens", "vllm:prompt_tokens_total", **labels) == 2 * n_prompt + n_chat
    assert sample(m, "vllm:generation_tokens", "vllm:generation_tokens_total", **labels) == sum(max_tokens)
    assert sample(m, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total", **labels) == 2 * n_prompt + n_chat
    assert sample(m, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total", **labels) == hit
    assert sample(m, "vllm:num_preemptions", "vllm:num_preemptions_total", **labels) == 0
    assert sample(m, "vllm:request_success", "vllm:request_success_total", finished_reason="length", **labels) == 3
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_prompt_tokens",
                 "vllm:request_generation_tokens"):  # fmt: skip
        assert sample(m, name, name + "_count", **labels) == 3, name
        assert sample(m, name, name + "_bucket", le="+Inf", **labels) == 3, name
        assert before[name].samples and sample(before, name, name + "_count", **labels) == 0
    # one inter-token latency per token after the first
    itl = "vllm:inter_token_latency_seconds"
    assert sample(m, itl, itl + "_count", **labels) == sum(t - 1 for t in max_tokens)
    assert sample(m, "vllm:request_generation_tokens", "vllm:request_generation_tokens_sum", **labels) == 13
    assert sample(m, "vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum", **labels) == 2 * n_prompt + n_chat
    # vLLM's bucket boundaries: 1-2-5 token buckets up to max_model_len; TTFT from 1 ms
    les = {s.labels["le"] for s in m["vllm:request_prompt_tokens"].samples if s.name.endswith("_bucket")}
    assert {"1.0", "2.0", "5.0", "1000.0", "2000.0", "+Inf"} <= les and "5000.0" not in les
    ttft_les = [s.labels["le"] for s in m["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
    assert ttft_les[0] == "0.001"

    (info,) = m["vllm:cache_config_info"].samples
    assert info.value == 1
    assert info.labels["block_size"] == str(BLOCK)
    assert info.labels["num_gpu_blocks"] == "4096"
    assert info.labels["engine"] == "0"
    assert info.labels["enable_prefix_caching"] == "True"


async def test_metrics_gauges_while_running_and_aborted_requests(http: aiohttp.ClientSession):
    async with serve(base_s=0.01) as server:  # 200 tokens would take 2 s
        await _running_then_aborted(server, http)


async def _running_then_aborted(server: Running, http: aiohttp.ClientSession) -> None:
    labels = {"model_name": MODEL, "engine": "0"}
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 200, "stream": True}
    async with http.post(server.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        await r.content.readuntil(b"\n\n")
        m = await scrape(http, server.url)
        assert sample(m, "vllm:num_requests_running", "vllm:num_requests_running", **labels) == 1
        usage = sample(m, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", **labels)
        assert usage == pytest.approx(6 / 4096)  # 80 prompt tokens + 1-2 outputs: six blocks
        r.close()
    await wait_until(lambda: server.engine.num_running == 0, what="the abort")
    m = await scrape(http, server.url)
    assert sample(m, "vllm:num_requests_running", "vllm:num_requests_running", **labels) == 0
    assert sample(m, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", **labels) == 0
    assert sample(m, "vllm:request_success", "vllm:request_success_total", finished_reason="abort", **labels) == 1


async def test_sglang_metrics(http: aiohttp.ClientSession):
    async with serve(metrics_flavor="sglang") as s, oai(s.url) as client:
        before = await scrape(http, s.url)
        await client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=4)
        await client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=4)
        m = await scrape(http, s.url)
    assert not any(name.startswith("vllm:") for name in m)
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate"):
        assert m[name].type == "gauge", name
        (smp,) = m[name].samples
        assert smp.labels == {"model_name": MODEL}
    for name in ("sglang:time_to_first_token_seconds", "sglang:inter_token_latency_seconds",
                 "sglang:e2e_request_latency_seconds"):  # fmt: skip
        assert m[name].type == "histogram", name
        assert sample(m, name, name + "_count", model_name=MODEL) >= (2 if "inter" not in name else 6)
    for name in ("sglang:prompt_tokens", "sglang:generation_tokens"):
        assert m[name].type == "counter"
        assert sample(m, name, name + "_total", model_name=MODEL) > sample(before, name, name + "_total")
    n_prompt = len(TOKENIZER.encode_prompt(LONG_PROMPT))
    rate = sample(m, "sglang:cache_hit_rate", "sglang:cache_hit_rate")
    assert rate == pytest.approx((n_prompt - 1) // BLOCK * BLOCK / (2 * n_prompt))


# ------------------------------------------------------------------------------------------------------------------
# KV events over ZMQ


async def test_kv_events_published_and_replayed(http: aiohttp.ClientSession):
    port, replay_port = free_port(), free_port()
    cfg = KVEventsConfig(
        enable_kv_cache_events=True,
        publisher="zmq",
        endpoint=f"tcp://*:{port}",
        topic="kv-events",
        replay_endpoint=f"tcp://*:{replay_port}",
    )
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    dealer = ctx.socket(zmq.DEALER)
    try:
        async with serve(kv_events=cfg) as s, oai(s.url) as client:
            sub.connect(f"tcp://127.0.0.1:{port}")
            sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
            await asyncio.sleep(0.3)  # let the subscription reach the publisher
            prompt = list(range(2000, 2000 + 3 * BLOCK + 8))  # three full blocks and a partial one
            resp = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12)
            assert resp.usage.prompt_tokens == len(prompt)

            live: list[tuple[int, list[Any]]] = []
            stored: list[BlockStored] = []
            while sum(len(ev.block_hashes) for ev in stored) < 4:  # 3 prompt blocks, then one filled by outputs
                frames = await asyncio.wait_for(sub.recv_multipart(), 2.0)
                topic, seq, batch = decode_message(frames)
                assert topic == "kv-events"
                assert batch.data_parallel_rank == 0
                live.append((seq, frames))
                stored += [ev for ev in batch.events if isinstance(ev, BlockStored)]
            while await sub.poll(300):  # anything else the request caused
                frames = await sub.recv_multipart()
                live.append((decode_message(frames)[1], frames))
            assert [seq for seq, _ in live] == list(range(len(live)))  # from 0, step 1

            first = stored[0]
            assert first.parent_block_hash is None
            assert first.token_ids == prompt[: 3 * BLOCK]
            assert len(first.block_hashes) == 3
            assert first.block_size == BLOCK
            assert first.medium == "GPU" and first.lora_name is None
            for prev, ev in itertools.pairwise(stored):
                assert ev.parent_block_hash == prev.block_hashes[-1]
                assert ev.block_size == BLOCK
                assert len(ev.token_ids) == BLOCK * len(ev.block_hashes)
            assert stored[1].token_ids[:8] == prompt[3 * BLOCK :]  # the partial prompt block, completed by outputs
            assert len({h for ev in stored for h in ev.block_hashes}) == 4
            async with http.get(s.url + "/kvscale/stats") as r:
                assert (await r.json())["kv_events_published"] == len(live)

            # replay everything from sequence 0 through the ROUTER socket
            dealer.connect(f"tcp://127.0.0.1:{replay_port}")
            await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            replayed: list[list[bytes]] = []
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), 2.0)
                assert frames[0] == b""
                if int.from_bytes(frames[2], "big", signed=True) == -1:
                    break
                replayed.append(frames[1:])
            assert replayed == [frames for _, frames in live]
            assert [decode_message(f)[1] for f in replayed] == [seq for seq, _ in live]

            # replay from the middle
            await dealer.send_multipart([b"", (1).to_bytes(8, "big")])
            seqs = []
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), 2.0)
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == -1:
                    break
                seqs.append(seq)
            assert seqs == list(range(1, len(live)))
    finally:
        sub.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


# ------------------------------------------------------------------------------------------------------------------
# prefill/decode disaggregation


async def test_prefill_decode_disaggregation(http: aiohttp.ClientSession):
    async with (
        serve(role="prefill", engine_id="prefill-engine") as pre,
        serve(role="decode") as dec,
        oai(pre.url) as pclient,
        oai(dec.url) as dclient,
    ):
        n_prompt = len(TOKENIZER.encode_prompt(LONG_PROMPT))
        resp = await pclient.completions.create(
            model=MODEL, prompt=LONG_PROMPT, max_tokens=8, extra_body={"kv_transfer_params": {"do_remote_decode": True}}
        )
        assert resp.usage.completion_tokens == 1  # the prefill pod computes the first token only
        assert resp.choices[0].finish_reason == "length"
        ktp = resp.model_dump()["kv_transfer_params"]
        assert ktp["do_remote_prefill"] is True
        assert ktp["do_remote_decode"] is False
        assert ktp["remote_engine_id"] == "prefill-engine"
        assert ktp["remote_host"] == "127.0.0.1"
        assert ktp["remote_port"] == pre.port
        assert ktp["remote_request_id"] == resp.id
        assert len(ktp["remote_block_ids"]) == -(-n_prompt // BLOCK)
        assert set(pre.engine.held) == {resp.id}  # blocks wait for the decoder's pull
        assert pre.engine.kv.usage > 0

        stream = await dclient.completions.create(
            model=MODEL,
            prompt=LONG_PROMPT,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"kv_transfer_params": ktp},
        )
        chunks = [c async for c in stream]
        content = [c for c in chunks if c.choices]
        assert len(content) == 8
        assert content[-1].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 8
        assert chunks[-1].usage.prompt_tokens == n_prompt
        # the decode pod told the prefill pod (POST /kvscale/kv/release) that it pulled the KV
        await wait_until(lambda: not pre.engine.held, what="the prefill pod to release the held blocks")
        assert pre.engine.kv.usage == 0

        # roles are enforced
        with pytest.raises(openai.BadRequestError):
            await dclient.completions.create(
                model=MODEL, prompt="x", max_tokens=2, extra_body={"kv_transfer_params": {"do_remote_decode": True}}
            )
        with pytest.raises(openai.BadRequestError):
            await pclient.completions.create(
                model=MODEL, prompt="x", max_tokens=2, extra_body={"kv_transfer_params": ktp}
            )
        # the release side channel validates its input and is idempotent
        async with http.post(pre.url + "/kvscale/kv/release", data=b"{}") as r:
            assert r.status == 400
            assert_openai_error(await r.json(), 400)
        async with http.post(pre.url + "/kvscale/kv/release", json={"request_id": resp.id}) as r:
            assert (await r.json()) == {"released": False}
        await assert_healthy(http, dec.url)


# ------------------------------------------------------------------------------------------------------------------
# LoRA


async def test_lora_adapter(http: aiohttp.ClientSession):
    async with serve(lora_modules={"my-adapter": "/adapters/x"}, base_s=0.005) as s, oai(s.url) as client:
        models = {m.id: m.model_dump() for m in (await client.models.list()).data}
        assert set(models) == {MODEL, "my-adapter"}
        assert models["my-adapter"]["root"] == "/adapters/x"
        assert models["my-adapter"]["parent"] == MODEL

        base = await client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2)
        assert base.usage.prompt_tokens_details.cached_tokens == 0
        stream = await client.completions.create(
            model="my-adapter", prompt=LONG_PROMPT, max_tokens=20, stream=True, stream_options={"include_usage": True}
        )
        chunks = []
        async for chunk in stream:
            if len(chunks) == 1:  # mid-stream: the adapter is running
                m = await scrape(http, s.url)
                (info,) = m["vllm:lora_requests_info"].samples
                assert info.labels["running_lora_adapters"] == "my-adapter"
                assert info.labels["max_lora"] == "1"
            chunks.append(chunk)
        assert chunks[0].model == "my-adapter"
        assert chunks[-1].usage.completion_tokens == 20
        # the adapter's KV differs from the base model's: no prefix-cache hit across them
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
        again = await client.completions.create(model="my-adapter", prompt=LONG_PROMPT, max_tokens=2)
        assert again.model == "my-adapter"
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        m = await scrape(http, s.url)
        assert m["vllm:lora_requests_info"].type == "gauge"
        (info,) = m["vllm:lora_requests_info"].samples
        assert info.labels["running_lora_adapters"] == ""


# ------------------------------------------------------------------------------------------------------------------
# client disconnects


async def test_client_disconnect_aborts_the_request(http: aiohttp.ClientSession):
    async with serve(base_s=0.01) as s:  # 500 tokens would take 5 s
        body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 500, "stream": True}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            for _ in range(2):
                chunk = await r.content.readuntil(b"\n\n")
                assert chunk.startswith(b"data: {")
            assert s.engine.num_running == 1
            r.close()  # drop the connection mid-stream
        await wait_until(lambda: s.engine.num_running == 0 and not s.engine.requests, what="the abort")
        assert s.engine.kv.usage == 0

        # a non-streaming request whose client gives up is aborted as well
        with pytest.raises(TimeoutError):
            await http.post(
                s.url + "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500},
                timeout=aiohttp.ClientTimeout(total=0.1),
            )
        await wait_until(lambda: s.engine.num_running == 0 and not s.engine.requests, what="the abort")
        await assert_healthy(http, s.url)


# ------------------------------------------------------------------------------------------------------------------
# the real CLI in a subprocess


def test_cli_serve_subprocess(tmp_path: Path):
    latency = tmp_path / "fast.json"
    latency.write_text(step_model(0.002).dumps())
    port = free_port()
    cmd = [
        sys.executable, "-m", "kvscale.cli", "sim", "serve",
        "--port", str(port),
        "--served-model-name", "sim-a", "sim-b",
        "--lora-modules", "ad=/adapters/ad",
        "--max-model-len", "1024",
        "--block-size", "16",
        "--num-gpu-blocks", "512",
        "--latency-model", str(latency),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with ManagedProcess(cmd, log_path=tmp_path / "sim.log", name="kvscale-sim", cwd=REPO) as proc:
        proc.wait_http_ready(url + "/health", timeout=30, interval=0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
        try:
            assert [m.id for m in client.models.list().data] == ["sim-a", "sim-b", "ad"]
            resp = client.completions.create(model="sim-b", prompt=LONG_PROMPT, max_tokens=4)
            assert resp.usage.completion_tokens == 4
            assert resp.choices[0].finish_reason == "length"
            chunks = list(
                client.chat.completions.create(
                    model="sim-a",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=3,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert chunks[0].choices[0].delta.role == "assistant"
            assert chunks[-1].usage.completion_tokens == 3
            with pytest.raises(openai.BadRequestError):
                client.completions.create(model="sim-a", prompt="x", max_tokens=5000)
        finally:
            client.close()
        assert "latency model=const-0.002" in proc.log_tail()
        assert proc.stop() == 0  # SIGTERM: a clean shutdown

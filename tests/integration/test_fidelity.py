"""Fidelity: the simulator against real vLLM (CPU build), same tokenizer, same workload, same decoder.

Asserts, for the core surface other kvscale parts depend on:
* /metrics: the core vLLM series exist on both with the same type and label keys;
* KV events: both streams decode with one decoder into the same event types; BlockStored token ids equal the
  prompt's tokens on both; a repeated prompt is a prefix-cache hit on both (same cached_tokens);
* SSE chunks, usage fields and error bodies/status codes have the same shape.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from harness.procs import free_port
from harness.vllm_server import VllmServer
from kvscale.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_message
from kvscale.latency import LatencyModel, StepCoefficients
from kvscale.tokenizer import HFTokenizer
from simulator.engine import EngineConfig
from simulator.kv_publisher import KVEventsConfig
from simulator.scheduler import SchedulerConfig
from simulator.server import ServeConfig, SimServer

pytestmark = pytest.mark.vllm

CORE_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:cache_config_info": "gauge",
}
PROMPT = " ".join(f"the cache block {i} holds tokens of a shared prefix" for i in range(24))


@pytest.fixture
async def sim(vllm_server: VllmServer, tiny_model_dir: Path) -> AsyncIterator[tuple[str, str]]:
    """The simulator configured like the vLLM fixture: same tokenizer, model name, lengths and blocks."""
    port, kv_port = free_port(), free_port()
    tok = HFTokenizer(tiny_model_dir)
    config = ServeConfig(
        model=vllm_server.model,
        port=port,
        max_model_len=vllm_server.max_model_len,
        kv_events=KVEventsConfig(True, "zmq", f"tcp://*:{kv_port}", topic=vllm_server.kv_events_topic),
    )
    engine = EngineConfig(
        scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=2048, max_model_len=config.max_model_len),
        block_size=vllm_server.block_size,
        num_gpu_blocks=vllm_server.num_gpu_blocks or 4096,
        output_token_range=tok.output_token_range(),
    )
    fast = LatencyModel("fast", StepCoefficients(1e-3, 0, 0, 0, 0))
    runner = web.AppRunner(SimServer(config, engine, fast, tok).app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", f"tcp://127.0.0.1:{kv_port}"
    finally:
        await runner.cleanup()


def _families(text: str) -> dict[str, tuple[str, set[str]]]:
    out: dict[str, tuple[str, set[str]]] = {}
    for fam in text_string_to_metric_families(text):
        keys: set[str] = set()
        for s in fam.samples:
            keys |= set(s.labels) - {"le", "quantile"}
        out[fam.name] = (fam.type, keys)
    return out


async def _post(session: aiohttp.ClientSession, url: str, body: Any, path: str = "/v1/completions") -> tuple:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    async with session.post(url + path, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.text()


async def _collect_events(endpoint: str, topic: str, send) -> list[tuple[int, Any]]:
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    await asyncio.sleep(0.5)  # let the subscription reach the publisher
    try:
        await send()
        events = []
        while await sub.poll(1500):
            _, seq, batch = decode_message(await sub.recv_multipart())
            events += [(seq, e) for e in batch.events]
        return events
    finally:
        sub.close(linger=0)
        ctx.term()


async def _workload(url: str, model: str) -> list[dict]:
    """A long prompt twice (second is a prefix hit), then a different one; usage of each."""
    usages = []
    async with aiohttp.ClientSession() as s:
        for prompt in (PROMPT, PROMPT, "an unrelated prompt " * 20):
            body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
            status, text = await _post(s, url, body)
            assert status == 200, text
            usages.append(json.loads(text)["usage"])
    return usages


async def test_metrics_names_types_and_labels_match(vllm_server: VllmServer, sim: tuple[str, str]):
    sim_url, _ = sim
    await _workload(sim_url, vllm_server.model)
    async with aiohttp.ClientSession() as s:
        async with s.get(vllm_server.url + "/metrics") as r:
            real = _families(await r.text())
        async with s.get(sim_url + "/metrics") as r:
            ours = _families(await r.text())
    for name, kind in CORE_METRICS.items():
        assert name in real, f"reference vLLM lacks {name}: update CORE_METRICS"
        assert name in ours, f"simulator lacks {name}"
        assert real[name][0] == ours[name][0] == kind, (name, real[name][0], ours[name][0])
        missing = real[name][1] - ours[name][1]
        assert not missing or name == "vllm:cache_config_info", f"{name}: simulator lacks label keys {missing}"
    assert {"block_size", "num_gpu_blocks", "engine"} <= ours["vllm:cache_config_info"][1]


async def test_kv_events_and_prefix_hits_match(vllm_server: VllmServer, sim: tuple[str, str], tiny_model_dir):
    sim_url, sim_kv = sim
    runs = {}
    for name, url, endpoint in (("vllm", vllm_server.url, vllm_server.kv_events_endpoint), ("sim", sim_url, sim_kv)):
        usages: list[dict] = []

        async def send(url: str = url, usages: list[dict] = usages) -> None:
            usages += await _workload(url, vllm_server.model)

        events = await _collect_events(endpoint, vllm_server.kv_events_topic, send)
        runs[name] = (events, usages)

    prompt_ids = HFTokenizer(tiny_model_dir).encode_prompt(PROMPT)
    bs = vllm_server.block_size
    n_full = len(prompt_ids) // bs
    assert n_full >= 3
    for name, (events, usages) in runs.items():
        assert events, f"{name}: no KV events"
        kinds = {type(e) for _, e in events}
        assert kinds <= {BlockStored, BlockRemoved, AllBlocksCleared}, kinds
        stored = [e for _, e in events if isinstance(e, BlockStored)]
        first = stored[0]
        assert first.block_size == bs and first.parent_block_hash is None, (name, first)
        # the prompt's full blocks are stored with exactly the prompt's token ids, chained by parent hash
        tokens: list[int] = []
        hashes: list[Any] = []
        for e in stored:
            if hashes and e.parent_block_hash != hashes[-1]:
                break
            tokens += e.token_ids
            hashes += e.block_hashes
        assert tokens[: n_full * bs] == prompt_ids[: n_full * bs], f"{name}: BlockStored tokens differ from prompt"
        assert all(isinstance(h, int) for h in hashes), f"{name}: block hashes are not ints"
        seqs = [s for s, _ in events]
        assert seqs == sorted(seqs), f"{name}: sequence numbers not monotonic"
        # the repeated prompt hits the prefix cache
        assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
        assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0
    v, s = runs["vllm"][1], runs["sim"][1]
    assert [u["prompt_tokens"] for u in v] == [u["prompt_tokens"] for u in s], "tokenization differs"
    assert v[1]["prompt_tokens_details"]["cached_tokens"] == s[1]["prompt_tokens_details"]["cached_tokens"]


def _keys(obj: Any) -> Any:
    """The shape of a JSON value: keys of objects, recursively (first element of lists)."""
    if isinstance(obj, dict):
        return {k: _keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_keys(obj[0])] if obj else []
    return None


async def _sse(url: str, path: str, body: dict) -> list[dict]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        assert r.status == 200, await r.text()
        raw = (await r.read()).decode()
    assert raw.rstrip().endswith("data: [DONE]")
    return [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: {")]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_sse_chunks_and_usage_have_the_same_shape(vllm_server: VllmServer, sim: tuple[str, str], chat: bool):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": vllm_server.model, "max_tokens": 5, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}  # fmt: skip
    body |= {"messages": [{"role": "user", "content": "hi there"}]} if chat else {"prompt": "hello world"}
    real = await _sse(vllm_server.url, path, body)
    ours = await _sse(sim[0], path, body)
    # One chunk per token, as vLLM sends them; a busy vLLM output processor may merge tokens into fewer chunks
    # (seen on a loaded 2-core machine), never more.
    assert len(ours) == 6 + chat and 3 <= len(real) <= len(ours), (len(ours), len(real))  # chat: + role chunk
    assert _keys(ours[0]) == _keys(real[0]), "first chunk"
    assert _keys(ours[1]) == _keys(real[1]), "content chunk"
    assert _keys(ours[-2]) == _keys(real[-2]), "last content chunk"
    assert _keys(ours[-1]) == _keys(real[-1]), "usage chunk"
    assert ours[-2]["choices"][0]["finish_reason"] == real[-2]["choices"][0]["finish_reason"] == "length"
    assert ours[-1]["usage"]["completion_tokens"] == real[-1]["usage"]["completion_tokens"] == 5


async def test_non_streaming_bodies_have_the_same_shape(vllm_server: VllmServer, sim: tuple[str, str]):
    for path, extra in (("/v1/completions", {"prompt": "hello"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]})):  # fmt: skip
        body = {"model": vllm_server.model, "max_tokens": 3, "ignore_eos": True, **extra}
        async with aiohttp.ClientSession() as s:
            real = json.loads((await _post(s, vllm_server.url, body, path))[1])
            ours = json.loads((await _post(s, sim[0], body, path))[1])
        assert _keys(ours) == _keys(real), path


ERROR_CASES = [
    ("malformed JSON", '{"model": "tiny-llama", "prompt": ', "/v1/completions"),
    ("unknown model", {"model": "no-such-model", "prompt": "hi", "max_tokens": 2}, "/v1/completions"),
    ("max_tokens beyond max_model_len", {"model": "tiny-llama", "prompt": "hi", "max_tokens": 5000}, "/v1/completions"),
    ("prompt beyond max_model_len", {"model": "tiny-llama", "prompt": "word " * 1100, "max_tokens": 2},
     "/v1/completions"),  # fmt: skip
    ("max_tokens wrong type", {"model": "tiny-llama", "prompt": "hi", "max_tokens": "x"}, "/v1/completions"),
    ("chat unknown model", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions"),
    ("chat max_tokens beyond max_model_len",
     {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000},
     "/v1/chat/completions"),  # fmt: skip
]


async def test_error_statuses_and_bodies_match(vllm_server: VllmServer, sim: tuple[str, str]):
    async with aiohttp.ClientSession() as s:
        for case, body, path in ERROR_CASES:
            rs, rt = await _post(s, vllm_server.url, body, path)
            ss, st = await _post(s, sim[0], body, path)
            assert rs == ss, f"{case}: vLLM {rs} vs simulator {ss} ({st})"
            real, ours = json.loads(rt)["error"], json.loads(st)["error"]
            assert set(ours) == set(real) == {"message", "type", "param", "code"}, case
            assert (ours["type"], ours["param"], ours["code"]) == (real["type"], real["param"], real["code"]) or (
                real["type"] == "Bad Request" and ours["type"] == "Bad Request"  # pydantic's param names a position
            ), f"{case}: vLLM {real} vs simulator {ours}"

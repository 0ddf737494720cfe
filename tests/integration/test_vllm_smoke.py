"""Smoke tests against a real vLLM CPU server: the wire behaviour the simulator has to reproduce."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
import urllib.request
import uuid
from typing import Any

import msgpack
import openai
import pytest
import zmq

from harness.vllm_server import VllmServer

pytestmark = [pytest.mark.vllm]


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, resp.read()


@pytest.fixture(scope="module")
def client(vllm_server: VllmServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm_server.openai_base_url, api_key="unused", max_retries=0, timeout=60)


def _unique_prompt(words: int) -> str:
    """A prompt no earlier request shares a first block with (so nothing is cached yet)."""
    tag = uuid.uuid4().hex[:8]
    return f"{tag} " + " ".join(f"the cache block {i} is here" for i in range(words // 5))


def test_health(vllm_server: VllmServer) -> None:
    status, body = _get(f"{vllm_server.url}/health")
    assert status == 200
    assert body == b""


def test_models_lists_served_name(vllm_server: VllmServer, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llama"]
    raw = json.loads(_get(f"{vllm_server.url}/v1/models")[1])
    assert raw["object"] == "list"
    assert raw["data"][0]["owned_by"] == "vllm"
    assert raw["data"][0]["max_model_len"] == vllm_server.max_model_len


def test_completion(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="tiny-llama", prompt="Hello world", max_tokens=5, temperature=0)
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    assert len(resp.choices) == 1
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 5


def test_chat_completion(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hi there"}], max_tokens=4, temperature=0
    )
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason in {"length", "stop"}
    assert resp.usage is not None and resp.usage.completion_tokens <= 4


def test_completion_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="tiny-llama",
            prompt="Hello world",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content, final = chunks[:-1], chunks[-1]
    assert 1 <= len(content) <= 4  # a chunk per token, unless the detokenizer holds back partial UTF-8
    assert all(c.usage is None for c in content)
    finishes = [c.choices[0].finish_reason for c in content]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert final.choices == []
    assert final.usage is not None and final.usage.completion_tokens == 4
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "Hi there"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first, final = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert final.choices == []
    assert final.usage is not None and final.usage.completion_tokens == 4
    finishes = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])


def test_prefix_cache_hit_reports_cached_tokens(vllm_server: VllmServer, client: openai.OpenAI) -> None:
    prompt = _unique_prompt(120)
    first = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Only full blocks are cached, and the last prompt token is always recomputed.
    assert cached == (second.usage.prompt_tokens - 1) // vllm_server.block_size * vllm_server.block_size
    assert cached > 0


def _none_hash() -> bytes:
    seed = os.environ.get("PYTHONHASHSEED", "vllm-none-hash")
    return hashlib.sha256(pickle.dumps(seed, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(
        pickle.dumps((parent, tuple(tokens), None), protocol=pickle.HIGHEST_PROTOCOL)
    ).digest()


def test_kv_events_arrive_on_zmq(vllm_server: VllmServer, client: openai.OpenAI) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, vllm_server.kv_events_topic.encode())
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(vllm_server.kv_events_endpoint)
        time.sleep(0.5)  # ZMQ slow joiner: let the subscription reach the publisher
        prompt = _unique_prompt(60)
        prompt_ids = _tokenize(vllm_server, prompt)
        resp = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=1, temperature=0)
        assert resp.usage is not None
        n_blocks = resp.usage.prompt_tokens // vllm_server.block_size
        assert n_blocks >= 2

        stored: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not stored:
            if not sub.poll(200):
                continue
            frames = sub.recv_multipart()
            assert len(frames) == 3
            topic, seq, payload = frames
            assert topic == b"kv-events"
            assert len(seq) == 8 and int.from_bytes(seq, "big") >= 0
            batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            # EventBatch is msgspec array_like: [ts, events, data_parallel_rank]
            assert isinstance(batch, list) and len(batch) == 3
            ts, events, dp_rank = batch
            assert isinstance(ts, float) and abs(ts - time.time()) < 60
            assert dp_rank == 0
            for event in events:
                assert isinstance(event, dict)
                assert event["type"] in {"BlockStored", "BlockRemoved", "AllBlocksCleared"}
                n = len(event.get("token_ids", ()))
                if event["type"] == "BlockStored" and event["token_ids"] == prompt_ids[:n]:
                    stored.append(event)
        assert stored, "no BlockStored event for the prompt within 10s"
        event = stored[0]
        assert event["parent_block_hash"] is None
        assert event["block_size"] == vllm_server.block_size
        assert len(event["block_hashes"]) == n_blocks
        assert len(event["token_ids"]) == n_blocks * vllm_server.block_size
        assert event["medium"] == "GPU"
        assert all(isinstance(h, int) and 0 <= h < 2**64 for h in event["block_hashes"])
        # Block hashes: sha256 over pickle((parent_hash, token_ids, extra_keys)), chained from NONE_HASH; the
        # event carries the low 64 bits of the digest as an unsigned int.
        parent = _none_hash()
        for i, published in enumerate(event["block_hashes"]):
            bs = vllm_server.block_size
            parent = _block_hash(parent, event["token_ids"][i * bs : (i + 1) * bs])
            assert published == int.from_bytes(parent, "big") & (2**64 - 1)
    finally:
        sub.close()
        ctx.term()


def _tokenize(server: VllmServer, prompt: str) -> list[int]:
    """The prompt's token ids as the server tokenizes it (vLLM's /tokenize endpoint)."""
    req = urllib.request.Request(
        f"{server.url}/tokenize",
        data=json.dumps({"model": "tiny-llama", "prompt": prompt}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["tokens"]

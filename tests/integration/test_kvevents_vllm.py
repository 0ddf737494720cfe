"""The KV-event index against the real vLLM CPU server (session fixture): vLLM's own sha256 block hashes are
mapped onto ours from BlockStored events, prompts are tokenized with the model's tokenizer from its local
directory, the block size is read from ``vllm:cache_config_info``; the predicted hit must equal the
``cached_tokens`` vLLM reports when the prompt is sent again."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from harness.vllm_server import VllmServer
from kvscale.engine_stats import scrape
from router.kvevents import EventSource, KVEventsManager, load_tokenizer, prompt_token_ids

pytestmark = pytest.mark.vllm


def unique_text(rng: random.Random, words: int) -> str:
    vocab = "alpha beta gamma delta river stone cloud paper green quiet north eleven window copper".split()
    return " ".join(rng.choice(vocab) + str(rng.randrange(1000)) for _ in range(words))


async def wait_prediction(mgr: KVEventsManager, tokens: list[int], url: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = mgr.predict_cached_tokens(tokens, [url])[url]
        if got > 0:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError("no KV events for the prompt reached the index")


async def test_index_predicts_vllm_cached_tokens(vllm_server: VllmServer, tiny_model_dir: Path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    url = vllm_server.url
    async with aiohttp.ClientSession() as http:
        stats = await scrape(http, f"{url}/metrics")
    assert stats.block_size == vllm_server.block_size  # read from vllm:cache_config_info
    mgr = KVEventsManager()
    mgr.set_block_size(url, stats.block_size)
    client = openai.AsyncOpenAI(base_url=vllm_server.openai_base_url, api_key="x", max_retries=0, timeout=60)
    rng = random.Random(time.time_ns())
    try:
        await mgr.sync({url: EventSource(vllm_server.kv_events_endpoint, vllm_server.kv_events_topic)})
        sub = mgr.subscribers[url]
        for _ in range(100):
            if sub.connected.is_set():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # ZMQ slow joiner

        # completions: a prompt of several blocks, sent twice
        text = unique_text(rng, 120)
        body = {"model": vllm_server.model, "prompt": text, "max_tokens": 1, "temperature": 0}
        tokens = prompt_token_ids(tok, body, chat=False)
        assert tokens is not None and len(tokens) > 3 * stats.block_size
        first = await client.completions.create(**body)
        assert first.usage.prompt_tokens == len(tokens)  # tokenized exactly as vLLM does
        predicted = await wait_prediction(mgr, tokens, url)
        second = await client.completions.create(**body)
        assert predicted == second.usage.prompt_tokens_details.cached_tokens
        assert predicted == (len(tokens) - 1) // stats.block_size * stats.block_size

        # a prompt sharing a prefix of the first one: a partial hit, still predicted exactly
        words = text.split()
        partial = {**body, "prompt": " ".join(words[:70] + words[70:][::-1])}
        ptoks = prompt_token_ids(tok, partial, chat=False)
        expect = mgr.predict_cached_tokens(ptoks, [url])[url]
        got = await client.completions.create(**partial)
        assert 0 < expect < predicted
        assert expect == got.usage.prompt_tokens_details.cached_tokens

        # chat: rendered with the model's chat template
        chat = {"model": vllm_server.model, "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "system", "content": unique_text(rng, 80)},
                             {"role": "user", "content": unique_text(rng, 20)}]}  # fmt: skip
        ctoks = prompt_token_ids(tok, chat, chat=True)
        r1 = await client.chat.completions.create(**chat)
        assert r1.usage.prompt_tokens == len(ctoks)
        cpred = await wait_prediction(mgr, ctoks, url)
        r2 = await client.chat.completions.create(**chat)
        assert cpred == r2.usage.prompt_tokens_details.cached_tokens > 0
        assert mgr.index.stats.unmapped_blocks == 0 or mgr.index.stats.stored_blocks > 0
    finally:
        await client.close()
        await mgr.close()

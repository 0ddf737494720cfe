"""The router in front of the real vLLM engine (CPU build, tiny model; the session's ``vllm_server`` fixture),
with the official ``openai`` SDK as the client: streaming and non-streaming, completions and chat."""

from __future__ import annotations

import json

import openai
import pytest
from routers_for_tests import serve_router

pytestmark = pytest.mark.vllm


async def test_openai_sdk_through_router_to_vllm(vllm_server, tmp_path):
    gov = tmp_path / "gov.jsonl"
    async with serve_router([vllm_server.url], policy="prefix", governance_log=str(gov)) as r:
        client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0, timeout=60)
        try:
            models = await client.models.list()
            assert vllm_server.model in [m.id for m in models.data]
            c = await client.completions.create(model=vllm_server.model, prompt="the cache block token", max_tokens=5,
                                                temperature=0)  # fmt: skip
            assert c.usage.completion_tokens == 5 and c.choices[0].text is not None
            stream = await client.completions.create(model=vllm_server.model, prompt="the cache block token",
                                                     max_tokens=5, temperature=0, stream=True)  # fmt: skip
            text = "".join([ch.choices[0].text async for ch in stream if ch.choices])
            assert text == c.choices[0].text  # greedy: the streamed text equals the non-streamed one
            messages = [{"role": "user", "content": "route me to the engine please"}]
            chat = await client.chat.completions.create(model=vllm_server.model, messages=messages, max_tokens=4)
            assert chat.usage.completion_tokens == 4
            stream = await client.chat.completions.create(
                model=vllm_server.model, messages=messages, max_tokens=4, stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [ch async for ch in stream]
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
            with pytest.raises(openai.BadRequestError):  # vLLM's own 400 passes through
                await client.completions.create(model=vllm_server.model, prompt="x", max_tokens=100_000)
        finally:
            await client.close()
        b = r.state.pool.get(vllm_server.url)
        assert b.stats is not None and b.stats.engine == "vllm" and b.in_flight == 0
    lines = [json.loads(x) for x in gov.read_text().splitlines()]
    assert [rec["status"] for rec in lines] == [200, 200, 200, 200, 404, 400]
    assert lines[0]["prompt_tokens"] > 0 and lines[3]["completion_tokens"] == 4
    assert "route me" not in gov.read_text()

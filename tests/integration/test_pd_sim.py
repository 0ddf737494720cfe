"""P/D orchestration end to end: the real router app (in process, real sockets) in front of simulator pods with
``--role prefill`` / ``--role decode`` (``SimServer`` in process), driven by the OpenAI SDK.

The simulator's P/D is vLLM's NixlConnector contract: the prefill pod answers ``kv_transfer_params``, the decode
pod pulls the KV (modelled transfer time) and tells the prefill pod to free its held blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import openai
from aiohttp import web

from harness.procs import free_port
from harness.simpods import Pod, sim_pod
from kvscale.latency import LatencyModel, StepCoefficients
from router.app import create_app
from router.backends import parse_backend_spec
from router.config import RouterConfig
from router.pd import prefill_body

MODEL = "sim-model"
LAT = LatencyModel(name="pd", coefficients=StepCoefficients(2e-3, 1e-5, 0.0, 1e-5, 0.0),
                   kv_transfer_base_s=1e-3, kv_transfer_per_token_s=1e-6)  # fmt: skip
PROMPT = " ".join(f"word{i}" for i in range(200))


def kv_pod(**kw):
    """An in-process simulator pod publishing KV events (ZMQ PUB + replay)."""
    return sim_pod(LAT, kv_events=True, **kw)


def spec(pod: Pod) -> str:
    return f"{pod.url},role={pod.role},model={MODEL},kv-events={pod.kv_endpoint}"


@contextlib.asynccontextmanager
async def router(backends: list[str], policy: str = "least-request") -> AsyncIterator[str]:
    port = free_port()
    cfg = RouterConfig(port=port, backends=[parse_backend_spec(b) for b in backends], policy=policy,
                       governance_log=None, retry_backoff_s=0.001)  # fmt: skip
    runner = web.AppRunner(create_app(cfg), handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_prefill_body_asks_for_one_token_and_remote_decode() -> None:
    b = prefill_body({"model": "m", "prompt": "x", "max_tokens": 50, "stream": True,
                      "stream_options": {"include_usage": True}, "temperature": 0.3})  # fmt: skip
    assert b["max_tokens"] == 1 and b["stream"] is False and "stream_options" not in b
    assert b["kv_transfer_params"]["do_remote_decode"] is True and b["temperature"] == 0.3


async def test_pd_streams_through_prefill_then_decode() -> None:
    async with kv_pod(role="prefill") as p, kv_pod(role="decode") as d:
        async with router([spec(p), spec(d)]) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
            try:
                stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stream=True,
                                                         stream_options={"include_usage": True})  # fmt: skip
                text, usage = "", None
                async for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].text
                    if chunk.usage:
                        usage = chunk.usage
                assert usage is not None and usage.completion_tokens == 12 and text
                # non-streaming chat works too
                r = await client.chat.completions.create(model=MODEL, max_tokens=5,
                                                         messages=[{"role": "user", "content": PROMPT}])  # fmt: skip
                assert r.usage.completion_tokens == 5
            finally:
                await client.close()
        assert p.sim is not None and d.sim is not None
        ps, ds = p.sim.engine.stats(), d.sim.engine.stats()
        # each request: one prefill-only request on the prefill pod, the generation on the decode pod
        assert p.sim.engine.prompt_tokens_total > 0 and p.sim.engine.generation_tokens_total == 2
        assert d.sim.engine.generation_tokens_total == 12 + 5
        for _ in range(100):  # the decode pod pulled the KV and told the prefill pod to free the held blocks
            if not p.sim.engine.held:
                break
            await asyncio.sleep(0.02)
        assert not p.sim.engine.held, ps
        assert ds["running"] == 0


async def test_prefill_retries_on_another_pod_and_falls_back_to_decode_pods() -> None:
    dead = f"http://127.0.0.1:{free_port()},role=prefill,model={MODEL}"
    async with kv_pod(role="prefill") as p, kv_pod(role="decode") as d, \
            router([dead, spec(p), spec(d)]) as url:  # fmt: skip
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
            try:
                r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
                assert r.usage.completion_tokens == 4
                assert p.sim is not None and p.sim.engine.generation_tokens_total == 1  # second prefill pod used
            finally:
                await client.close()
    # every prefill pod down: the decode pod serves alone
    async with kv_pod(role="decode") as d2, router([dead, spec(d2)]) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        try:
            r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
            assert r.usage.completion_tokens == 4
            assert d2.sim is not None and d2.sim.engine.generation_tokens_total == 4
        finally:
            await client.close()


async def test_prefill_pod_choice_is_prefix_aware() -> None:
    """Two prefill pods: a repeated prompt goes back to the pod whose cache holds it (KV events)."""
    async with kv_pod(role="prefill") as p1, kv_pod(role="prefill") as p2, \
            kv_pod(role="decode") as d, \
            router([spec(p1), spec(p2), spec(d)], policy="kv-events") as url:  # fmt: skip
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
            try:
                await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
                await asyncio.sleep(0.3)  # events reach the index
                first = [p.sim.engine.prompt_tokens_total for p in (p1, p2)]
                for _ in range(4):
                    await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
                    await asyncio.sleep(0.1)
                after = [p.sim.engine.prompt_tokens_total for p in (p1, p2)]
                used = [i for i in range(2) if first[i] > 0]
                assert len(used) == 1
                other = 1 - used[0]
                assert after[other] == 0  # never sent to the pod without the prefix
            finally:
                await client.close()

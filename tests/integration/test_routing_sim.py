"""The advanced policies inside the real router app (in process, real sockets) over simulator pods with KV events:
the OpenAI SDK as client, the router's ``x-kvscale-backend`` response header to see where a request went."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from harness.procs import free_port
from harness.simpods import Pod, sim_pod
from kvscale.latency import LatencyModel, StepCoefficients
from router.app import STATE_KEY, create_app
from router.backends import parse_backend_spec
from router.config import RouterConfig

MODEL = "sim-model"
LAT = LatencyModel(name="r", coefficients=StepCoefficients(1e-3, 1e-5, 0.0, 1e-5, 0.0))


def kv_pod(**kw):
    """An in-process simulator pod publishing KV events (ZMQ PUB + replay)."""
    return sim_pod(LAT, kv_events=True, **kw)


def spec(pod: Pod, **labels: str) -> str:
    extra = "".join(f",{k}={v}" for k, v in labels.items())
    return f"{pod.url},model={MODEL},kv-events={pod.kv_endpoint},kv-replay={pod.replay_endpoint}{extra}"


@contextlib.asynccontextmanager
async def router(backends: list[str], policy: str) -> AsyncIterator[str]:
    port = free_port()
    cfg = RouterConfig(port=port, backends=[parse_backend_spec(b) for b in backends], policy=policy,
                       governance_log=None)  # fmt: skip
    runner = web.AppRunner(create_app(cfg), handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def complete(http: aiohttp.ClientSession, url: str, prompt: str, headers: dict[str, str] | None = None,
                   policy: str | None = None) -> tuple[str, int]:  # fmt: skip
    h = dict(headers or {})
    if policy:
        h["x-kvscale-policy"] = policy
    async with http.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2},
                         headers=h) as r:  # fmt: skip
        assert r.status == 200, await r.text()
        body = await r.json()
        return r.headers["x-kvscale-backend"], body["usage"]["prompt_tokens_details"]["cached_tokens"]


def tenant(i: int) -> str:
    return " ".join(f"tenant{i}word{k}" for k in range(160))


async def test_kv_events_policy_sends_each_prefix_back_to_its_pod() -> None:
    async with kv_pod() as a, kv_pod() as b, kv_pod() as c, \
            router([spec(a), spec(b), spec(c)], "kv-events") as url, aiohttp.ClientSession() as http:  # fmt: skip
        await complete(http, url, "warm up")
        await asyncio.sleep(0.3)
        homes = {}
        for i in range(3):
            homes[i], cached = await complete(http, url, tenant(i) + " first question")
            assert cached == 0
        await asyncio.sleep(0.3)  # BlockStored events reach the index
        for i in range(3):
            for q in range(3):
                backend, cached = await complete(http, url, tenant(i) + f" question {q}")
                assert backend == homes[i]
                assert cached >= 160 // 16 * 16 - 16  # the whole shared prefix came from the cache


async def test_session_affinity_and_length_buckets_through_the_router() -> None:
    async with kv_pod() as a, kv_pod() as b, kv_pod() as long_pod, \
            router([spec(a), spec(b), spec(long_pod, group="long")], "session-affinity") as url, \
            aiohttp.ClientSession() as http:  # fmt: skip
        seen = {await complete(http, url, f"turn {t}", {"x-session-id": "abc"}) for t in range(5)}
        assert len({backend for backend, _ in seen}) == 1
        long_prompt = " ".join(f"w{i}" for i in range(1500))
        backend, _ = await complete(http, url, long_prompt, policy="length-buckets")
        assert backend == long_pod.url
        for i in range(4):
            backend, _ = await complete(http, url, f"short {i}", policy="length-buckets")
            assert backend != long_pod.url


async def test_best_preset_subscribes_at_startup_and_follows_blocks_cached_before_any_routed_request() -> None:
    """The registered ``best`` preset connects its KV-event subscribers when the router starts: blocks a pod cached
    from traffic that never went through the router steer the router's very first request there."""
    async with kv_pod() as a, kv_pod() as b, kv_pod() as c, aiohttp.ClientSession() as http:
        port = free_port()
        cfg = RouterConfig(port=port, backends=[parse_backend_spec(spec(p)) for p in (a, b, c)], policy="best",
                           governance_log=None)  # fmt: skip
        app = create_app(cfg)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            mgr = app[STATE_KEY].services.extras["kvevents"]
            for _ in range(200):  # subscribers come up in the background, without any request
                if len(mgr.subscribers) == 3 and all(s.connected.is_set() for s in mgr.subscribers.values()):
                    break
                await asyncio.sleep(0.05)
            assert sorted(mgr.subscribers) == sorted(p.url for p in (a, b, c))
            await asyncio.sleep(0.3)  # ZMQ slow joiner
            # straight to the third pod, bypassing the router
            async with http.post(c.url + "/v1/completions",
                                 json={"model": MODEL, "prompt": tenant(7) + " first", "max_tokens": 1}) as r:
                assert r.status == 200
            await asyncio.sleep(0.3)  # BlockStored reaches the index
            backend, cached = await complete(http, f"http://127.0.0.1:{port}", tenant(7) + " a new question")
            assert backend == c.url
            assert cached >= 160 // 16 * 16 - 16
        finally:
            await runner.cleanup()

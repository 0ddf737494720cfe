"""Chaos, bounded (~25 s): three simulator pods (processes) behind the router under mixed streaming load; one pod
is SIGKILLed, another SIGSTOPped, and a poison request stream runs alongside.

Asserted: no request that had not started streaming is lost (every non-streamed request succeeds, every stream
either completes or ends with an SSE error event after its first byte); no healthy backend is ejected for the
poison's fault; poison requests are refused without reaching 200.

The one stand-in is :func:`front`, a minimal streaming pass-through in front of each real pod that answers 500 to
prompts with a marker (no real engine fails on demand).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from routers_for_tests import serve_app, serve_router

from harness.simpods import SIM_MODEL, sim_pod_process, step_model

POISON = "POISON-PILL"


@contextlib.asynccontextmanager
async def front(pod_url: str) -> AsyncIterator[str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as fwd:

        async def handle(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            if POISON.encode() in raw:
                return web.json_response({"error": {"message": "engine crashed", "type": "InternalServerError",
                                                    "code": 500}}, status=500)  # fmt: skip
            async with fwd.request(request.method, pod_url + request.path, data=raw or None,
                                   headers={"Content-Type": "application/json"}) as up:  # fmt: skip
                resp = web.StreamResponse(status=up.status,
                                          headers={"Content-Type": up.headers.get("Content-Type", "text/plain")})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        async with serve_app(app, handler_cancellation=True) as url:
            yield url


@pytest.mark.timeout(120)
async def test_kill_stop_and_poison_under_streaming_load(tmp_path: Path) -> None:
    pods = [sim_pod_process(step_model(0.02), log_path=tmp_path / f"pod{i}.log") for i in range(3)]
    for p in pods:
        await asyncio.to_thread(p.start)
    killed, stopped, healthy = pods
    try:
        async with front(killed.url) as f0, front(stopped.url) as f1, front(healthy.url) as f2, \
                serve_router([f0, f1, f2], health_interval_s=0.3, health_timeout_s=0.3,
                             health_failure_threshold=2) as r, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:  # fmt: skip

            async def normal(i: int, stream: bool) -> tuple[str, int, bytes]:
                body = {"model": SIM_MODEL, "prompt": f"request {i}", "max_tokens": 30, "stream": stream}
                async with http.post(r.url + "/v1/completions", json=body) as resp:
                    return ("stream" if stream else "plain"), resp.status, await resp.read()

            async def poison(i: int) -> tuple[str, int, bytes]:
                body = {"model": SIM_MODEL, "prompt": f"{POISON} {i}", "max_tokens": 5}
                async with http.post(r.url + "/v1/completions", json=body) as resp:
                    return "poison", resp.status, await resp.read()

            tasks: list[asyncio.Task] = []
            t0 = time.monotonic()
            i = 0
            events = {5.0: "kill", 10.0: "stop"}
            while (now := time.monotonic() - t0) < 16.0:
                for at, what in list(events.items()):
                    if now >= at:
                        del events[at]
                        if what == "kill":
                            killed.process.popen.kill()
                        else:
                            os.kill(stopped.process.pid, signal.SIGSTOP)
                tasks.append(asyncio.create_task(normal(i, stream=i % 2 == 0)))
                if i % 2:
                    tasks.append(asyncio.create_task(poison(i)))
                i += 1
                await asyncio.sleep(1 / 15)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)  # nothing hangs, nothing raises
            healthy_backend = r.state.pool.get(f2)
            assert healthy_backend.ejections == 0 and healthy_backend.healthy, healthy_backend
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped.process.pid, signal.SIGCONT)
        for p in pods:
            await p.stop()

    by_kind = Counter((kind, status) for kind, status, _ in results)
    assert by_kind[("plain", 200)] == sum(1 for k, _, _ in results if k == "plain"), by_kind  # none lost
    assert not [1 for k, s, _ in results if k == "poison" and s == 200]
    assert {s for k, s, _ in results if k == "poison"} <= {502, 503}, by_kind
    completed = errored = 0
    for kind, status, body in results:
        if kind != "stream":
            continue
        assert status == 200, (status, body[:200])  # a stream that had not started was retried elsewhere
        events_ = [e for e in body.decode().split("\n\n") if e]
        assert events_[-1] == "data: [DONE]", events_[-3:]
        if '"error"' in events_[-2]:
            assert json.loads(events_[-2][6:])["error"]["code"] == 502
            errored += 1
        else:
            completed += 1
    print(f"\nchaos: {dict(by_kind)}; streams completed {completed}, ended with an SSE error {errored}")
    assert completed > 80 and errored <= 10, (completed, errored)

"""What a hostile client or a broken pod does to the router (issue "Hardening", router items 1-6), against real
simulator pods (in process and as processes) and the real router app on real sockets.

Only one stand-in: :func:`poison_front`, a minimal aiohttp app in front of a real simulator pod that answers 500
to prompts carrying a marker (no real engine fails on demand; the simulator no longer crashes on the lone
surrogate that did in the probe) and forwards everything else to the pod unchanged.
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from routers_for_tests import router_in_thread, serve_app, serve_router

from harness.simpods import SIM_MODEL, sim_pod, sim_pod_process, step_model

POISON = "POISON-PILL"


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip


@contextlib.asynccontextmanager
async def poison_front(pod_url: str, *, blame_request: bool = False) -> AsyncIterator[str]:
    """A pod that answers HTTP 500 to any prompt containing :data:`POISON` (with a request-error body when
    ``blame_request``, as an engine that says "your request" in a 5xx), else forwards to the real pod."""
    async with aiohttp.ClientSession() as fwd:

        async def handle(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            if POISON.encode() in raw:
                err = ({"message": "bad prompt", "type": "BadRequestError", "code": 400} if blame_request
                       else {"message": "engine crashed", "type": "InternalServerError", "code": 500})  # fmt: skip
                return web.json_response({"error": err}, status=500)
            async with fwd.request(request.method, pod_url + request.path, data=raw or None,
                                   headers={"Content-Type": "application/json"}) as up:  # fmt: skip
                return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        async with serve_app(app) as url:
            yield url


async def test_poison_requests_do_not_eject_healthy_backends() -> None:
    """30 requests/s that make every engine answer 500, beside normal traffic, on 3 backends: the failure follows
    the request (500 on two backends), so it is not retried further and no backend is charged; every normal request
    is served; a 5xx body blaming the request is passed through after one attempt."""
    async with sim_pod() as a, sim_pod() as b, sim_pod() as c, poison_front(a.url) as fa, poison_front(b.url) as fb, \
            poison_front(c.url) as fc, serve_router([fa, fb, fc], policy="round-robin") as r, \
            aiohttp.ClientSession() as http:  # fmt: skip

        async def send(prompt: str) -> tuple[int, str]:
            body = {"model": SIM_MODEL, "prompt": prompt, "max_tokens": 2}
            async with http.post(r.url + "/v1/completions", json=body) as resp:
                return resp.status, await resp.text()

        normal: list[asyncio.Task] = []
        poison: list[asyncio.Task] = []
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < 4.0:
            poison.append(asyncio.create_task(send(f"{POISON} {i}")))
            if i % 3 == 0:
                normal.append(asyncio.create_task(send(f"hello {i}")))
            i += 1
            await asyncio.sleep(1 / 30)
        normal_res = await asyncio.gather(*normal)
        poison_res = await asyncio.gather(*poison)
        assert Counter(s for s, _ in normal_res) == {200: len(normal)}
        assert {s for s, _ in poison_res} == {502}
        assert "follows the request" in json.loads(poison_res[0][1])["error"]["message"]
        now = r.state.clock()
        assert all(be.ejected_until <= now and be.ejections == 0 for be in r.state.pool), list(r.state.pool)
        async with http.get(r.url + "/metrics") as m:
            text = await m.text()
        assert metric(text, "kvscale_router_failures_total", reason="5xx") == 2 * len(poison)  # two tries each
        assert metric(text, "kvscale_router_ejections_total") == 0

    async with sim_pod() as a, poison_front(a.url, blame_request=True) as fa, sim_pod() as b, \
            poison_front(b.url, blame_request=True) as fb, serve_router([fa, fb]) as r, \
            aiohttp.ClientSession() as http:  # fmt: skip
        async with http.post(r.url + "/v1/completions", json={"model": SIM_MODEL, "prompt": POISON}) as resp:
            assert resp.status == 500 and (await resp.json())["error"]["type"] == "BadRequestError"
        async with http.get(r.url + "/metrics") as m:
            text = await m.text()
        assert metric(text, "kvscale_router_failures_total", reason="client_fault") == 1  # one attempt only


async def test_a_backend_failing_alone_is_still_ejected() -> None:
    """The ledger keeps passive ejection for the backend's own faults: one backend answers 500 to everything, the
    others serve the same requests; it is charged (the request succeeded elsewhere) and ejected."""
    async with sim_pod() as a, sim_pod() as b, sim_pod() as c, \
            serve_router([a.url, b.url, c.url], policy="round-robin") as r, \
            aiohttp.ClientSession() as http:  # fmt: skip

        async def broken(request: web.Request) -> web.Response:
            return web.json_response({"error": {"message": "boom", "type": "InternalServerError", "code": 500}},
                                     status=500)  # fmt: skip

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", broken)
        await a.stop()  # the pod's port now answers 500 to everything (its health check too is served by it)
        async with serve_app(app, port=a.port):
            for i in range(12):
                body = {"model": SIM_MODEL, "prompt": f"p{i}", "max_tokens": 1}
                async with http.post(r.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
            assert r.state.pool.get(a.url).ejections >= 1


async def test_ejection_never_takes_more_than_max_percent(tmp_path: Path) -> None:
    """Two of three pods die: connection errors are the backends' own, but at most one backend is ejected at once
    (max_ejection_percent 10, at least one may be); requests are still served by the live pod."""
    pods = [sim_pod_process(step_model(1e-3), log_path=tmp_path / f"p{i}.log") for i in range(3)]
    try:
        for p in pods:
            await asyncio.to_thread(p.start)
        async with serve_router([p.url for p in pods], policy="round-robin", health_interval_s=60) as r, \
                aiohttp.ClientSession() as http:  # fmt: skip
            for p in pods[:2]:
                p.process.popen.kill()
            statuses = []
            for i in range(30):
                body = {"model": SIM_MODEL, "prompt": f"x{i}", "max_tokens": 1}
                async with http.post(r.url + "/v1/completions", json=body) as resp:
                    statuses.append(resp.status)
                now = r.state.clock()
                assert sum(1 for b in r.state.pool if b.ejected_until > now) <= 1
            assert Counter(statuses) == {200: 30}
    finally:
        for p in pods:
            await p.stop()


async def test_failure_mid_stream_is_recorded_as_a_failure(tmp_path: Path) -> None:
    gov = tmp_path / "gov.jsonl"
    pod = sim_pod_process(step_model(0.02), log_path=tmp_path / "sim.log")
    with pod.process:
        await asyncio.to_thread(pod.process.wait_http_ready, pod.url + "/health", 60)
        async with serve_router([pod.url], governance_log=str(gov)) as r, aiohttp.ClientSession() as http:
            body = {"model": SIM_MODEL, "prompt": "a long story", "max_tokens": 500, "stream": True}
            async with http.post(r.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                await resp.content.readany()
                pod.process.popen.kill()
                rest = await resp.read()
            assert b'"code": 502' in rest and rest.endswith(b"data: [DONE]\n\n")
            async with http.get(r.url + "/metrics") as m:
                text = await m.text()
    assert metric(text, "kvscale_router_requests_total", status="502") == 1
    assert metric(text, "kvscale_router_requests_total", status="200") == 0
    assert metric(text, "kvscale_router_failures_total", reason="stream") == 1
    entry = json.loads(gov.read_text().splitlines()[-1])
    assert entry["status"] == 502 and entry["error"] == "stream"


@pytest.mark.timeout(60)
async def test_a_hung_pod_releases_its_requests(tmp_path: Path) -> None:
    """SIGSTOP one of two pods while it holds a streamed and a non-streamed request: once its health checks fail
    (about 0.6 s here) the non-started request is retried on the other pod and the started stream ends with an SSE
    error event, instead of both hanging for --read-timeout-s (300 s)."""
    pods = [sim_pod_process(step_model(0.05), log_path=tmp_path / f"p{i}.log") for i in range(2)]
    try:
        for p in pods:
            await asyncio.to_thread(p.start)
        hung = pods[0]
        async with serve_router([p.url for p in pods], policy="round-robin", health_interval_s=0.2,
                                health_timeout_s=0.2, health_failure_threshold=2) as r, \
                aiohttp.ClientSession() as http:  # fmt: skip
            t0 = time.monotonic()
            stream_body = {"model": SIM_MODEL, "prompt": "s", "max_tokens": 400, "stream": True}
            resp = await http.post(r.url + "/v1/completions", json=stream_body)  # round-robin: first pod
            first = await resp.content.readany()
            assert resp.headers["x-kvscale-backend"] == hung.url and first.startswith(b"data: {")
            # a non-streamed request that will wait on the hung pod (round-robin sends every other one there)
            plain = [asyncio.create_task(http.post(r.url + "/v1/completions",
                                                   json={"model": SIM_MODEL, "prompt": f"p{i}", "max_tokens": 20}))
                     for i in range(2)]  # fmt: skip
            await asyncio.sleep(0.1)
            os.kill(hung.process.pid, signal.SIGSTOP)
            try:
                rest = await asyncio.wait_for(resp.read(), 10)
                done = await asyncio.wait_for(asyncio.gather(*plain), 10)
                elapsed = time.monotonic() - t0
            finally:
                os.kill(hung.process.pid, signal.SIGCONT)
            assert b'"code": 502' in rest and rest.endswith(b"data: [DONE]\n\n")
            assert [d.status for d in done] == [200, 200]
            assert {d.headers["x-kvscale-backend"] for d in done} == {pods[1].url}
            assert elapsed < 8
    finally:
        for p in pods:
            await p.stop()


async def test_stream_idle_timeout_ends_a_silent_stream(tmp_path: Path) -> None:
    pod = sim_pod_process(step_model(0.05), log_path=tmp_path / "sim.log")
    try:
        await asyncio.to_thread(pod.start)
        async with serve_router([pod.url], health_interval_s=60, stream_idle_timeout_s=0.5) as r, \
                aiohttp.ClientSession() as http:  # fmt: skip
            body = {"model": SIM_MODEL, "prompt": "s", "max_tokens": 400, "stream": True}
            async with http.post(r.url + "/v1/completions", json=body) as resp:
                await resp.content.readany()
                os.kill(pod.process.pid, signal.SIGSTOP)
                t0 = time.monotonic()
                try:
                    rest = await asyncio.wait_for(resp.read(), 10)
                finally:
                    os.kill(pod.process.pid, signal.SIGCONT)
            assert time.monotonic() - t0 < 3
            assert b"silent for 0.5s" in rest and rest.endswith(b"data: [DONE]\n\n")
    finally:
        await pod.stop()


async def _raw(url: str, data: bytes, wait: float = 3.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), wait)
    finally:
        writer.close()


def _json_body(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"application/json" in head, head
    return json.loads(body)


async def test_malformed_input_gets_openai_shaped_4xx() -> None:
    async with sim_pod() as p, serve_router([p.url], api_keys=frozenset({"k1"}), header_timeout_s=1.0) as r, \
            aiohttp.ClientSession() as http:  # fmt: skip
        ok = {"Authorization": "bearer k1"}  # the scheme is case-insensitive (RFC 7235)
        cases = [b"[" * 1000 + b"]" * 1000,  # nested deeper than Python's recursion limit
                 json.dumps({"model": SIM_MODEL, "prompt": "x", "x": json.loads("[" * 70 + "]" * 70)}).encode(),
                 b'{"model": "sim-model", "prompt": "x", "temperature": NaN}',
                 b'{"model": "sim-model", "prompt": "x", "top_p": -Infinity}']  # fmt: skip
        for data in cases:
            async with http.post(r.url + "/v1/completions", data=data, headers=ok) as resp:
                body = await resp.json()
                assert resp.status == 400 and body["error"]["code"] == 400, (data[:60], body)
        async with http.post(r.url + "/v1/completions", json={"model": SIM_MODEL, "prompt": "x", "max_tokens": 1},
                             headers={"Authorization": "BEARER k1"}) as resp:  # fmt: skip
            assert resp.status == 200
        for bad in ({"Authorization": "Bearer wrong"}, {}):
            async with http.post(r.url + "/v1/completions", json={"model": SIM_MODEL}, headers=bad) as resp:
                assert resp.status == 401
        async with http.get(r.url + "/metrics") as m:
            text = await m.text()
        assert metric(text, "kvscale_router_auth_failures_total") == 2
        assert metric(text, "kvscale_router_requests_total", status="401") == 2
        # aiohttp's own 400s: a header line over 8190 bytes, an invalid header byte, too many headers
        for raw in (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\nX\x01A: b\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200))
                    + b"\r\n"):
            answer = await _raw(r.url, raw)
            assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0], answer[:100]
            assert _json_body(answer)["error"]["code"] == 400
        # slowloris: a request head trickling in is cut at --header-timeout-s with a JSON 408
        t0 = time.monotonic()
        answer = await _raw(r.url, b"GET /heal", wait=5)
        assert b" 408 " in answer.split(b"\r\n", 1)[0] and _json_body(answer)["error"]["code"] == 408
        assert time.monotonic() - t0 < 3
        # a normal keep-alive client is not affected: two requests on one connection, seconds apart
        async with aiohttp.ClientSession() as one:
            for _ in range(2):
                async with one.get(r.url + "/health") as resp:
                    assert resp.status == 200
                await asyncio.sleep(1.2)


async def test_governance_log_is_strict_json(tmp_path: Path) -> None:
    gov = tmp_path / "gov.jsonl"
    async with sim_pod() as p, serve_router([p.url], governance_log=str(gov), api_keys=frozenset({"k"})) as r, \
            aiohttp.ClientSession() as http:  # fmt: skip
        key, wrong = {"Authorization": "Bearer k"}, {"Authorization": "Bearer no"}
        for data, headers in ((b'{"model": "sim-model", "prompt": "x", "temperature": NaN}', key),
                              (b'{"model": "sim-model", "prompt": "x", "max_tokens": 1}', key), (b"{}", wrong)):
            async with http.post(r.url + "/v1/completions", data=data, headers=headers) as resp:
                await resp.read()
    lines = gov.read_text().splitlines()
    entries = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert [e["status"] for e in entries] == [400, 200, 401]


@pytest.fixture(scope="module")
def router_url():
    """One simulator pod and one router for every fuzz example, on a background loop thread."""

    @contextlib.asynccontextmanager
    async def start():
        async with sim_pod() as p, serve_router([p.url], api_keys=frozenset({"k"})) as r:
            yield r

    with router_in_thread(start) as url:
        yield url


_header_name = st.one_of(st.binary(min_size=1, max_size=40), st.sampled_from(
    [b"Authorization", b"Content-Length", b"Transfer-Encoding", b"Content-Type", b"Host", b"X-Request-Id", b"Expect"]))
_header_value = st.one_of(st.binary(max_size=200), st.sampled_from(
    [b"Bearer k", b"bearer k", b"chunked", b"-1", b"99999999999", b"application/json", b"100-continue", b"a" * 9000]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.lists(st.tuples(_header_name, _header_value), max_size=6))
def test_fuzzed_raw_headers_get_no_5xx(router_url: str, headers: list[tuple[bytes, bytes]]) -> None:
    """Arbitrary header bytes around a valid request: the router answers 2xx/4xx in OpenAI's shape, or closes the
    connection; never a 5xx, never a hang."""
    body = b'{"model": "sim-model", "prompt": "x", "max_tokens": 1}'
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    if not any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in headers):
        head += b"Content-Length: %d\r\n" % len(body)
    raw = head + b"Connection: close\r\n\r\n" + body
    answer = asyncio.run(_raw(router_url, raw, wait=15))
    if not answer:
        return  # the connection was closed: acceptable for bytes that are not HTTP
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, answer[:300]
    if status >= 400:
        assert _json_body(answer)["error"]["code"] == status, answer[:300]

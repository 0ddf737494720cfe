"""HTTP driver: an aiohttp server that speaks vLLM's OpenAI-compatible API over the engine core in real time.

The engine loop runs as one asyncio task (:class:`EngineRunner`): it schedules a step at ``now``, sleeps until the
step's modelled end, then hands the step's tokens to the waiting handlers (streaming them as SSE chunks written
straight to the socket). So tokens leave the server when the engine model says they exist. ``lateness`` (actual
delivery minus modelled step end) is tracked and exposed at ``/kvscale/stats`` so benchmarks can check the
driver keeps up. Besides the API the server answers ``/metrics`` (vLLM's or SGLang's series), ``/health``,
``/version``, and publishes KV events over ZMQ when configured.

What the requests and answers look like is :mod:`simulator.openai_api` (parsing, validation, error shapes,
response bodies and chunk templates); P/D (``kv_transfer_params``, the KV release side channel) is
:mod:`simulator.pd`. This module keeps the real-time parts: the app, the engine loop, pacing and the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from kvscale.histogram import LogHistogram
from kvscale.latency import LatencyModel
from kvscale.tokenizer import Tokenizer
from simulator import pd
from simulator.engine import EngineConfig, EngineCore, StepOutput
from simulator.kv_publisher import KVEventsConfig, ZmqKVEventPublisher
from simulator.metrics import EngineMetrics, MetricsInfo
from simulator.openai_api import (
    FINGERPRINT,
    ApiError,
    OpenAIApi,
    ParsedRequest,
    StreamChunks,
    engine_request,
    read_body,
)
from simulator.pd import ROLES
from simulator.request import Request

__all__ = ["FINGERPRINT", "ROLES", "ApiError", "EngineRunner", "ServeConfig", "SimServer"]

log = logging.getLogger("kvscale.sim")


@dataclass
class ServeConfig:
    model: str = "sim-model"
    served_model_names: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int = 8192
    role: str = "both"
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> path
    max_loras: int = 1
    metrics_flavor: str = "vllm"
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    default_max_tokens: int = 16  # vLLM's completions default

    @property
    def model_names(self) -> list[str]:
        return self.served_model_names or [self.model]


class _Stream:
    """One request's link to its handler. The engine loop calls ``sink`` (streaming: writes SSE chunks straight to
    the socket, no per-token task wake-up) and resolves ``done`` when the request finishes."""

    __slots__ = ("disconnected", "done", "finished", "req", "sink")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished = False
        self.disconnected = False
        self.sink: Callable[[int, bool, float], None] | None = None  # (new tokens, last, modelled time)


class EngineRunner:
    """Owns the engine core and its loop; the only place engine state changes in the HTTP driver."""

    def __init__(
        self,
        engine: EngineCore,
        metrics: EngineMetrics,
        publisher: ZmqKVEventPublisher | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.publisher = publisher
        self.clock = clock
        self.lateness = LogHistogram(lo=1e-6, hi=100.0)
        self.steps = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._remote_pulls: dict[str, Request] = {}
        self.on_kv_pulled: Callable[[Request], None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, req: Request, stream: _Stream, arrived: float | None = None) -> None:
        """Hand ``req`` to the engine now; ``arrived`` is when the server received it (TTFT counts from there)."""
        req.user = stream
        self.engine.add_request(req, self.clock(), arrival_time=arrived)
        if req.remote_prefill is not None:
            self._remote_pulls[req.request_id] = req
        self._wake.set()

    def abort(self, req: Request) -> None:
        if self.engine.abort_request(req.request_id, self.clock()) is not None:
            self._remote_pulls.pop(req.request_id, None)
            self.metrics.observe_finished(req)
            self._wake.set()

    async def _idle(self, timeout: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _run(self) -> None:
        engine = self.engine
        while True:
            if not engine.has_work() and not engine.held:
                await self._idle(None)
                continue
            now = self.clock()
            out = engine.step(now)
            if self.publisher is not None:
                self.publisher.publish(engine.kv.drain_events())
            if out is None or not out.outputs:
                wake = engine.next_wakeup()
                await self._idle(None if wake is None else max(wake - now, 0.0005))
                continue
            delay = out.end - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            self._deliver(out)

    def record_lateness(self, scheduled: float) -> None:
        """A token reached the client's socket; how late versus the engine model's schedule."""
        self.lateness.add(max(self.clock() - scheduled, 0.0))

    def _deliver(self, out: StepOutput) -> None:
        self.steps += 1
        itl = out.end - out.start
        end = out.end
        for req, n in out.outputs:
            if n:
                if req.num_output_tokens > n:
                    self.metrics.observe_itl(itl)
                elif req.first_token_time >= 0:
                    self.metrics.observe_first_token(req)
                sink = req.user.sink
                if sink is not None:
                    sink(n, req.status.finished, end)
        for req in out.finished:
            stream = req.user
            stream.finished = True
            if not stream.done.done():
                stream.done.set_result(None)
            self.metrics.observe_finished(req)
        if self._remote_pulls:
            for rid, req in list(self._remote_pulls.items()):
                if 0 <= req.kv_ready_time <= out.end:
                    del self._remote_pulls[rid]
                    if self.on_kv_pulled is not None:
                        self.on_kv_pulled(req)


def _prompt_hash(tokens: list[int]) -> str:
    return hashlib.sha256(json.dumps(tokens[:4096]).encode()).hexdigest()[:16]


class SimServer:
    def __init__(
        self,
        config: ServeConfig,
        engine_config: EngineConfig,
        latency: LatencyModel,
        tokenizer: Tokenizer,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.role not in ROLES:
            raise ValueError(f"--role must be one of {ROLES}, got {config.role!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.engine = EngineCore(engine_config, latency, record_events=config.kv_events.active)
        self.api = OpenAIApi(
            tokenizer,
            model=config.model,
            model_names=config.model_names,
            lora_modules=config.lora_modules,
            max_model_len=config.max_model_len,
            default_max_tokens=config.default_max_tokens,
            kv_capacity_tokens=engine_config.num_gpu_blocks * engine_config.block_size,
        )
        self.hardware = f"simulated ({latency.name}{': ' + latency.hardware if latency.hardware else ''})"
        self.metrics = EngineMetrics(
            self.engine,
            MetricsInfo(
                model_name=config.model_names[0],
                block_size=engine_config.block_size,
                num_gpu_blocks=engine_config.num_gpu_blocks,
                enable_prefix_caching=engine_config.enable_prefix_caching,
                max_loras=config.max_loras if config.lora_modules else 0,
            ),
            flavor=config.metrics_flavor,
            max_model_len=config.max_model_len,
        )
        self.publisher: ZmqKVEventPublisher | None = None
        self.runner: EngineRunner | None = None
        self._clock = clock
        self._releases = pd.ReleaseNotifier()
        self.created = int(time.time())

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/kvscale/stats", self.stats)
        app.router.add_post("/kvscale/kv/release", self.kv_release)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        gc.freeze()  # long-lived objects out of the collector's way: fewer pauses on the streaming path
        if self.config.kv_events.active:
            self.publisher = ZmqKVEventPublisher(self.config.kv_events)
            self.publisher.start()
        self.runner = EngineRunner(self.engine, self.metrics, self.publisher, self._clock)
        self.runner.on_kv_pulled = self._releases.kv_pulled
        self.runner.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        if self.runner is not None:
            await self.runner.stop()
        if self.publisher is not None:
            await self.publisher.close()
        await self._releases.close()

    # -- small endpoints -----------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.32.0", "engine": "kvscale-sim", "hardware": self.hardware})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(self.api.models(self.created))

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def stats(self, request: web.Request) -> web.Response:
        r = self.runner
        lat = r.lateness if r else None
        return web.json_response(
            {
                **self.engine.stats(),
                "steps": r.steps if r else 0,
                "lateness_p50_s": lat.quantile(0.5) if lat and lat.total else None,
                "lateness_p99_s": lat.quantile(0.99) if lat and lat.total else None,
                "lateness_max_bucket_s": lat.quantile(1.0) if lat and lat.total else None,
                "kv_events_published": self.publisher.published if self.publisher else 0,
            }
        )

    async def kv_release(self, request: web.Request) -> web.Response:
        """P/D side channel: the decode pod pulled the KV of ``request_id``; free the held blocks."""
        try:
            body = await request.json()
            rid = body["request_id"]
        except (ValueError, RecursionError, KeyError, TypeError):  # ValueError: bad JSON, bad UTF-8, long ints
            return ApiError(400, "expected JSON {'request_id': ...}", "request_id").response()
        return web.json_response({"released": self.engine.release_held(str(rid))})

    # -- generation ----------------------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    def _make_request(self, p: ParsedRequest) -> Request:
        do_remote_decode, remote_prefill = pd.transfer_roles(p.kv_transfer_params, self.config.role)
        return engine_request(p, do_remote_decode=do_remote_decode, remote_prefill=remote_prefill)

    def _kv_transfer_params(self, req: Request) -> dict[str, Any] | None:
        return pd.prefill_response_params(req, self.config.engine_id, self.config.host, self.config.port)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            p = self.api.parse(await read_body(request), chat)
            req = self._make_request(p)
        except ApiError as e:
            return e.response()
        runner = self.runner
        assert runner is not None
        arrived = runner.clock()
        stream = _Stream(req)
        log.debug("request %s prompt_hash=%s tokens=%d", req.request_id, _prompt_hash(p.prompt_token_ids),
                  req.num_prompt_tokens)  # fmt: skip
        if p.lora_name:
            self.metrics.running_loras[p.lora_name] = self.metrics.running_loras.get(p.lora_name, 0) + 1
        try:
            if p.stream:
                return await self._stream(request, p, req, stream, arrived)
            runner.submit(req, stream, await self._api_overhead(arrived))
            await stream.done
            return self.api.completion(p, req, self._kv_transfer_params(req))
        finally:
            if not stream.finished:
                runner.abort(req)
            if p.lora_name:
                self.metrics.running_loras[p.lora_name] -= 1

    async def _api_overhead(self, received: float) -> float:
        """The latency model's per-request time outside the engine step (vLLM's API server: HTTP, input and output
        processing). It delays the request's admission to the engine, so it adds to TTFT without occupying the
        engine loop, which keeps stepping other requests meanwhile. Returns the request's ``arrival_time`` as vLLM
        sets it (after the client-side part), from which this server's TTFT histogram counts, as vLLM's does."""
        lat = self.engine.latency
        if lat.request_overhead_s > 0:
            await asyncio.sleep(lat.request_overhead_s)
        return received + lat.client_overhead_s

    async def _stream(
        self, request: web.Request, p: ParsedRequest, req: Request, stream: _Stream, arrived: float
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})  # fmt: skip
        await resp.prepare(request)
        runner = self.runner
        assert runner is not None
        chunks = StreamChunks(p, req)
        transport = request.transport
        chunked = resp.headers.get("Transfer-Encoding", "").lower() == "chunked"  # HTTP/1.1; not for HTTP/1.0
        sent = 0
        role_chunk, pre, post_running, post_last = chunks.role_chunk, chunks.pre, chunks.post_running, chunks.post_last
        write = transport.write if transport is not None else None
        text_of = self.api.text

        def sink(n: int, last: bool, scheduled: float) -> None:
            """Called by the engine loop: one SSE event, written as one HTTP/1.1 chunk straight to the socket."""
            nonlocal sent
            if write is None or transport.is_closing():
                stream.disconnected = True
                stream.sink = None
                if not stream.done.done():
                    stream.done.set_result(None)
                return
            new = req.output_token_ids[sent : sent + n]
            sent += n
            tail = post_last % json.dumps(req.finish_reason).encode() if last else post_running
            data = pre + json.dumps(text_of(new)).encode() + tail
            if sent == n and role_chunk:
                write(b"%x\r\n%b\r\n" % (len(role_chunk), role_chunk) if chunked else role_chunk)
            write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)  # framed as aiohttp would
            runner.record_lateness(scheduled)

        stream.sink = sink
        runner.submit(req, stream, await self._api_overhead(arrived))
        await stream.done
        if stream.disconnected:
            log.debug("client of %s went away", req.request_id)
            return resp
        try:
            if p.include_usage:
                await resp.write(chunks.usage_chunk(req))
            await resp.write(StreamChunks.DONE)
        except ConnectionResetError:
            log.debug("client of %s went away", req.request_id)
        return resp

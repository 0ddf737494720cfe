"""HTTP driver: an aiohttp server that speaks vLLM's OpenAI-compatible API over the engine core in real time.

The engine loop runs as one asyncio task: it schedules a step at ``now``, sleeps until the step's modelled end,
then hands the step's tokens to the waiting handlers (streaming them as SSE chunks). So tokens leave the server
when the engine model says they exist. ``lateness`` (actual delivery minus modelled step end) is tracked and
exposed at ``/kvscale/stats`` so benchmarks can check the driver keeps up.
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

import aiohttp
from aiohttp import web

from kvscale.histogram import LogHistogram
from kvscale.latency import LatencyModel
from kvscale.tokenizer import Tokenizer
from simulator.engine import EngineConfig, EngineCore, StepOutput
from simulator.kv_publisher import KVEventsConfig, ZmqKVEventPublisher
from simulator.metrics import EngineMetrics, MetricsInfo
from simulator.request import Request

log = logging.getLogger("kvscale.sim")
FINGERPRINT = "vllm-0.32.0-kvscale-sim"


def _dumps(obj: Any) -> str:
    """Compact JSON, as vLLM (FastAPI/pydantic) writes it."""
    return json.dumps(obj, separators=(",", ":"))

ROLES = ("both", "prefill", "decode")


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


class ApiError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "BadRequestError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or self.TYPES.get(status, "BadRequestError")

    @classmethod
    def validation(cls, field: str, message: str) -> ApiError:
        """A request-schema error, shaped like vLLM's (pydantic) validation errors."""
        return cls(400, f"1 validation error:\n  {message}", f"body.{field}" if field else "body", "Bad Request")

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }
        return web.json_response(body, status=self.status, dumps=_dumps)


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


# --------------------------------------------------------------------------------------------------------------
# request parsing


def _int_param(body: dict[str, Any], name: str, default: int | None, minimum: int) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError.validation(name, f"'{name}': Input should be a valid integer, got {type(v).__name__}")
    if v < minimum:
        raise ApiError(400, f"{name} must be at least {minimum}, got {v}.", name)
    return v


_TRUE = {"true", "yes", "y", "on", "1", "t"}
_FALSE = {"false", "no", "n", "off", "0", "f"}


def _bool_param(body: dict[str, Any], name: str) -> bool:
    """A boolean with pydantic's lax parsing, as vLLM accepts it ("yes", "true", 1, ...)."""
    v = body.get(name, False)
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in _TRUE | _FALSE:
        return v.lower() in _TRUE
    raise ApiError.validation(name, f"'{name}': Input should be a valid boolean")


def _prompt_hash(tokens: list[int]) -> str:
    return hashlib.sha256(json.dumps(tokens[:4096]).encode()).hexdigest()[:16]


@dataclass
class ParsedRequest:
    chat: bool
    model: str
    prompt_token_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    kv_transfer_params: dict[str, Any] | None
    lora_name: str | None


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
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()  # strong references until done (asyncio docs)
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
        self.runner.on_kv_pulled = self._notify_prefill_pod
        self.runner.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        if self.runner is not None:
            await self.runner.stop()
        if self.publisher is not None:
            await self.publisher.close()
        if self._session is not None:
            await self._session.close()

    # -- small endpoints -----------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.32.0", "engine": "kvscale-sim", "hardware": self.hardware})

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": self.config.model,
                "parent": None,
                "max_model_len": self.config.max_model_len,
                "permission": [],
            }
            for name in self.config.model_names
        ]
        data += [
            {
                "id": lora,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": path,
                "parent": self.config.model_names[0],
                "max_model_len": None,
                "permission": [],
            }
            for lora, path in self.config.lora_modules.items()
        ]
        return web.json_response({"object": "list", "data": data})

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

    def _notify_prefill_pod(self, req: Request) -> None:
        params = req.remote_prefill or {}
        host, port, rid = params.get("remote_host"), params.get("remote_port"), params.get("remote_request_id")
        if not (host and port and rid):
            return

        async def notify() -> None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            try:
                async with self._session.post(
                    f"http://{host}:{port}/kvscale/kv/release",
                    json={"request_id": rid},
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as resp:
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError) as e:  # the hold timeout frees the blocks anyway
                log.warning("KV release notification to %s:%s failed: %s", host, port, e)

        task = asyncio.get_running_loop().create_task(notify())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- parsing -------------------------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as e:
            raise ApiError(413, "request body too large") from e
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, over-long ints, nesting
            raise ApiError.validation("", f"JSON decode error: {e}") from e
        if not isinstance(body, dict):
            raise ApiError.validation("", "Input should be a valid dictionary or object")
        return body

    def _parse(self, body: dict[str, Any], chat: bool) -> ParsedRequest:
        model = body.get("model")
        if model is None:
            model = self.config.model_names[0]  # vLLM serves the default model when none is named
        if not isinstance(model, str):
            raise ApiError.validation("model", "'model': Input should be a valid string")
        lora = None
        if model not in self.config.model_names:
            if model in self.config.lora_modules:
                lora = model
            else:
                aliases = ", ".join([*self.config.model_names, *self.config.lora_modules])
                raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {aliases}.", "model")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "'messages' must be a non-empty list", "messages")
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise ApiError(400, "each message must be an object with a string 'role'", "messages")
                c = m.get("content")
                if c is not None and not isinstance(c, str | list):
                    raise ApiError(400, "message 'content' must be a string or a list of parts", "messages")
            try:
                tokens = self.tokenizer.encode_chat(messages)
            except Exception as e:  # a chat template may reject a conversation (e.g. roles out of order)
                raise ApiError(400, f"cannot apply the chat template: {e}", "messages") from e
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
                prompt = prompt[0]
            if isinstance(prompt, str):
                tokens = self.tokenizer.encode_prompt(prompt)
            elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                tokens = list(prompt)
                if any(t < 0 or t >= self.tokenizer.vocab_size for t in tokens):
                    raise ApiError(400, "token id in 'prompt' out of vocabulary range", "prompt")
            elif prompt is None:
                raise ApiError(400, "'prompt' is required", "prompt")
            else:
                raise ApiError(
                    400, "'prompt' must be a string, a list of token ids, or a one-element list of those", "prompt"
                )
        if not tokens:
            raise ApiError(400, "the prompt is empty", "prompt")
        n = _int_param(body, "n", 1, 1)
        if n != 1:
            raise ApiError(400, "the simulator supports n=1 only", "n")
        max_len = self.config.max_model_len
        if len(tokens) >= max_len:
            raise ApiError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, your prompt contains at least "
                f"{len(tokens)} input tokens, which exceeds this limit even without any output tokens. Please "
                f"reduce the length of the input prompt. (parameter=input_tokens, value={len(tokens)})",
                "input_tokens",
            )
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        default = max_len - len(tokens) if chat else self.config.default_max_tokens
        max_tokens = _int_param(body, key, default, 1)
        assert max_tokens is not None
        if max_tokens > max_len:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} cannot be greater than max_model_len={max_len}. Please request fewer "
                f"output tokens. (parameter=max_tokens, value={max_tokens})",
                "max_tokens",
            )
        max_tokens = min(max_tokens, max_len - len(tokens))  # vLLM caps the output at the context length
        capacity = self.engine.config.num_gpu_blocks * self.engine.config.block_size
        if len(tokens) + max_tokens > capacity:
            raise ApiError(400, f"prompt plus '{key}' ({len(tokens) + max_tokens} tokens) exceeds the KV cache "
                           f"capacity of {capacity} tokens", key)  # fmt: skip
        stream = _bool_param(body, "stream")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise ApiError.validation("stream_options", "'stream_options': Input should be a valid dictionary")
        include_usage = bool(opts and opts.get("include_usage"))
        ktp = body.get("kv_transfer_params")
        if ktp is not None and not isinstance(ktp, dict):
            raise ApiError.validation("kv_transfer_params", "'kv_transfer_params': Input should be a valid dictionary")
        for name in ("temperature", "top_p"):
            v = body.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise ApiError.validation(name, f"'{name}': Input should be a valid number")
        return ParsedRequest(chat, model, tokens, max_tokens, stream, include_usage, ktp, lora)

    # -- generation ----------------------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    def _make_request(self, p: ParsedRequest) -> Request:
        ktp = p.kv_transfer_params or {}
        do_remote_decode = bool(ktp.get("do_remote_decode"))
        remote_prefill = ktp if ktp.get("do_remote_prefill") else None
        if do_remote_decode and self.config.role == "decode":
            raise ApiError(400, "this pod has role 'decode' and cannot serve a prefill-only request")
        if remote_prefill and self.config.role == "prefill":
            raise ApiError(400, "this pod has role 'prefill' and cannot pull remote KV")
        prefix = "chatcmpl-" if p.chat else "cmpl-"
        return Request(
            request_id=prefix + uuid.uuid4().hex,
            prompt_token_ids=p.prompt_token_ids,
            max_tokens=1 if do_remote_decode else p.max_tokens,
            arrival_time=0.0,
            lora_name=p.lora_name,
            do_remote_decode=do_remote_decode,
            remote_prefill=remote_prefill,
            extra_key=p.lora_name.encode() if p.lora_name else b"",
        )

    def _kv_transfer_params(self, req: Request) -> dict[str, Any] | None:
        if not req.do_remote_decode:
            return None
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": list(req.block_ids),
            "remote_engine_id": self.config.engine_id,
            "remote_request_id": req.request_id,
            "remote_host": self.config.host,
            "remote_port": self.config.port,
            "tp_size": 1,
            "remote_num_tokens": req.num_prompt_tokens,
        }

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            p = self._parse(await self._body(request), chat)
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
            return self._complete(p, req)
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

    def _usage(self, req: Request) -> dict[str, Any]:
        return {
            "prompt_tokens": req.num_prompt_tokens,
            "total_tokens": req.num_prompt_tokens + req.num_output_tokens,
            "completion_tokens": req.num_output_tokens,
            "prompt_tokens_details": {"cached_tokens": max(req.num_cached_tokens, 0)},
        }

    def _text(self, ids: list[int]) -> str:
        return "".join(self.tokenizer.decode_token(t) for t in ids)

    def _complete(self, p: ParsedRequest, req: Request) -> web.Response:
        text = self._text(req.output_token_ids)
        usage = self._usage(req)
        usage["prompt_tokens_details"].update(created_cache_tokens=0 if p.chat else None, multimodal_tokens=None)
        usage["completion_tokens_details"] = None
        body: dict[str, Any] = {"id": req.request_id, "object": "chat.completion" if p.chat else "text_completion",
                                "created": int(time.time()), "model": p.model}  # fmt: skip
        if p.chat:
            message = {"role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                       "function_call": None, "reasoning": None}  # fmt: skip
            body["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": req.finish_reason,
                                "stop_reason": None, "token_ids": None, "routed_experts": None}]  # fmt: skip
        else:
            body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": req.finish_reason,
                                "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                                "prompt_token_ids": None, "routed_experts": None}]  # fmt: skip
        body.update(service_tier=None, system_fingerprint=FINGERPRINT, usage=usage)
        if p.chat:
            body.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        body.update(kv_transfer_params=self._kv_transfer_params(req), ec_transfer_params=None, metrics=None)
        return web.json_response(body, dumps=_dumps)

    async def _stream(
        self, request: web.Request, p: ParsedRequest, req: Request, stream: _Stream, arrived: float
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})  # fmt: skip
        await resp.prepare(request)
        runner = self.runner
        assert runner is not None
        head = _dumps({"id": req.request_id, "object": "chat.completion.chunk" if p.chat else "text_completion",
                       "created": int(time.time()), "model": p.model})[:-1]  # fmt: skip
        role_chunk = b""
        if p.chat:  # like vLLM, the role chunk goes out with the first token, not before
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}  # fmt: skip
            role_chunk = (
                f'data: {head},"choices":[{_dumps(first)}],"prompt_token_ids":null,"prompt_text":null}}\n\n'.encode()
            )
        transport = request.transport
        chunked = resp.headers.get("Transfer-Encoding", "").lower() == "chunked"  # HTTP/1.1; not for HTTP/1.0
        sent = 0

        if p.chat:
            pre = f'data: {head},"choices":[{{"index":0,"delta":{{"content":'.encode()
            post = b'},"logprobs":null,"finish_reason":%b,"token_ids":null}]}\n\n'
            post_last = b'},"logprobs":null,"finish_reason":%b,"stop_reason":null,"token_ids":null}]}\n\n'
        else:
            pre = f'data: {head},"choices":[{{"index":0,"text":'.encode()
            post = (b',"logprobs":null,"finish_reason":%b,"stop_reason":null,"prompt_token_ids":null,'
                    b'"token_ids":null}]}\n\n')
            post_last = post
        post_running = post % b"null"
        write = transport.write if transport is not None else None
        text_of = self._text

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
                u = self._usage(req)
                if p.chat:
                    u["prompt_tokens_details"]["created_cache_tokens"] = 0
                usage = _dumps(u)
                await resp.write(
                    f'data: {head},"choices":[],"usage":{usage},"system_fingerprint":"{FINGERPRINT}"}}\n\n'.encode()
                )
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            log.debug("client of %s went away", req.request_id)
        return resp

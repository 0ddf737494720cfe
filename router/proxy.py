"""The OpenAI endpoints: validate, pick a backend with the policy pipeline, proxy with retries, stream through.

Reusable helpers (also for the P/D handler):

* :func:`attempt` — one try on one backend; returns the client response, or a :class:`RetryableFailure` when
  the backend failed *before the first byte reached the client* (connect error, timeout, 5xx, stream broken
  before its first chunk). After the first byte a failure ends the stream with an SSE error event
  (:func:`router.errors.sse_error_event`) — output is never duplicated.
* :func:`route_with_retries` — select → attempt → on failure charge it to the backend or to the request
  (:class:`FailureLedger`: passive ejection only for the backend's own faults), back off with jitter
  (:func:`backoff_delay`) and retry on a backend not tried yet, up to ``max_attempts``.
* :func:`forward_headers`, :func:`usage_from_sse_tail`, :func:`post_json` (a non-streaming JSON call to a backend
  with failure accounting — e.g. the prefill leg of P/D).

P/D: when the model's backends include ``role=prefill`` backends, the completion handlers call
:func:`router.pd.handle_pd`, which runs the prefill leg with :func:`post_json` and streams the decode leg through
:func:`route_with_retries`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from router.backends import Backend
from router.context import RequestContext
from router.errors import ApiError, sse_error_event
from router.policies import Outcome, Pipeline
from router.state import RouterState

log = logging.getLogger("kvscale.router")

__all__ = [
    "RetryableFailure",
    "attempt",
    "backoff_delay",
    "forward_headers",
    "post_json",
    "route_with_retries",
    "usage_from_json",
    "usage_from_sse_tail",
]

_HOP = {"host", "content-length", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "authorization", "x-kvscale-policy", "accept-encoding"}  # fmt: skip
_TAIL = 16384  # bytes of the stream kept to find the final usage chunk
_FULL_PARSE_MAX = 16384  # non-streaming answers up to this size are parsed whole for their usage
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class RetryableFailure:
    """An attempt failed before anything reached the client: safe to retry elsewhere.

    ``client_fault``: a 5xx whose body is a request error (an OpenAI error with a 4xx ``code`` or a request-error
    ``type``): the request's own fault, answered as the engine answered it, never retried nor counted against the
    backend. ``status``/``body``/``content_type`` are the engine's answer then."""

    reason: str  # connect | timeout | first_byte_timeout | backend_down | 5xx | empty
    detail: str
    client_fault: bool = False
    status: int = 0
    body: bytes = b""
    content_type: str = "application/json"


# An engine answering 5xx with one of these error types (or a 4xx code) blames the request, not itself.
_REQUEST_ERROR_TYPES = {"BadRequestError", "invalid_request_error", "NotFoundError", "not_found_error",
                        "UnprocessableEntityError", "RequestValidationError"}  # fmt: skip


def blames_request(body: bytes) -> bool:
    """True if a 5xx answer's body says the request was at fault (vLLM's ``{"error": {...}}`` shape, or its older
    top-level ``{"object": "error", ...}``): a 4xx ``code`` or a request-error ``type``."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(obj, dict):
        return False
    err = obj.get("error") if isinstance(obj.get("error"), dict) else obj
    code = err.get("code")
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    return (isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 500) or (
        err.get("type") in _REQUEST_ERROR_TYPES
    )


class AttemptGuard:
    """One attempt in flight on a backend (``Backend.attempts``): the deadline it is waiting under, which the
    monitor fires at once when the backend fails its health checks (:meth:`Backend.abort_attempts`)."""

    __slots__ = ("aborted", "cm")

    def __init__(self) -> None:
        self.cm: asyncio.Timeout | None = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        if self.cm is not None and not self.cm.expired():
            self.cm.reschedule(asyncio.get_running_loop().time())


def _deadline(seconds: float) -> float | None:
    return asyncio.get_running_loop().time() + seconds if seconds > 0 else None


def forward_headers(headers: Mapping[str, str], request_id: str) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop ones, the router's own (Authorization, x-kvscale-policy), plus the id."""
    out: CIMultiDict[str] = CIMultiDict()
    add = out.add
    for k, v in headers.items():
        if k.lower() not in _HOP:
            add(k, v)
    out["x-request-id"] = request_id
    return out


def backoff_delay(attempt_no: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform(0, min(cap, base·2^(n-1)))."""
    return rng.uniform(0.0, min(cap_s, base_s * 2 ** max(0, attempt_no - 1)))


def usage_from_sse_tail(tail: bytes) -> dict[str, Any] | None:
    """The ``usage`` object of the last SSE event that has one (vLLM sends it last with include_usage)."""
    for event in reversed(tail.split(b"\n\n")):
        event = event.strip()
        if event.startswith(b"data: {") and b'"usage"' in event:
            try:
                usage = json.loads(event[6:]).get("usage")
            except ValueError:
                continue
            if isinstance(usage, dict):
                return usage
    return None


def usage_from_json(body: bytes) -> dict[str, Any] | None:
    """The top-level ``usage`` object of a non-streaming JSON answer.

    Small bodies are parsed whole. In a large one (a long completion) only the ``usage`` object is decoded: it is
    located as the last ``"usage":`` key (inside a JSON string its quotes would be escaped, so the text cannot fake
    it), and the whole body is parsed only if that fails.
    """
    if len(body) > _FULL_PARSE_MAX:
        i = body.rfind(b'"usage"')
        if i >= 0:
            tail = body[i + 7 :].lstrip()
            if tail.startswith(b":"):
                try:
                    usage, _ = _DECODER.raw_decode(tail[1:].lstrip().decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    usage = None
                if isinstance(usage, dict):
                    return usage
    try:
        usage = json.loads(body).get("usage")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return usage if isinstance(usage, dict) else None


def _usage_fields(usage: Mapping[str, Any] | None) -> dict[str, int | None]:
    if not isinstance(usage, Mapping):
        return {"prompt_tokens": None, "completion_tokens": None, "cached_tokens": None}
    details = usage.get("prompt_tokens_details")
    return {
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "cached_tokens": details.get("cached_tokens") if isinstance(details, Mapping) else None,
    }


async def attempt(
    state: RouterState,
    ctx: RequestContext,
    request: web.Request,
    backend: Backend,
    pipeline: Pipeline,
    path: str,
    body: bytes | None = None,
) -> web.StreamResponse | RetryableFailure:
    """Send the request to ``backend`` and relay the answer (see the module docstring).

    Deadlines: a streamed request must see its first chunk within ``first_byte_timeout_s``, and a started stream
    may stay silent at most ``stream_idle_timeout_s``; a backend that fails its health checks fires the deadline
    of every attempt it holds at once (:class:`AttemptGuard`), so what had not started is retried elsewhere and a
    started stream ends with an SSE error event."""
    clock = state.clock
    cfg = state.config
    t0 = clock()
    rec = ctx.state.get("_log")
    if rec is None:
        rec = ctx.state["_log"] = {}
    rec["backend"] = backend.url
    backend.in_flight += 1
    backend.requests_total += 1
    guard = AttemptGuard()
    backend.attempts.add(guard)
    outcome_status, error, ttft = 0, None, None
    usage: dict[str, Any] | None = None
    up: aiohttp.ClientResponse | None = None
    try:
        try:
            async with asyncio.timeout_at(_deadline(cfg.first_byte_timeout_s) if ctx.stream else None) as cm:
                guard.cm = cm
                up = await state.session.post(
                    backend.endpoint(path),
                    data=ctx.raw_body if body is None else body,
                    headers=forward_headers(ctx.headers, ctx.request_id),
                    timeout=state.upstream_timeout,
                )
                status = up.status
                content_type = up.content_type
                if status >= 500:
                    raw = await up.content.read(4096)
                    detail = raw.decode("utf-8", "replace")
                    error = "5xx"
                    return RetryableFailure("5xx", f"{backend.url} answered HTTP {status}: {detail[:200]}",
                                            blames_request(raw), status, raw, content_type)  # fmt: skip
                stream = ctx.stream and status == 200 and content_type == "text/event-stream"
                first = await (up.content.readany() if stream else up.read())
        except TimeoutError as exc:
            if guard.aborted:
                error = "backend_down"
                return RetryableFailure("backend_down", f"{backend.url} failed its health checks before answering")
            if cm.expired():
                error = "first_byte_timeout"
                return RetryableFailure("first_byte_timeout", f"{backend.url}: no first byte within "
                                        f"{cfg.first_byte_timeout_s:g}s (--first-byte-timeout-s)")  # fmt: skip
            error = "timeout"
            return RetryableFailure("timeout", f"{backend.url}: timed out ({exc})")
        except (aiohttp.ClientError, OSError) as exc:
            error = "connect"
            return RetryableFailure("connect", f"{backend.url}: {type(exc).__name__}: {exc}")
        if stream and not first:
            error = "empty"
            return RetryableFailure("empty", f"{backend.url}: the stream ended before its first byte")

        headers = {"x-request-id": ctx.request_id, "x-kvscale-backend": backend.url}
        if status != 200:  # a 4xx from the engine is the client's problem: pass it through untouched
            outcome_status = status
            return web.Response(status=status, body=first, content_type=content_type, headers=headers)

        ttft = clock() - t0
        outcome_status = 200
        state.pool.record_success(backend)
        pipeline.on_response_start(ctx, backend)
        if not stream:
            if content_type == "application/json":
                usage = usage_from_json(first)
            return web.Response(status=200, body=first, content_type=content_type, headers=headers)

        model_label = state.model_label(ctx.model)
        state.metrics.ttft_for(model_label).observe(ttft)
        headers["Content-Type"] = "text/event-stream"
        headers["Cache-Control"] = "no-cache"
        resp = web.StreamResponse(status=200, headers=headers)
        await resp.prepare(request)
        await resp.write(first)
        itl = state.metrics.itl_for(model_label).observe
        tail = bytearray(first[-_TAIL:])
        last = clock()
        idle = cfg.stream_idle_timeout_s
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(_deadline(idle)) as cm:
                guard.cm = cm
                async for chunk in up.content.iter_any():
                    now = clock()
                    itl(now - last)
                    last = now
                    if idle > 0:
                        cm.reschedule(None)  # a slow client's backpressure is not the backend's silence
                    await resp.write(chunk)
                    if idle > 0 and not guard.aborted:
                        cm.reschedule(loop.time() + idle)
                    tail += chunk
                    if len(tail) > 2 * _TAIL:  # amortised trim: no per-chunk copy of the whole tail
                        del tail[:-_TAIL]
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            if request.transport is None or request.transport.is_closing():
                raise  # the client went away (aiohttp reports it as a connection error on write)
            # The backend failed mid-stream: end the stream with an error event, never retry (no duplicates).
            if guard.aborted:
                error, why = "backend_down", "the backend failed its health checks mid-stream"
            elif isinstance(exc, TimeoutError) and cm.expired():
                error, why = "stream_idle_timeout", f"the backend was silent for {idle:g}s mid-stream"
            else:
                error, why = "stream", f"the backend failed mid-stream: {type(exc).__name__}"
                state.pool.record_failure(backend)
            if error == "stream_idle_timeout":
                state.pool.record_failure(backend)
            outcome_status = 502
            rec["status"], rec["error"] = 502, error
            state.metrics.failures.labels(error).inc()
            await resp.write(sse_error_event(why, 502))
        usage = usage_from_sse_tail(bytes(tail[-_TAIL:]))
        await resp.write_eof()
        return resp
    except (asyncio.CancelledError, ConnectionResetError, aiohttp.ClientConnectionResetError):
        outcome_status, error = 499, error or "client"
        raise
    finally:
        backend.attempts.discard(guard)
        if up is not None:
            if outcome_status in (0, 499) or error:
                up.close()  # abort the upstream request: the engine frees the sequence
            else:
                up.release()
        backend.in_flight -= 1
        duration = clock() - t0
        u = _usage_fields(usage)
        rec.update(u)
        rec["ttft_s"] = ttft
        if pipeline.has_finish_hooks:
            pipeline.on_finish(ctx, backend, Outcome(outcome_status or 502, error, ttft, duration, **u))


def passthrough(result: RetryableFailure, ctx: RequestContext, backend: Backend) -> web.Response:
    """The engine's own answer to a request it blamed (see :attr:`RetryableFailure.client_fault`)."""
    headers = {"x-request-id": ctx.request_id, "x-kvscale-backend": backend.url}
    return web.Response(status=result.status, body=result.body, content_type=result.content_type, headers=headers)


class FailureLedger:
    """Which backend to blame for the failed attempts of one request.

    A connection error, a timeout or a backend out of rotation is the backend's: counted toward its ejection at
    once. A plain 5xx may be either's: it is counted only once the request succeeds on another backend (then the
    first backend was at fault); if the same request fails with a 5xx on ``blame_after`` backends, the failure
    follows the request (a poison prompt), nobody is charged and the request is not retried further. A 5xx whose
    body blames the request is never charged (:func:`blames_request`), nor a 5xx never followed by a success."""

    def __init__(self, state: RouterState, blame_after: int = 2) -> None:
        self.state = state
        self.blame_after = blame_after
        self.pending: list[Backend] = []

    def failed(self, backend: Backend, result: RetryableFailure) -> bool:
        """Record a failed attempt; returns True when the request itself is to blame (stop retrying)."""
        self.state.metrics.failures.labels("client_fault" if result.client_fault else result.reason).inc()
        if result.client_fault:
            return True
        if result.reason == "5xx":
            self.pending.append(backend)
            return len(self.pending) >= self.blame_after
        if result.reason != "backend_down":  # already out of rotation: do not eject it twice
            self.state.pool.record_failure(backend)
        return False

    def succeeded(self) -> None:
        """The request was served elsewhere: the 5xx backends failed on their own."""
        for b in self.pending:
            self.state.pool.record_failure(b)
        self.pending.clear()


async def route_with_retries(
    state: RouterState,
    ctx: RequestContext,
    request: web.Request,
    pipeline: Pipeline,
    path: str,
    candidates: Callable[[], list[Backend]] | None = None,
    body: bytes | None = None,
) -> web.StreamResponse:
    """Select, attempt, retry on another backend before the first byte; 503 + Retry-After when nothing is left.
    Failures are charged to backends by a :class:`FailureLedger`: a request that fails on every backend it meets
    does not eject them."""
    cfg = state.config
    pick_from = candidates or (lambda: state.pool.available(ctx.model))
    last = "no healthy backend serves this model"
    ledger = FailureLedger(state)
    for n in range(1, cfg.max_attempts + 1):
        pool = pick_from()
        if ctx.tried:
            pool = [b for b in pool if b.url not in ctx.tried]
        backend = pipeline.select(ctx, pool) if pool else None
        if backend is None:
            break
        ctx.tried.append(backend.url)
        result = await attempt(state, ctx, request, backend, pipeline, path, body)
        if not isinstance(result, RetryableFailure):
            ledger.succeeded()
            return result
        last = result.detail
        if log.isEnabledFor(logging.INFO):
            log.info("request %s: attempt %d failed (%s)", ctx.request_id, n, result.detail)
        if ledger.failed(backend, result):
            rec = ctx.state.setdefault("_log", {})
            rec["error"] = "request_fault"
            if result.client_fault:
                return passthrough(result, ctx, backend)
            raise ApiError(502, f"the request failed with a server error on {len(ledger.pending)} backends; it is "
                                f"not retried further (the failure follows the request): {last}", None)  # fmt: skip
        if n < cfg.max_attempts:
            state.metrics.retries.labels(result.reason).inc()
            await asyncio.sleep(backoff_delay(n, cfg.retry_backoff_s, cfg.retry_backoff_max_s, state.rng))
    # A 5xx never followed by a success elsewhere stays uncharged: unproven, it may be the request's (a pool of one
    # backend cannot tell). Broken backends still leave rotation by failed health checks and connection errors.
    raise ApiError(503, f"no backend could serve the request: {last}", None,
                   headers={"Retry-After": str(cfg.retry_after_s)})  # fmt: skip


async def post_json(
    state: RouterState, backend: Backend, path: str, payload: Mapping[str, Any], ctx: RequestContext
) -> tuple[int, Any] | RetryableFailure:
    """POST JSON to a backend and read a JSON answer (counts in-flight; 5xx/connection errors → failure)."""
    backend.in_flight += 1
    try:
        async with state.session.post(
            backend.endpoint(path), json=payload, headers=forward_headers(ctx.headers, ctx.request_id),
            timeout=state.upstream_timeout,
        ) as up:
            if up.status >= 500:
                raw = await up.content.read(4096)
                return RetryableFailure("5xx", f"{backend.url} answered HTTP {up.status}", blames_request(raw),
                                        up.status, raw, up.content_type)  # fmt: skip
            try:
                return up.status, await up.json(content_type=None)
            except ValueError:
                return RetryableFailure("5xx", f"{backend.url} answered non-JSON")
    except TimeoutError:
        return RetryableFailure("timeout", f"{backend.url}: timed out")
    except (aiohttp.ClientError, OSError) as exc:
        return RetryableFailure("connect", f"{backend.url}: {type(exc).__name__}: {exc}")
    finally:
        backend.in_flight -= 1


def now_wall() -> float:
    return time.time()

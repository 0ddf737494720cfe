"""The router application: an explicit factory (:func:`create_app`) over its per-app state (:mod:`router.state`).

Pipeline: discovery → :class:`BackendPool` (kept fresh by :class:`BackendMonitor`) → policy pipeline
(:mod:`router.policies`) → proxy (:mod:`router.proxy`). Security (API keys, body limit, JSON validation),
admission control, the governance log and ``/metrics`` live here.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.admission import Admission
from router.backends import Backend, BackendPool, BackendSpec
from router.config import RouterConfig
from router.context import RequestContext, validate_body
from router.discovery import KubernetesDiscovery, StaticDiscovery
from router.errors import ApiError, error_body
from router.governance import GovernanceLog, sampling_params
from router.metrics import RouterMetrics
from router.monitor import BackendMonitor
from router.pd import handle_pd
from router.policies import Services, build_policies, load_policy_file, load_registry
from router.prefix_index import PrefixIndex
from router.proxy import route_with_retries
from router.security import KeyChecker
from router.state import POLICY_HEADER, STATE_KEY, RouterState

log = logging.getLogger("kvscale.router")

__all__ = ["POLICY_HEADER", "STATE_KEY", "RouterState", "create_app"]


def create_app(
    config: RouterConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    discovery: Any = None,
    tune_gc: bool = True,
) -> web.Application:
    """Build a router app. ``discovery`` defaults to static backends or Kubernetes per ``config``; pass an object
    with ``async start(on_update)`` / ``async stop()`` to use another source.

    ``tune_gc``: once started, move the objects alive so far out of the cyclic GC's reach (``gc.freeze``) and raise
    the generation-0 threshold, so collections under load are rarer and do not rescan the long-lived heap (it cut
    the router's CPU per request by ~15 % at 200 concurrent requests). Process-wide; pass False to leave the
    interpreter's GC settings alone."""
    config.validate(require_source=discovery is None)
    rng = rng or random.Random()
    pool = BackendPool(clock, config.ejection)
    metrics = RouterMetrics()
    services = Services(clock=clock, rng=rng, pool=pool, prefix_index=PrefixIndex(config.prefix_index_capacity))
    services.extras["registry"] = metrics.registry  # plugins (e.g. kv-events) register their own metrics here
    registry = load_registry()
    extra = load_policy_file(config.policy_config) if config.policy_config else None
    policies = build_policies(registry, services, extra)
    if config.policy not in policies:
        raise ValueError(f"--policy {config.policy!r} is not a known policy; known: {sorted(policies)}")
    if discovery is None:
        if config.k8s_selector:
            discovery = KubernetesDiscovery(
                config.k8s_selector, config.k8s_namespace, port=config.k8s_port, relist_s=config.k8s_relist_s
            )
        else:
            discovery = StaticDiscovery(config.backends)
    state = RouterState(
        config=config,
        clock=clock,
        rng=rng,
        pool=pool,
        metrics=metrics,
        services=services,
        policies=policies,
        admission=Admission(config.max_concurrency, config.max_queue, config.queue_timeout_s, config.retry_after_s),
        governance=GovernanceLog(config.governance_log),
        keys=KeyChecker(config.api_keys),
        discovery=discovery,
        upstream_timeout=aiohttp.ClientTimeout(
            total=config.request_timeout_s or None, sock_connect=config.connect_timeout_s,
            sock_read=config.read_timeout_s,
        ),
    )
    # Derived at scrape time instead of counted per request.
    metrics.in_flight.set_function(lambda: state.admission.active)
    metrics.queued.set_function(lambda: state.admission.queued)

    def on_eject(b: Backend) -> None:
        metrics.ejections.labels(b.url).inc()
        log.warning("backend %s ejected for %.1fs", b.url, b.ejected_until - clock())

    pool.on_eject = on_eject
    pool.on_remove = lambda b: (metrics.forget_backend(b.url), services.prefix_index.remove_backend(b.url))

    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_errors_middleware])
    app[STATE_KEY] = state
    for method, path, handler in (("POST", "/v1/completions", completions),
                                  ("POST", "/v1/chat/completions", chat_completions), ("GET", "/v1/models", models),
                                  ("GET", "/health", health), ("GET", "/ready", ready),
                                  ("GET", "/metrics", metrics_endpoint)):  # fmt: skip
        app.router.add_route(method, path, handler, expect_handler=_expect)
    app.on_startup.append(_on_startup)
    if tune_gc:
        app.on_startup.append(_tune_gc)
    app.on_cleanup.append(_on_cleanup)
    return app


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """The ``Expect`` header (it is answered before any middleware): ``100-continue`` as aiohttp does, anything else
    a 417 in OpenAI's shape instead of aiohttp's plain text."""
    expect = request.headers.get("Expect", "")
    if request.version == aiohttp.HttpVersion11:
        if expect.lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
            return None
        return ApiError(417, f"unsupported Expect header: {expect[:100]!r} (only 100-continue)", "Expect").response()
    return None


async def _on_startup(app: web.Application) -> None:
    state = app[STATE_KEY]
    c = state.config
    # One pooled keep-alive session for every upstream call. No cookie jar: a proxy must not keep one client's
    # cookies for the next (and filtering cookies costs time per request). No automatic Accept-Encoding: the body
    # is relayed as is, so the backend must not compress it.
    state.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0, ttl_dns_cache=300),
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("Accept-Encoding",),
    )
    state.monitor = BackendMonitor(
        state.pool, state.session, state.metrics,
        scrape_interval_s=c.scrape_interval_s, scrape_timeout_s=c.scrape_timeout_s,
        health_interval_s=c.health_interval_s, health_timeout_s=c.health_timeout_s,
        health_failure_threshold=c.health_failure_threshold, models_refresh_s=c.models_refresh_s, clock=state.clock,
    )  # fmt: skip
    initial: list[Backend] = []

    def on_update(specs: list[BackendSpec]) -> None:
        added, removed = state.pool.update(specs)
        for b in removed:
            log.info("backend %s left the pool", b.url)
        if added:
            log.info("backends joined: %s", [b.url for b in added])
            initial.extend(added)
            state.spawn(state.monitor.on_added(added))
        if started and (added or removed):
            default_policy.on_pool_change()

    default_policy = state.policies[c.policy]
    started = False
    await state.discovery.start(on_update)
    await state.monitor.on_added(list(state.pool))  # know models and health before the first request
    state.monitor.start()
    started = True
    default_policy.on_pool_change()  # e.g. KV-event subscribers connect now, not on the first request


_GC_GEN0_THRESHOLD = 20_000


async def _tune_gc(app: web.Application) -> None:
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 < _GC_GEN0_THRESHOLD:
        gc.set_threshold(_GC_GEN0_THRESHOLD, gen1, gen2)


async def _on_cleanup(app: web.Application) -> None:
    state = app[STATE_KEY]
    await state.discovery.stop()
    if state.monitor is not None:
        await state.monitor.stop()
    for t in list(state._bg):
        t.cancel()
    kv = state.services.extras.get("kvevents")
    if kv is not None:  # ZMQ subscribers of the kv-events scorer
        await kv.close()
    if state.session is not None:
        await state.session.close()
    state.governance.close()


@web.middleware
async def _errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if request.path.startswith("/v1/") and state.keys.enabled and not state.keys.check(
        request.headers.get("Authorization")
    ):
        # counted and logged like any answer, so that key guessing shows on dashboards and in the audit log
        state.metrics.request_counter("other", "none", "none", 401).inc()
        state.metrics.auth_failures.inc()
        if state.governance.enabled:
            state.governance.write({"ts": round(time.time(), 3), "request_id": request.headers.get("x-request-id"),
                                    "endpoint": request.path, "backend": None, "policy": None, "status": 401,
                                    "error": "unauthorized", "remote": request.remote})  # fmt: skip
        return ApiError(401, "missing or invalid API key (Authorization: Bearer KEY)", None).response()
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:  # aiohttp's own 404/405/413: answer them in OpenAI's shape
        if exc.status < 400:
            raise
        return web.json_response(error_body(exc.status, exc.reason or exc.text or "error"), status=exc.status)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _read_json(request: web.Request, limit: int) -> tuple[bytes, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body of {request.content_length} bytes exceeds the limit of {limit}", None)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body exceeds the limit of {limit} bytes", None) from None
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", None) from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth_exceeds(body, MAX_JSON_DEPTH):
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None)
    return raw, body


MAX_JSON_DEPTH = 64  # OpenAI bodies nest a few levels (tool schemas a dozen); deeper is an attack or a bug


def _reject_constant(name: str) -> float:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (RFC 8259); vLLM's parser rejects them too."""
    raise ValueError(f"{name} is not a valid JSON value")


def _depth_exceeds(obj: Any, limit: int) -> bool:
    """True if ``obj`` nests containers deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    clock = state.clock
    t0 = clock()
    headers = request.headers
    rid = headers.get("x-request-id") or f"kvr-{uuid.uuid4().hex}"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    ctx: RequestContext | None = None
    pipeline_name = "none"
    status = 500
    try:
        raw, body = await _read_json(request, state.config.max_body_bytes)
        model, text, stream = validate_body(body, chat)
        pipeline = state.policy_for(headers)
        pipeline_name = pipeline.name
        ctx = RequestContext(rid, model, "chat" if chat else "completions", text, body, headers, stream,
                             pipeline.name, raw, started=t0)  # fmt: skip
        serving = state.pool.for_model(model)
        if not serving:
            raise ApiError(404, f"the model {model!r} does not exist; served: {sorted(state.pool.models(False))}",
                           "model", "NotFoundError")  # fmt: skip
        admission = state.admission
        await admission.acquire()
        try:
            if any(b.role == "prefill" for b in serving):
                resp = await handle_pd(state, ctx, request, pipeline, path)
            else:
                resp = await route_with_retries(state, ctx, request, pipeline, path)
        finally:
            admission.release()
        status = resp.status
        return resp
    except ApiError as exc:
        status = exc.status
        if status == 429 or (status == 503 and "capacity" in exc.message):
            state.metrics.rejected.labels("queue_full" if status == 429 else "queue_timeout").inc()
        return exc.response()
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499
        raise
    finally:
        _account(state, ctx, pipeline_name, status, clock() - t0, rid)


def _account(state: RouterState, ctx: RequestContext | None, policy: str, status: int, duration: float,
             rid: str) -> None:  # fmt: skip
    rec = ctx.state.get("_log", {}) if ctx is not None else {}
    status = rec.get("status", status)  # a stream that failed after its first byte: 200 on the wire, 502 here
    backend = rec.get("backend", "none")
    model = state.model_label(ctx.model) if ctx is not None else "other"
    state.metrics.request_counter(model, backend, policy, status).inc()
    state.metrics.duration_for(model).observe(duration)
    if not state.governance.enabled:
        return
    entry: dict[str, Any] = {
        "ts": round(time.time(), 3),
        "request_id": rid,
        "model": ctx.model if ctx is not None else None,
        "endpoint": ctx.endpoint if ctx is not None else None,
        "backend": None if backend == "none" else backend,
        "policy": policy,
        "prompt_hash": ctx.prompt_hash if ctx is not None else None,
        "prompt_chars": len(ctx.prompt) if ctx is not None else None,
        "sampling": sampling_params(ctx.body) if ctx is not None else {},
        "prompt_tokens": rec.get("prompt_tokens"),
        "completion_tokens": rec.get("completion_tokens"),
        "cached_tokens": rec.get("cached_tokens"),
        "ttft_s": None if rec.get("ttft_s") is None else round(rec["ttft_s"], 6),
        "duration_s": round(duration, 6),
        "attempts": len(ctx.tried) if ctx is not None else 0,
        "status": status,
        "error": rec.get("error"),
    }
    state.governance.write(entry)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "kvscale-router"}
            for m in sorted(state.pool.models(healthy_only=True))]  # fmt: skip
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    n = sum(1 for b in state.pool if b.available(state.clock()) and b.models)
    body = {"ready": n > 0, "available_backends": n, "backends": len(state.pool)}
    return web.json_response(body, status=200 if n else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    index = state.services.prefix_index
    if index is not None:
        state.metrics.prefix_entries.set(len(index))
        state.metrics.prefix_hit_rate.set(index.hit_rate)
    return web.Response(body=generate_latest(state.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

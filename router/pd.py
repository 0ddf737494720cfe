"""Prefill/decode disaggregated orchestration (called by the completion handlers of :mod:`router.app`).

When the model's backends include ``role=prefill`` backends (``--backend URL,role=prefill`` or the pod label
``kvscale.io/role`` / ``llm-d.ai/role``), each completion runs in two legs sharing one request id
(``x-request-id``):

1. **prefill** — the body with ``max_tokens: 1``, ``stream: false`` and ``kv_transfer_params:
   {"do_remote_decode": true, ...}`` (what vLLM's NixlConnector proxy sends) goes to a *prefix-aware* choice of
   prefill pod: the most prompt tokens already in its cache (KV-event index), then the fewest in flight. A
   connection error, timeout or 5xx moves to the next prefill pod (up to ``max_attempts``); a 4xx is the client's
   and is returned as is;
2. **decode** — the original body plus the ``kv_transfer_params`` the prefill pod returned goes to a *load-aware*
   decode pod (the ``least-request`` policy), streamed to the client through the normal proxy path (retries
   before the first byte, SSE error event after it).

If every prefill attempt fails, the request is served by a decode pod alone (it prefills locally, as vLLM's
decode instances do for requests without transfer parameters), so a prefill outage degrades latency, not
availability.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from router.errors import ApiError
from router.policies import Pipeline, Services
from router.policies.kv_events import KVEventsScorer
from router.proxy import FailureLedger, RetryableFailure, backoff_delay, passthrough, post_json, route_with_retries
from router.state import RouterState

if TYPE_CHECKING:
    from router.backends import Backend
    from router.context import RequestContext

log = logging.getLogger("kvscale.router.pd")

__all__ = ["handle_pd", "pd_kv_scorer", "prefill_body", "rank_prefill"]

PREFILL_ROLES = ("prefill",)
DECODE_ROLES = ("decode", "both")
_KV_KEY = "pd.kv-events"


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg's body: one token, not streamed, asking the engine to keep the KV for a remote decoder."""
    out = {k: v for k, v in body.items() if k not in ("stream_options", "max_completion_tokens")}
    out.update(
        max_tokens=1,
        stream=False,
        kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                            "remote_block_ids": None, "remote_host": None, "remote_port": None},  # fmt: skip
    )
    if "max_completion_tokens" in body:
        out["max_completion_tokens"] = 1
    return out


def pd_kv_scorer(services: Services, pipeline: Pipeline) -> KVEventsScorer:
    """The policy's kv-events scorer when it has one (same tokenizer and endpoints), else a shared default."""
    for scorer, _ in pipeline.scorers:
        if isinstance(scorer, KVEventsScorer):
            return scorer
    kv = services.extras.get(_KV_KEY)
    if kv is None:
        kv = services.extras[_KV_KEY] = KVEventsScorer(KVEventsScorer.Config(), services)
    return kv


def rank_prefill(ctx: RequestContext, backends: list[Backend], kv: KVEventsScorer) -> list[Backend]:
    """Prefill pods best first: most cached prompt tokens, then fewest in flight."""
    kv._sync()
    _, hit = kv.cached_tokens(ctx, backends)
    return sorted(backends, key=lambda b: (-hit.get(b.url, 0), b.in_flight))


async def handle_pd(
    state: RouterState, ctx: RequestContext, request: web.Request, pipeline: Pipeline, path: str
) -> web.StreamResponse:
    cfg = state.config
    kv = pd_kv_scorer(state.services, pipeline)
    pbody = prefill_body(ctx.body)
    params: dict[str, Any] | None = None
    last = "no prefill backend available"
    ledger = FailureLedger(state)
    for n in range(1, cfg.max_attempts + 1):
        candidates = [b for b in state.pool.available(ctx.model, PREFILL_ROLES) if b.url not in ctx.tried]
        if not candidates:
            break
        backend = rank_prefill(ctx, candidates, kv)[0]
        ctx.tried.append(backend.url)
        result = await post_json(state, backend, path, pbody, ctx)
        if isinstance(result, RetryableFailure):
            last = result.detail
            log.info("request %s: prefill on %s failed (%s)", ctx.request_id, backend.url, result.detail)
            if ledger.failed(backend, result):  # the request's fault: no other prefill pod will do better
                if result.client_fault:
                    return passthrough(result, ctx, backend)
                break
            if n < cfg.max_attempts:
                state.metrics.retries.labels(f"prefill_{result.reason}").inc()
                await asyncio.sleep(backoff_delay(n, cfg.retry_backoff_s, cfg.retry_backoff_max_s, state.rng))
            continue
        status, answer = result
        if status != 200:
            err = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise ApiError(status, str(err.get("message") or answer)[:2000], err.get("param"))
        state.pool.record_success(backend)
        ledger.succeeded()
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if not isinstance(params, dict):
            last = f"{backend.url} returned no kv_transfer_params (is it a prefill instance?)"
            log.warning("request %s: %s", ctx.request_id, last)
            continue
        ctx.state["pd_prefill"] = backend.url
        break
    decode_pipeline = state.policies.get("least-request", pipeline)
    if params is None:
        log.warning("request %s: prefill failed everywhere (%s); decoding pods prefill locally", ctx.request_id,
                    last)  # fmt: skip
        body = None  # the original bytes
    else:
        body = json.dumps({**ctx.body, "kv_transfer_params": params}).encode()
    return await route_with_retries(
        state, ctx, request, decode_pipeline, path,
        candidates=lambda: state.pool.available(ctx.model, DECODE_ROLES), body=body,
    )  # fmt: skip

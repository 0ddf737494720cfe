"""The state one router app owns (:class:`RouterState`, reached as ``request.app[STATE_KEY]``), shared by the
request handlers (:mod:`router.app`), the proxy (:mod:`router.proxy`) and the P/D handler (:mod:`router.pd`)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from router.admission import Admission
from router.backends import Backend, BackendPool
from router.config import RouterConfig
from router.context import RequestContext
from router.errors import ApiError
from router.governance import GovernanceLog
from router.metrics import RouterMetrics
from router.monitor import BackendMonitor
from router.policies import Pipeline, Services
from router.security import KeyChecker

__all__ = ["POLICY_HEADER", "STATE_KEY", "RouterState"]

POLICY_HEADER = "x-kvscale-policy"


@dataclass
class RouterState:
    """Everything one router app owns. Handlers and the P/D handler reach it as ``request.app[STATE_KEY]``."""

    config: RouterConfig
    clock: Callable[[], float]
    rng: random.Random
    pool: BackendPool
    metrics: RouterMetrics
    services: Services
    policies: dict[str, Pipeline]
    admission: Admission
    governance: GovernanceLog
    keys: KeyChecker
    discovery: Any
    session: aiohttp.ClientSession = field(default=None)  # type: ignore[assignment]  # set on startup
    upstream_timeout: aiohttp.ClientTimeout = field(default=None)  # type: ignore[assignment]  # from the config
    monitor: BackendMonitor = field(default=None)  # type: ignore[assignment]
    _bg: set[asyncio.Task[Any]] = field(default_factory=set)

    def policy_for(self, headers) -> Pipeline:
        name = headers.get(POLICY_HEADER) or self.config.policy
        pipeline = self.policies.get(name)
        if pipeline is None:
            raise ApiError(400, f"unknown routing policy {name!r} in {POLICY_HEADER}; known: {sorted(self.policies)}",
                           POLICY_HEADER)  # fmt: skip
        return pipeline

    def model_label(self, model: str) -> str:
        """``model`` if a backend serves it, else "other" (keeps metric labels bounded)."""
        return model if self.pool.serves(model) else "other"

    def select(self, ctx: RequestContext, candidates: list[Backend], pipeline: Pipeline | None = None):
        """Run a policy over ``candidates`` (helper for the P/D handler)."""
        return (pipeline or self.policies[self.config.policy]).select(ctx, candidates)

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)


STATE_KEY: web.AppKey[RouterState] = web.AppKey("kvscale_router", RouterState)

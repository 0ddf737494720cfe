"""The kvscale router app in this process on a free port, as ``kvscale router serve`` runs it (handler cancellation
on), for the router's integration tests. Test-only: it lives with the tests, not in the router package."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from harness.procs import free_port
from router.app import create_app
from router.backends import parse_backend_spec
from router.config import RouterConfig
from router.runner import RouterRunner
from router.state import STATE_KEY, RouterState


@dataclass
class RunningRouter:
    url: str
    app: web.Application

    @property
    def state(self) -> RouterState:
        return self.app[STATE_KEY]


@contextlib.asynccontextmanager
async def serve_router(backends: list[str] | None = None, *, discovery: Any = None, **config_kw: Any
                       ) -> AsyncIterator[RunningRouter]:  # fmt: skip
    """An in-process router on a free port; ``config_kw`` are :class:`RouterConfig` fields."""
    port = free_port()
    config_kw.setdefault("governance_log", None)
    config = RouterConfig(port=port, backends=[parse_backend_spec(b) for b in backends or []], **config_kw)
    app = create_app(config, discovery=discovery)
    runner = RouterRunner(app, header_timeout_s=config.header_timeout_s, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield RunningRouter(f"http://127.0.0.1:{port}", app)
    finally:
        await runner.cleanup()

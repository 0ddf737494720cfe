"""The kvscale router app in this process on a free port, as ``kvscale router serve`` runs it (handler cancellation
on), for the router's integration tests. Test-only: it lives with the tests, not in the router package."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
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


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, port: int | None = None, **runner_kw: Any) -> AsyncIterator[str]:
    """Any aiohttp app in this process on a free port (or ``port``); yields its base URL. For the tests' few
    stand-ins (an exporter serving a recorded page, a pass-through that fails on demand)."""
    runner = web.AppRunner(app, **runner_kw)
    await runner.setup()
    port = port or free_port()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def router_in_thread(start: Callable[[], Any]) -> Iterator[str]:
    """Run ``start()`` (an async context manager yielding a running router, e.g. a pod and a router) on a loop of
    its own in a background thread; yields the router's URL. For fuzz tests sharing one router over examples."""
    loop = asyncio.new_event_loop()
    ready: dict[str, str] = {}
    stop = asyncio.Event()

    async def main() -> None:
        async with start() as r:
            ready["url"] = r.url
            await stop.wait()

    t = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    t.start()
    while "url" not in ready:
        if not t.is_alive():
            raise RuntimeError("the background router did not start")
        t.join(0.05)
    try:
        yield ready["url"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(10)

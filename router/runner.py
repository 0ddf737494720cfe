"""Serving the router app: aiohttp's runner, with the connection-level answers made the router's own.

aiohttp answers what it rejects before any handler runs (a header line over 8190 bytes, too many headers, bytes
that are not HTTP) with a plain-text 400 from its request handler. :class:`RouterRunner` makes those answers
OpenAI-shaped JSON like every other error of the router, and closes a connection whose request head has not
arrived within ``header_timeout_s`` (a slowloris client holding connections open a byte at a time; Go's
``ReadHeaderTimeout``, nginx's ``client_header_timeout``) with a JSON 408. :func:`serve` runs an app with it until
SIGTERM / SIGINT, then shuts down gracefully (in-flight requests get ``shutdown_timeout_s``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from router.errors import error_body

__all__ = ["RouterRunner", "serve"]

log = logging.getLogger("kvscale.router")


def _json_error(status: int, message: str) -> bytes:
    return json.dumps(error_body(status, message)).encode()


class _RouterRequestHandler(RequestHandler):
    """aiohttp's protocol handler with JSON error answers and a request-head deadline."""

    def __init__(self, *args: Any, header_timeout_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    # -- the request-head deadline ----------------------------------------------------------------------------
    def _arm(self) -> None:
        if self._header_timeout_s > 0 and self._head_timer is None:
            self._head_timer = asyncio.get_running_loop().call_later(self._header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = _json_error(408, f"the request head did not arrive within {self._header_timeout_s:g}s")
        head = (f"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()  # fmt: skip
        transport.write(head + body)
        transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # a connection that never sends a complete head is closed too

    def data_received(self, data: bytes) -> None:
        if self._current_request is None and not self._messages:
            self._arm()  # the first bytes of the next request head (a body being read is not a head)
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._disarm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -- aiohttp's own error answers, in OpenAI's shape --------------------------------------------------------
    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs; raises if the response had already started
        else:  # a client's malformed request: worth a debug line, not an error with a traceback
            log.debug("rejected a malformed request from %s: %s", getattr(request, "remote", "?"), message or exc)
            if request.writer.output_size > 0:
                raise ConnectionError("the response had started: no error answer can follow")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        text = phrase if status >= 500 or not message else f"{phrase}: {message}"
        resp = web.Response(status=status, body=_json_error(status, text[:500]), content_type="application/json")
        resp.force_close()
        return resp


class _RouterServer(web.Server):
    header_timeout_s = 0.0

    def __call__(self) -> RequestHandler:
        return _RouterRequestHandler(self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs)


class RouterRunner(web.AppRunner):
    """``web.AppRunner`` whose connections use the router's protocol handler (see the module docstring)."""

    def __init__(self, app: web.Application, *, header_timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app's own server (its startup ran, its handler and request factory set), only making our handlers.
        server.__class__ = _RouterServer
        server.header_timeout_s = self.header_timeout_s  # type: ignore[attr-defined]
        return server


async def _serve(app: web.Application, host: str, port: int, header_timeout_s: float, backlog: int,
                 shutdown_timeout_s: float) -> None:  # fmt: skip
    runner = RouterRunner(app, header_timeout_s=header_timeout_s, handler_cancellation=True, access_log=None,
                          shutdown_timeout=shutdown_timeout_s)  # fmt: skip
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port, backlog=backlog).start()
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def serve(app: web.Application, host: str, port: int, *, header_timeout_s: float = 10.0, backlog: int = 2048,
          shutdown_timeout_s: float = 60.0) -> None:  # fmt: skip
    """Serve ``app`` until SIGTERM or SIGINT (``web.run_app`` with :class:`RouterRunner`)."""
    asyncio.run(_serve(app, host, port, header_timeout_s, backlog, shutdown_timeout_s))

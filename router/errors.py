"""Errors answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

__all__ = ["ApiError", "error_body", "sse_error_event"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout",
    413: "invalid_request_error",
    417: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout",
}


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or _TYPES.get(status, "api_error"), "param": param,
                      "code": status}}


def sse_error_event(message: str, status: int = 502) -> bytes:
    """The event that ends a stream that failed after its first byte (then ``data: [DONE]``)."""
    return b"data: " + json.dumps(error_body(status, message)).encode() + b"\n\ndata: [DONE]\n\n"


class ApiError(Exception):
    """Raise anywhere in a handler; the app answers it as OpenAI-shaped JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(
            error_body(self.status, self.message, self.param, self.type), status=self.status, headers=self.headers
        )

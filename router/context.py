"""The request context handed to policies, and validation of the fields the router reads.

The router reads only ``model``, ``prompt`` / ``messages``, ``stream`` and ``max_tokens`` (plus
``max_completion_tokens``); everything else passes to the backend untouched (the raw body bytes are forwarded).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from kvscale.hashing import text_block_hashes
from router.errors import ApiError

__all__ = ["RequestContext", "all_ints", "render_messages", "render_token_ids", "validate_body"]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif part.get("type"):
                    parts.append(f"<{part['type']}>")
        return "".join(parts)
    return ""


def render_messages(messages: list[Mapping[str, Any]]) -> str:
    """Chat messages rendered to one string (role line + text), the router's stand-in for a chat template."""
    return "".join(f"<|{m.get('role', '')}|>\n{_content_text(m.get('content'))}\n" for m in messages)


def render_token_ids(ids: list[int]) -> str:
    """The router's text of a token-id prompt: one word per id (what text-matching scorers hash)."""
    return " ".join(map(str, ids))


def _render_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    if prompt and all_ints(prompt):
        return render_token_ids(prompt)
    return "\n".join(render_token_ids(p) for p in prompt)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def all_ints(values: list[Any]) -> bool:
    """Every item is an int and none a bool, checked at C speed (id prompts run to 100k+ tokens)."""
    return set(map(type, values)) <= {int}


def validate_body(body: Any, chat: bool) -> tuple[str, str, bool]:
    """Check the fields the router reads; returns (model, prompt text, stream). Raises :class:`ApiError` 400."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a non-empty string", "model")
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' is required and must be a non-empty list", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
            c = m.get("content")
            if c is not None and not isinstance(c, str | list):
                raise ApiError(400, f"messages[{i}].content must be a string, a list of parts or null", "messages")
        text = render_messages(msgs)
    else:
        prompt = body.get("prompt")
        ok = isinstance(prompt, str) or (
            isinstance(prompt, list)
            and prompt
            and (
                all(isinstance(p, str) for p in prompt)
                or all_ints(prompt)
                or all(isinstance(p, list) and p and all_ints(p) for p in prompt)
            )
        )
        if not ok:
            raise ApiError(
                400, "'prompt' is required: a string, a list of strings, or token ids (list of ints or lists)",
                "prompt",
            )
        text = _render_prompt(prompt)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None and (not _is_int(v) or v < 1):
            raise ApiError(400, f"'{name}' must be an integer ≥ 1", name)
    return model, text, bool(stream)


@dataclass
class RequestContext:
    """Everything a policy may look at for one request. Plugins may stash per-request data in ``state``."""

    request_id: str
    model: str
    endpoint: str  # "completions" | "chat"
    prompt: str  # completions prompt, or chat messages rendered with :func:`render_messages`
    body: dict[str, Any]  # the parsed JSON body (read-only by convention)
    headers: Mapping[str, str]  # request headers (case-insensitive mapping)
    stream: bool = False
    policy: str = ""
    raw_body: bytes = b""  # the original request bytes, forwarded unchanged
    started: float = field(default_factory=time.monotonic)
    tried: list[str] = field(default_factory=list)  # backend URLs already attempted for this request
    state: dict[str, Any] = field(default_factory=dict)
    _hashes: dict[tuple[int, int | None], list[int]] = field(default_factory=dict, repr=False)

    def block_hashes(self, block_chars: int = 64, max_blocks: int | None = None) -> list[int]:
        """Chained hashes of the prompt's full blocks (computed once per block size, then cached)."""
        key = (block_chars, max_blocks)
        if key not in self._hashes:
            self._hashes[key] = text_block_hashes(self.prompt, block_chars, max_blocks)
        return self._hashes[key]

    @property
    def prompt_hash(self) -> str:
        """A 128-bit hash of the prompt, for logs (the text itself is never logged)."""
        if "_prompt_hash" not in self.state:
            self.state["_prompt_hash"] = xxhash.xxh3_128_hexdigest(self.prompt.encode("utf-8", "surrogatepass"))
        return self.state["_prompt_hash"]

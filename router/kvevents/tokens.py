"""Prompt token ids as the engine computes them, so our block hashes line up with the engine's blocks.

Uses the simulator's tokenizer wrappers (``kvscale.tokenizer``), which mirror vLLM: completions are encoded with
special tokens; chat requests are rendered with the tokenizer's chat template (generation prompt added) and encoded
without adding special tokens again. Load the model's tokenizer from a local directory; without one the
simulator's fallback tokenizer is used (right for simulator pods started without ``--tokenizer``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvscale.tokenizer import Tokenizer, load_tokenizer
from router.context import all_ints

__all__ = ["Tokenizer", "context_token_ids", "load_tokenizer", "prompt_token_ids", "shared_tokenizer"]


def prompt_token_ids(tokenizer: Tokenizer, body: Mapping[str, Any], chat: bool) -> list[int] | None:
    """Token ids of a request body's prompt, or None when the body has no prompt we can tokenize."""
    try:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return None
            return tokenizer.encode_chat(messages)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return tokenizer.encode_prompt(prompt)
        if isinstance(prompt, list) and all_ints(prompt):
            return list(prompt)
    except Exception:  # a chat template may reject a conversation; the engine answers that request with a 400
        return None
    return None


def shared_tokenizer(extras: dict[str, Any], path: str | None) -> Tokenizer:
    """One tokenizer per directory per app (kept in ``Services.extras``): loading a tokenizer takes ~100 ms."""
    key = f"kvevents.tokenizer:{path or ''}"
    tok = extras.get(key)
    if tok is None:
        tok = extras[key] = load_tokenizer(path)
    return tok


def context_token_ids(ctx: Any, tokenizer: Tokenizer) -> list[int] | None:
    """The request's prompt token ids, tokenized once per request (cached in ``ctx.state``)."""
    key = f"_token_ids:{id(tokenizer)}"
    if key not in ctx.state:
        ctx.state[key] = prompt_token_ids(tokenizer, ctx.body, ctx.endpoint == "chat")
    return ctx.state[key]

"""A small streaming load generator for OpenAI-compatible endpoints (demo, benchmarks, tests).

It measures what a client sees: TTFT (request sent → first content chunk), each inter-chunk gap (ITL), E2E, and
the usage the server reports (prompt, completion and cached tokens).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Sample:
    endpoint: str
    ok: bool
    status: int
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    itls_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""
    started_at: float = float("nan")  # time.perf_counter() when the request was sent


async def stream_completion(
    session: aiohttp.ClientSession,
    base_url: str,
    body: dict[str, Any],
    *,
    chat: bool = False,
    timeout_s: float = 300.0,
    headers: Mapping[str, str] | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> Sample:
    """POST a streaming (chat) completion with usage and time every chunk. An error event in the stream (vLLM's
    ``data: {"error": ...}`` after a mid-stream failure) makes the sample a failure with that error. ``on_chunk``
    is called as each content chunk arrives (e.g. to follow a stream's progress while it runs)."""
    url = f"{base_url.rstrip('/')}/v1/{'chat/completions' if chat else 'completions'}"
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    sample = Sample(endpoint=base_url, ok=False, status=0, started_at=t0)
    last = None
    try:
        async with session.post(url, json=payload, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:  # fmt: skip
            sample.status = resp.status
            if resp.status != 200:
                sample.error = (await resp.text())[:500]
                return sample
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if "error" in chunk:
                    sample.error = str(chunk["error"])[:500]
                    break
                if chunk.get("choices"):
                    if last is None:
                        sample.ttft_s = now - t0
                    else:
                        sample.itls_s.append(now - last)
                    last = now
                    if on_chunk is not None:
                        on_chunk()
                usage = chunk.get("usage")
                if usage:
                    sample.prompt_tokens = usage.get("prompt_tokens", 0)
                    sample.completion_tokens = usage.get("completion_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    sample.cached_tokens = details.get("cached_tokens") or 0
        sample.e2e_s = time.perf_counter() - t0
        sample.ok = not sample.error
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        sample.error = f"{type(e).__name__}: {e}"
    return sample


async def run_open_loop(
    session: aiohttp.ClientSession,
    requests: list[tuple[float, str, dict[str, Any], bool]],
) -> list[Sample]:
    """Send each (at_s, base_url, body, chat) at its time offset (open loop) and gather the samples."""
    t0 = time.perf_counter()

    async def one(at: float, url: str, body: dict[str, Any], chat: bool) -> Sample:
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        return await stream_completion(session, url, body, chat=chat)

    return list(await asyncio.gather(*(one(*r) for r in requests)))

"""kvscale's own trace format: JSON lines, one request per line, sorted by arrival.

Each line holds ``arrival_s`` (seconds from the trace start), ``input_len`` and ``output_len`` (tokens), and
optionally how the prompt shares content with other prompts, in one of two ways:

* ``prompt_tokens``: the prompt's token ids (synthetic workloads that need concrete ids);
* ``prefix_blocks`` + ``prefix_block_tokens``: the prompt as a chain of block ids of ``prefix_block_tokens``
  tokens each (the last may be partial), as production traces record it (Mooncake's ``hash_ids``, 512 tokens).
  Equal ids at equal positions after equal ids mean a shared prefix; :mod:`kvscale.traces.prompts` expands an id
  into a deterministic run of token ids, so an engine's prefix cache of any block size sees exactly that sharing.
  Tokens past the last listed block (if any) are unique to the request.

and ``prefix_group`` (e.g. the tenant whose system prompt starts the request) and ``session`` (a conversation id).
A 12k-token Mooncake prompt is 24 integers on its line, not 12k.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class TraceRequest:
    """One request of a trace. ``prompt_tokens`` is None unless the workload needs concrete ids."""

    arrival_s: float
    prompt_tokens: list[int] | None
    input_len: int
    output_len: int
    prefix_group: int | None = None  # e.g. the tenant whose system prompt this request starts with
    session: str | None = None  # conversation id from a recorded trace (synthetic workloads leave it None)
    prefix_blocks: list[int] | None = None  # block ids of prefix_block_tokens tokens (see the module docstring)
    prefix_block_tokens: int | None = None


class TraceFormatError(ValueError):
    """A trace file is malformed; the message names the file, the line and the field."""


FIELDS = ("arrival_s", "input_len", "output_len", "prompt_tokens", "prefix_group", "session", "prefix_blocks",
          "prefix_block_tokens")  # fmt: skip


def request_dict(r: TraceRequest) -> dict[str, Any]:
    """The JSON object of one line; ``None`` optional fields are left out."""
    obj: dict[str, Any] = {"arrival_s": r.arrival_s, "input_len": r.input_len, "output_len": r.output_len}
    if r.prompt_tokens is not None:
        obj["prompt_tokens"] = r.prompt_tokens
    if r.prefix_group is not None:
        obj["prefix_group"] = r.prefix_group
    if r.session is not None:
        obj["session"] = r.session
    if r.prefix_blocks is not None:
        obj["prefix_blocks"] = r.prefix_blocks
        obj["prefix_block_tokens"] = r.prefix_block_tokens
    return obj


def save_trace(trace: Iterable[TraceRequest], path: str | Path) -> None:
    """Write ``trace`` as JSON lines, atomically: a failure half-way leaves ``path`` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tmp.open("w") as f:
            for r in trace:
                f.write(json.dumps(request_dict(r), separators=(",", ":"), allow_nan=False) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and set(map(type, v)) <= {int} and (not v or min(v) >= 0)


def parse_request(obj: Any, where: str) -> TraceRequest:
    """One line's object → a :class:`TraceRequest`; ``where`` (``file:line``) starts every error message."""

    def bad(field: str, expected: str) -> TraceFormatError:
        return TraceFormatError(f"{where}: field {field!r}: expected {expected}, got {obj.get(field)!r}"[:400])

    if not isinstance(obj, dict):
        raise TraceFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise TraceFormatError(f"{where}: unknown field(s) {unknown}; valid: {list(FIELDS)}")
    for field in ("arrival_s", "input_len", "output_len"):
        if field not in obj:
            raise TraceFormatError(f"{where}: field {field!r}: missing")
    t = obj["arrival_s"]
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
        raise bad("arrival_s", "a finite number >= 0")
    for field in ("input_len", "output_len"):
        if not _is_int(obj[field]) or obj[field] < 1:
            raise bad(field, "an integer >= 1")
    n = obj["input_len"]
    tokens = obj.get("prompt_tokens")
    if tokens is not None:
        if not _int_list(tokens):
            raise TraceFormatError(f"{where}: field 'prompt_tokens': expected a list of integers >= 0")
        if len(tokens) != n:
            raise TraceFormatError(f"{where}: field 'prompt_tokens': {len(tokens)} tokens but input_len is {n}")
    blocks, block_tokens = obj.get("prefix_blocks"), obj.get("prefix_block_tokens")
    if blocks is not None:
        if tokens is not None:
            raise TraceFormatError(f"{where}: field 'prefix_blocks': give prompt_tokens or prefix_blocks, not both")
        if not _int_list(blocks):
            raise TraceFormatError(f"{where}: field 'prefix_blocks': expected a list of integers >= 0")
        if not _is_int(block_tokens) or block_tokens < 1:
            raise bad("prefix_block_tokens", "an integer >= 1 (required with prefix_blocks)")
        if (len(blocks) - 1) * block_tokens >= n:
            raise TraceFormatError(
                f"{where}: field 'prefix_blocks': {len(blocks)} blocks of {block_tokens} tokens is more than "
                f"input_len {n} needs ({math.ceil(n / block_tokens)})"
            )
    elif block_tokens is not None:
        raise TraceFormatError(f"{where}: field 'prefix_block_tokens': given without prefix_blocks")
    group = obj.get("prefix_group")
    if group is not None and not _is_int(group):
        raise bad("prefix_group", "an integer or null")
    session = obj.get("session")
    if session is not None and not isinstance(session, str):
        raise bad("session", "a string or null")
    return TraceRequest(float(t), tokens, n, obj["output_len"], group, session, blocks, block_tokens)


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSON-lines trace (see :func:`save_trace`). Blank lines are skipped; arrivals must not go backwards.

    Raises :class:`TraceFormatError` naming the file, line number and field of the first bad line.
    """
    trace: list[TraceRequest] = []
    with Path(path).open("rb") as f:  # bytes: a line that is not UTF-8 is an error naming its line
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            except UnicodeDecodeError as e:
                raise TraceFormatError(f"{where}: not UTF-8 text ({e.reason})") from None
            req = parse_request(obj, where)
            if trace and req.arrival_s < trace[-1].arrival_s:
                raise TraceFormatError(
                    f"{where}: field 'arrival_s': {req.arrival_s} is before the previous line's "
                    f"{trace[-1].arrival_s}; traces must be sorted by arrival time"
                )
            trace.append(req)
    return trace

"""Chained hashes of full blocks, as vLLM's automatic prefix caching computes them (in shape): the one block hash
of kvscale, for token blocks (the simulator's prefix cache, the router's KV-event index) and for character blocks
(the router's approximate prefix index, which does not tokenize).

Block ``i`` covers items ``[i*B, (i+1)*B)``; its hash covers its parent's hash, its content and optional extra
keys (e.g. a LoRA name), so equal hashes mean equal *prefixes*, not just equal blocks. Only full blocks are hashed,
and every chain starts from :data:`ROOT_HASH`. We use xxh3-64 (fast, stable across processes); vLLM uses sha256,
so our hashes never equal the engine's — the router maps engine hashes to ours as KV events arrive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

ROOT_HASH = 0x6B7673636C65  # parent of the first block ("kvscle")


def block_hashes(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    *,
    parent: int = ROOT_HASH,
    start_block: int = 0,
    extra: bytes = b"",
) -> list[int]:
    """Hashes of the full blocks of ``token_ids`` from block ``start_block`` on, chained from ``parent``.

    ``parent`` must be the hash of block ``start_block - 1`` (or ``ROOT_HASH`` when ``start_block`` is 0), which
    lets callers extend a request's hashes incrementally as tokens are appended.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_full = len(token_ids) // block_size
    if n_full <= start_block:
        return []
    arr = np.asarray(token_ids[start_block * block_size : n_full * block_size], dtype=np.int64)
    raw = arr.tobytes()
    step = block_size * 8
    out: list[int] = []
    h = parent
    digest = xxhash.xxh3_64_intdigest
    for off in range(0, len(raw), step):
        h = digest(h.to_bytes(8, "little") + raw[off : off + step] + extra)
        out.append(h)
    return out


def text_block_hashes(text: str, block_chars: int, max_blocks: int | None = None) -> list[int]:
    """Hashes of the full ``block_chars``-character blocks of ``text`` (at most ``max_blocks``), chained from
    :data:`ROOT_HASH`: for a router that routes on the prompt text before any tokenizer has seen it."""
    if block_chars <= 0:
        raise ValueError(f"block_chars must be positive, got {block_chars}")
    n = len(text) // block_chars
    if max_blocks is not None:
        n = min(n, max_blocks)
    digest = xxhash.xxh3_64_intdigest
    out: list[int] = []
    h = ROOT_HASH
    for i in range(n):
        h = digest(text[i * block_chars : (i + 1) * block_chars].encode("utf-8", "surrogatepass"), seed=h)
        out.append(h)
    return out

"""Chained hashes of full token blocks, as vLLM's automatic prefix caching computes them (in shape).

Block ``i`` covers tokens ``[i*B, (i+1)*B)``; its hash covers its parent's hash, its tokens and optional extra
keys (e.g. a LoRA name), so equal hashes mean equal *prefixes*, not just equal blocks. Only full blocks are hashed.
We use xxh3-64 (fast, stable across processes); vLLM uses sha256, so our hashes never equal the engine's — the
router maps engine hashes to ours as KV events arrive.
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

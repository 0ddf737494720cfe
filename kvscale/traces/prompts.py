"""Prompts of prefix-block traces: each block id becomes a deterministic run of token ids.

A trace that records prompts as chains of block ids (``prefix_blocks``, e.g. Mooncake's 512-token ``hash_ids``)
is replayed by giving each id its own token ids, always the same for the same id: two prompts then share exactly
the tokens the trace says they share, and an engine's prefix cache (any block size) or a router's block hashes see
that sharing, no more (ids never collide into equal tokens by chance: 64-bit mixing) and no less.

:class:`BlockPrompt` is such a prompt as the simulator's engine takes it (``len``, slices, ``block_hashes``). Its
block hashes are those of the expanded token ids (:func:`kvscale.hashing.block_hashes`), computed once per distinct
prefix chain through a :class:`PrefixBlocks` cache, so a 15k-token prompt whose prefix was seen before costs a
few dictionary lookups rather than hashing 15k tokens again.
"""

from __future__ import annotations

import numpy as np

from kvscale.hashing import ROOT_HASH, block_hashes

TOKEN_ID_LOW = 100  # synthetic token ids are drawn from [TOKEN_ID_LOW, TOKEN_ID_HIGH): valid for most vocabs
TOKEN_ID_HIGH = 30000
_SPAN = np.uint64(TOKEN_ID_HIGH - TOKEN_ID_LOW)
_TAIL_SALT = np.uint64(0xD1B54A32D192ED03)  # separates a request's unique tail from every block id


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, element-wise on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def block_token_ids(block_id: int, n: int, *, salt: int = 0) -> np.ndarray:
    """The first ``n`` token ids of block ``block_id`` (int64, in ``[TOKEN_ID_LOW, TOKEN_ID_HIGH)``)."""
    with np.errstate(over="ignore"):
        base = _mix(np.array([block_id], dtype=np.uint64) ^ np.uint64(salt))[0]
        x = _mix(np.arange(n, dtype=np.uint64) + base * np.uint64(0x9E3779B97F4A7C15))
    return (x % _SPAN).astype(np.int64) + TOKEN_ID_LOW


def expand_tokens(blocks: list[int], block_tokens: int, length: int, salt: int) -> np.ndarray:
    """All ``length`` token ids of a prefix-block prompt: the blocks' runs, then (past the blocks) a tail unique
    to ``salt`` (e.g. the request's index in its trace). Equal to concatenating :func:`block_token_ids` runs, in
    one vectorized pass."""
    nb = len(blocks)
    tail = max(length - nb * block_tokens, 0)
    with np.errstate(over="ignore"):
        bases = _mix(np.array(blocks, dtype=np.uint64)) if nb else np.zeros(0, dtype=np.uint64)
        if tail:
            bases = np.append(bases, _mix(np.array([salt], dtype=np.uint64) ^ _TAIL_SALT))
        sizes = [block_tokens] * nb + ([tail] if tail else [])
        if nb:
            sizes[nb - 1] = min(block_tokens, length - (nb - 1) * block_tokens)
        sizes_a = np.array(sizes, dtype=np.int64)
        starts = np.repeat(np.cumsum(sizes_a) - sizes_a, sizes_a)
        offsets = np.arange(int(sizes_a.sum()), dtype=np.uint64) - starts.astype(np.uint64)
        x = _mix(offsets + np.repeat(bases, sizes_a) * np.uint64(0x9E3779B97F4A7C15))
    return (x % _SPAN).astype(np.int64) + TOKEN_ID_LOW


class PrefixBlocks:
    """Expands prefix-block prompts; caches the engine-block hashes of every prefix chain it has seen.

    One instance serves one replay (the cache grows with the trace's distinct chains: a few ints per engine block
    of each distinct trace block)."""

    def __init__(self) -> None:
        self._hashes: dict[tuple[int, int, int, int], tuple[int, ...]] = {}

    def hashes(self, blocks: list[int], block_tokens: int, length: int, salt: int, block_size: int) -> list[int]:
        """Chained hashes of the prompt's full ``block_size`` blocks, equal to hashing :meth:`tokens`."""
        if block_tokens % block_size:  # engine blocks straddle trace blocks: hash the expanded tokens
            return block_hashes(expand_tokens(blocks, block_tokens, length, salt), block_size)
        out: list[int] = []
        parent = ROOT_HASH
        for i, b in enumerate(blocks):
            n = min(block_tokens, length - i * block_tokens)
            key = (parent, b, n, block_size)
            hs = self._hashes.get(key)
            if hs is None:
                hs = tuple(block_hashes(block_token_ids(b, n), block_size, parent=parent))
                self._hashes[key] = hs
            out.extend(hs)
            if n < block_tokens or not hs:
                return out  # a partial last block; nothing follows it
            parent = hs[-1]
        tail = length - len(blocks) * block_tokens
        if tail >= block_size:
            out.extend(block_hashes(block_token_ids(salt, tail, salt=int(_TAIL_SALT)), block_size, parent=parent))
        return out


class BlockPrompt:
    """A prefix-block prompt as the engine takes it: its length, token slices on demand, its block hashes."""

    __slots__ = ("block_tokens", "blocks", "expander", "length", "salt")

    def __init__(self, blocks: list[int], block_tokens: int, length: int, salt: int, expander: PrefixBlocks):
        self.blocks, self.block_tokens, self.length, self.salt = blocks, block_tokens, length, salt
        self.expander = expander

    def __len__(self) -> int:
        return self.length

    def token_ids(self) -> list[int]:
        return expand_tokens(self.blocks, self.block_tokens, self.length, self.salt).tolist()

    def __getitem__(self, s: slice) -> list[int]:
        start, stop, step = s.indices(self.length)
        if step != 1 or stop <= start:
            return self.token_ids()[s]
        bt = self.block_tokens
        first, last = start // bt, min((stop - 1) // bt, len(self.blocks))  # only the trace blocks it covers
        blocks = self.blocks[first:last + 1]
        n = min(self.length, (last + 1) * bt) - first * bt
        if last < len(self.blocks):
            run = expand_tokens(blocks, bt, n, self.salt)
        else:  # reaches the unique tail: expand from `first` on with the same tail (offsets kept)
            run = expand_tokens(self.blocks, bt, self.length, self.salt)[first * bt :]
        return run[start - first * bt : stop - first * bt].tolist()

    def block_hashes(self, block_size: int) -> list[int]:
        return self.expander.hashes(self.blocks, self.block_tokens, self.length, self.salt, block_size)

"""Which backend holds which KV block, keyed by *our* chained block hashes (``kvscale.hashing``).

Engines publish their own block hashes (vLLM: low 64 bits of sha256 over pickled tuples, seeded per process; the
simulator: xxh3). We never compare those across engines or with ours. Instead every ``BlockStored`` event carries
the block's token ids and its parent's engine hash, so we recompute our hash of each block from the parent's (already
mapped) hash and the tokens, and remember ``engine hash -> our hash`` per backend. A request is then hashed once
with our function and looked up directly.

Memory is bounded: each backend keeps at most ``max_blocks_per_backend`` engine hashes (an engine cannot hold more
blocks than its KV cache has; the cap only bites when removals were missed), evicting the least recently stored.
The global map ``our hash -> {backend: count}`` only holds entries some backend's map points at.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from kvscale.hashing import ROOT_HASH, block_hashes
from kvscale.kv_events import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEvent

DEFAULT_MAX_BLOCKS_PER_BACKEND = 262_144  # above any single engine's KV cache we expect (H100 8B: ~26k blocks)


def lora_extra(lora_name: str | None) -> bytes:
    """Extra hash input that keeps a LoRA adapter's blocks apart from the base model's (as engines do)."""
    return lora_name.encode() if lora_name else b""


def request_hashes(token_ids: list[int], block_size: int, lora_name: str | None = None) -> list[int]:
    """Our hashes of a prompt's full blocks: what :meth:`KVBlockIndex.match` takes."""
    return block_hashes(token_ids, block_size, extra=lora_extra(lora_name))


@dataclass
class IndexStats:
    stored_blocks: int = 0
    removed_blocks: int = 0
    unmapped_blocks: int = 0  # BlockStored whose parent we never saw (joined late or missed events)
    cleared: int = 0  # AllBlocksCleared or a backend reset
    evicted_blocks: int = 0  # dropped by the per-backend cap


@dataclass
class _Backend:
    # engine hash -> [our hash, number of engine blocks carrying it]; insertion order = least recently stored first
    engine: OrderedDict[BlockHash, list[int]] = field(default_factory=OrderedDict)
    block_size: int | None = None


class KVBlockIndex:
    """Block-level index over all backends, fed by decoded KV events. Not thread-safe: one event loop owns it."""

    def __init__(self, max_blocks_per_backend: int = DEFAULT_MAX_BLOCKS_PER_BACKEND) -> None:
        if max_blocks_per_backend <= 0:
            raise ValueError("max_blocks_per_backend must be positive")
        self.max_blocks_per_backend = max_blocks_per_backend
        self._backends: dict[str, _Backend] = {}
        self._holders: dict[int, dict[str, int]] = {}
        self.stats = IndexStats()

    # -- updates -------------------------------------------------------------------------------------------------
    def apply(self, backend: str, event: KVEvent) -> None:
        if isinstance(event, BlockStored):
            self._stored(backend, event)
        elif isinstance(event, BlockRemoved):
            self._removed(backend, event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            self.clear(backend)

    def _stored(self, backend: str, ev: BlockStored) -> None:
        b = self._backends.setdefault(backend, _Backend())
        bs = ev.block_size
        if bs <= 0:
            self.stats.unmapped_blocks += len(ev.block_hashes)
            return
        b.block_size = bs
        if ev.parent_block_hash is None:
            parent = ROOT_HASH
        else:
            entry = b.engine.get(ev.parent_block_hash)
            if entry is None:
                self.stats.unmapped_blocks += len(ev.block_hashes)
                return
            parent = entry[0]
        ours = block_hashes(ev.token_ids, bs, parent=parent, extra=lora_extra(ev.lora_name))
        engine = b.engine
        for eh, oh in zip(ev.block_hashes, ours, strict=False):
            entry = engine.get(eh)
            if entry is not None:
                entry[1] += 1
                engine.move_to_end(eh)
                continue
            engine[eh] = [oh, 1]
            holders = self._holders.get(oh)
            if holders is None:
                self._holders[oh] = {backend: 1}
            else:
                holders[backend] = holders.get(backend, 0) + 1
        self.stats.stored_blocks += len(ours)
        self.stats.unmapped_blocks += max(0, len(ev.block_hashes) - len(ours))
        while len(engine) > self.max_blocks_per_backend:
            _, (oh, _) = engine.popitem(last=False)
            self._release(backend, oh)
            self.stats.evicted_blocks += 1

    def _removed(self, backend: str, hashes: list[BlockHash]) -> None:
        b = self._backends.get(backend)
        if b is None:
            return
        for eh in hashes:
            entry = b.engine.get(eh)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] <= 0:
                del b.engine[eh]
                self._release(backend, entry[0])
            self.stats.removed_blocks += 1

    def _release(self, backend: str, our: int) -> None:
        holders = self._holders.get(our)
        if holders is None:
            return
        n = holders.get(backend, 0) - 1
        if n > 0:
            holders[backend] = n
        else:
            holders.pop(backend, None)
            if not holders:
                del self._holders[our]

    def clear(self, backend: str) -> None:
        """Forget everything ``backend`` holds (AllBlocksCleared, a restart, or an unrecoverable gap)."""
        b = self._backends.get(backend)
        if b is None:
            return
        for oh, _ in b.engine.values():
            self._release(backend, oh)
        b.engine.clear()
        self.stats.cleared += 1

    def remove_backend(self, backend: str) -> None:
        self.clear(backend)
        self._backends.pop(backend, None)

    # -- queries -------------------------------------------------------------------------------------------------
    def match(self, hashes: list[int]) -> dict[str, int]:
        """Backend -> number of leading blocks of ``hashes`` it holds (backends holding none are absent)."""
        if not hashes:
            return {}
        first = self._holders.get(hashes[0])
        if not first:
            return {}
        active = set(first)
        out: dict[str, int] = {}
        holders_of = self._holders
        for i in range(1, len(hashes)):
            hs = holders_of.get(hashes[i])
            if not hs:
                for b in active:
                    out[b] = i
                return out
            gone = [b for b in active if b not in hs]
            for b in gone:
                out[b] = i
                active.discard(b)
            if not active:
                return out
        for b in active:
            out[b] = len(hashes)
        return out

    def block_size(self, backend: str) -> int | None:
        """The block size ``backend``'s events use (None before its first BlockStored)."""
        b = self._backends.get(backend)
        return b.block_size if b else None

    def backend_blocks(self, backend: str) -> int:
        b = self._backends.get(backend)
        return len(b.engine) if b else 0

    @property
    def num_blocks(self) -> int:
        """Distinct (our) block hashes held by at least one backend."""
        return len(self._holders)

    @property
    def backends(self) -> list[str]:
        return list(self._backends)

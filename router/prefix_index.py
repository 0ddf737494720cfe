"""A bounded index from prompt-block hash to the backends that recently served that prefix (approximate).

An ``OrderedDict`` in LRU order: every insert or hit moves the block to the end; past ``capacity`` entries the
oldest blocks go. Memory is therefore bounded by ``capacity`` x (one entry + a few backend refs), whatever the
traffic (vLLM production-stack #687 ran out of memory with an unbounded trie). Each entry keeps at most
``max_backends_per_block`` backend URLs (most recent last).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

__all__ = ["PrefixIndex"]


class PrefixIndex:
    def __init__(self, capacity: int = 200_000, max_backends_per_block: int = 4) -> None:
        if capacity < 1:
            raise ValueError(f"prefix index capacity must be ≥ 1, got {capacity}")
        self.capacity = capacity
        self.max_backends = max_backends_per_block
        self._entries: OrderedDict[int, tuple[str, ...]] = OrderedDict()
        self.lookup_blocks = 0  # blocks asked about (for the hit-rate estimate)
        self.hit_blocks = 0  # of which the best candidate had cached
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, hashes: Sequence[int], backends: Iterable[str]) -> dict[str, int]:
        """For each backend URL: how many leading blocks of ``hashes`` it served recently (its prefix match)."""
        alive = set(backends)
        matched = dict.fromkeys(alive, 0)
        entries = self._entries
        for i, h in enumerate(hashes):
            holders = entries.get(h)
            if holders is None:
                break
            alive.intersection_update(holders)
            if not alive:
                break
            for url in alive:
                matched[url] = i + 1
        return matched

    def record_lookup(self, total_blocks: int, best_matched: int) -> None:
        self.lookup_blocks += total_blocks
        self.hit_blocks += best_matched

    @property
    def hit_rate(self) -> float:
        """Estimated prefix-cache hit rate: matched blocks / looked-up blocks, over the router's life."""
        return self.hit_blocks / self.lookup_blocks if self.lookup_blocks else 0.0

    def insert(self, hashes: Iterable[int], backend: str) -> None:
        """Record that ``backend`` now holds every block of ``hashes``."""
        entries = self._entries
        for h in hashes:
            holders = entries.get(h)
            if holders is None:
                entries[h] = (backend,)
            else:
                if holders[-1] != backend:
                    rest = tuple(u for u in holders if u != backend)
                    entries[h] = (*rest[-(self.max_backends - 1) :], backend) if self.max_backends > 1 else (backend,)
                entries.move_to_end(h)
        while len(entries) > self.capacity:
            entries.popitem(last=False)
            self.evictions += 1

    def remove_backend(self, backend: str) -> None:
        """Forget a backend (it left the pool); O(entries), called on membership changes only."""
        for h, holders in list(self._entries.items()):
            if backend in holders:
                rest = tuple(u for u in holders if u != backend)
                if rest:
                    self._entries[h] = rest
                else:
                    del self._entries[h]

"""Scorer ``prefix``: approximate prefix-cache affinity, and the ``prefix`` policy.

The prompt (chat messages rendered to one string) is cut into ``block_chars``-character blocks hashed as a
chain (:meth:`RequestContext.block_hashes`); the app's bounded :class:`~router.prefix_index.PrefixIndex` maps a
block hash to the backends that recently served it. Score = longest matched prefix / prompt blocks. The index
learns in ``on_response_start`` (the backend accepted the request, so it now caches the prefix).

The ``prefix`` policy combines it with load: the ``bounded-load`` filter first removes overloaded backends (so a
hot prefix spreads once its pod is over the bound), then prefix (weight 2) + least-request (weight 1) rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.policies.base import Scorer


class PrefixScorer(Scorer):
    name = "prefix"

    @dataclass(frozen=True)
    class Config:
        block_chars: int = 64  # ≈ 16 tokens of English text
        max_blocks: int = 512  # hash at most this many leading blocks (bounds CPU on huge prompts)
        min_match_blocks: int = 1  # matches shorter than this score 0

        def validate(self) -> None:
            if self.block_chars < 1 or self.max_blocks < 1 or self.min_match_blocks < 1:
                raise ValueError("block_chars, max_blocks and min_match_blocks must be ≥ 1")

    def _hashes(self, ctx):
        return ctx.block_hashes(self.config.block_chars, self.config.max_blocks)

    def score(self, ctx, backends):
        index = self.services.prefix_index
        hashes = self._hashes(ctx)
        if index is None or not hashes:
            return dict.fromkeys(backends, 0.0)
        by_url = {b.url: b for b in backends}
        matched = index.match(hashes, by_url)
        n = len(hashes)
        index.record_lookup(n, max(matched.values(), default=0))
        floor = self.config.min_match_blocks
        return {by_url[u]: (m / n if m >= floor else 0.0) for u, m in matched.items()}

    def on_response_start(self, ctx, backend) -> None:
        index = self.services.prefix_index
        if index is not None:
            index.insert(self._hashes(ctx), backend.url)


PLUGINS = (PrefixScorer,)
POLICIES = {
    "prefix": {
        "filters": [{"type": "bounded-load"}],
        "scorers": [{"type": "prefix", "weight": 2.0}, {"type": "least-request", "weight": 1.0}],
    }
}

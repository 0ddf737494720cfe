"""Scorer ``least-request``: fewer router-counted in-flight requests score higher (exact and instant).

Score = 1 - in_flight / max(in_flight over the candidates); all idle → all 1.
"""

from __future__ import annotations

from router.policies.base import Scorer


class LeastRequestScorer(Scorer):
    name = "least-request"

    def score(self, ctx, backends):
        peak = max(b.in_flight for b in backends)
        if peak <= 0:
            return dict.fromkeys(backends, 1.0)
        return {b: 1.0 - b.in_flight / peak for b in backends}


PLUGINS = (LeastRequestScorer,)
POLICIES = {"least-request": {"scorers": [{"type": "least-request"}]}}

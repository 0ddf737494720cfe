"""Scorer ``session-affinity``: requests of one conversation (header ``x-session-id``) stick to one backend, by
consistent hashing with bounded loads.

Each backend gets a rendezvous (highest-random-weight) rank for the session id, so adding or removing a backend
only moves the sessions that ranked it first. The session's backend is the first in rank order whose in-flight
count stays within ``load_factor`` x the mean (+1 for the new request) — Mirrokni et al.'s bound — so a session
sticks unless its backend is overloaded or gone, and then moves to its next-ranked backend, deterministically.
That backend scores 1, the others 0; requests without the header score 0 everywhere (neutral).
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from router.policies.base import Scorer

SESSION_HEADER = "x-session-id"


def rendezvous_order(session: str, urls: list[str]) -> list[str]:
    """Backend URLs in the session's preference order (stable under membership changes)."""
    key = session.encode()
    return sorted(urls, key=lambda u: xxhash.xxh3_64_intdigest(key, seed=xxhash.xxh32_intdigest(u.encode())),
                  reverse=True)  # fmt: skip


class SessionAffinityScorer(Scorer):
    name = "session-affinity"

    @dataclass(frozen=True)
    class Config:
        header: str = SESSION_HEADER
        load_factor: float = 1.25

        def validate(self) -> None:
            if self.load_factor < 1.0:
                raise ValueError("load_factor must be >= 1")

    def choose(self, session: str, backends) -> object | None:
        if not backends:
            return None
        by_url = {b.url: b for b in backends}
        mean = (sum(b.in_flight for b in backends) + 1) / len(backends)
        bound = max(1.0, self.config.load_factor * mean)
        order = rendezvous_order(session, list(by_url))
        for url in order:
            if by_url[url].in_flight + 1 <= bound:
                return by_url[url]
        return by_url[order[0]]

    def score(self, ctx, backends):
        session = ctx.headers.get(self.config.header) if ctx.headers is not None else None
        if not session:
            return dict.fromkeys(backends, 0.0)
        chosen = self.choose(session, backends)
        ctx.state["session_backend"] = getattr(chosen, "url", None)
        return {b: 1.0 if b is chosen else 0.0 for b in backends}


PLUGINS = (SessionAffinityScorer,)
POLICIES = {
    "session-affinity": {
        "scorers": [{"type": "session-affinity", "weight": 2.0}, {"type": "least-request", "weight": 1.0}],
    }
}

"""The ``best`` preset: the combination ``kvscale bench routing`` chose (docs/routing.md has the figures).

Precise prefix affinity from the engines' KV events (weight 2) + predicted TTFT/ITL against the request's SLO
(weight 1, reading cached prefixes from the same KV-event index) + in-flight load (weight 1), behind a bounded-load
filter so a hot prefix still spreads when its pod runs 1.5x the mean. The ``slo`` scorer uses the built-in latency
model unless a ``--policy-config`` file redefines ``best`` with the profiled artifact of your pods
(``kvscale profile fit``); the ``kv-events`` scorer reads each pod's ZMQ publisher on port 5557 (vLLM's
``--kv-events-config`` example) unless the backend carries a ``kv-events`` label.
"""

from __future__ import annotations

from typing import Any

POLICIES: dict[str, Any] = {
    "best": {
        "filters": [{"type": "bounded-load", "config": {"factor": 1.5, "slack": 2}}],
        "scorers": [
            {"type": "kv-events", "weight": 2.0},
            {"type": "slo", "weight": 1.0, "config": {"kv_events": {}}},
            {"type": "least-request", "weight": 1.0},
        ],
    }
}

"""The decision loops' schedule: each ScaledObject on its own phase, so many do not scrape all at once."""

from __future__ import annotations

import itertools

import pytest

from kvscale.latency import load_latency_model
from scaler.metadata import parse_scaler_metadata
from scaler.policy import ScalingPolicy
from scaler.service import Tracker, _next_tick


def test_next_tick_is_on_the_phase_grid_at_least_half_an_interval_away():
    assert _next_tick(100.0, 5.0, 1.0) == pytest.approx(106.0)  # 101 is only 1 s away: skip to 106
    assert _next_tick(100.0, 5.0, 3.0) == pytest.approx(103.0)
    t, ticks = 0.3, []
    for _ in range(5):
        t = _next_tick(t, 5.0, 2.0)
        ticks.append(t)
    assert ticks == pytest.approx([7.0, 12.0, 17.0, 22.0, 27.0])


def test_twenty_scaledobjects_spread_over_the_interval():
    s = parse_scaler_metadata({"pool": "aggregated", "model": "m", "podUrls": "http://x/metrics"})
    model = load_latency_model("llama-3.1-8b-h100")
    phases = sorted(Tracker(("bench", f"so-{i}"), s, None, ScalingPolicy(s, model), None, lambda: 0.0).phase_s
                    for i in range(20))  # type: ignore[arg-type]  # fmt: skip
    assert all(0.0 <= p < s.signal_interval_s for p in phases)
    gaps = [b - a for a, b in itertools.pairwise(phases)]
    assert max(gaps) < s.signal_interval_s / 3  # no big empty stretch: the work is spread, not bunched

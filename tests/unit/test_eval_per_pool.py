"""P/D figures of the scaling evaluation: GPU-hours, most replicas and reversals (oscillations) per pool."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scaler.evaluate.run import REVERSAL_S, _per_pool


def test_reversals_count_only_quick_changes_of_direction():
    # prefill: 2 -> 1 -> 2 -> 1 within a minute and a half (two reversals), later 1 -> 3 after a long hold (none);
    # decode: 1 -> 2 -> 3 -> 2 with the last change long after the previous (none)
    timeline = [(0.0, "prefill", 2, 2), (0.0, "decode", 1, 1), (30.0, "prefill", 1, 1), (60.0, "prefill", 2, 2),
                (90.0, "prefill", 1, 1), (90.0 + 2 * REVERSAL_S, "prefill", 3, 3), (100.0, "decode", 2, 2),
                (200.0, "decode", 3, 3), (200.0 + REVERSAL_S, "decode", 2, 2)]  # fmt: skip
    timeline.sort(key=lambda e: e[0])
    result = SimpleNamespace(timeline=timeline, replica_seconds={"prefill": 7200.0, "decode": 3600.0})
    got = _per_pool(result, ("prefill", "decode"), gpus=2)  # type: ignore[arg-type]
    assert got["reversals_per_pool"] == {"prefill": 2, "decode": 0}
    assert got["max_replicas_per_pool"] == {"prefill": 3, "decode": 3}
    assert got["gpu_hours_per_pool"] == pytest.approx({"prefill": 4.0, "decode": 2.0})

"""The decision loops' schedule: each ScaledObject on its own phase, so many do not scrape all at once; and the
service's registration reads a ScaledObject's latency-model file once."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

import scaler.metadata
from kvscale.latency import load_latency_model
from protos import externalscaler_pb2 as pb
from scaler.metadata import parse_scaler_metadata
from scaler.policy import ScalingPolicy
from scaler.service import LatencyModels, ScalerService, ServeOptions, Tracker, _next_tick


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


async def test_a_new_scaledobject_loads_its_latency_model_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "model.json"
    path.write_text(load_latency_model("llama-3.1-8b-h100").dumps())
    loaded: list[str] = []

    def load(spec: str):
        loaded.append(spec)
        return load_latency_model(spec)

    def no_direct_load(spec: str):
        raise AssertionError("the metadata validation loaded the model outside the service's cache")

    monkeypatch.setattr(scaler.metadata, "load_latency_model", no_direct_load)
    service = ScalerService(options=ServeOptions(parse_workers=0))
    service.models = LatencyModels(load=load)
    await service.start()
    try:
        md = {"pool": "aggregated", "model": "m", "podUrls": "http://127.0.0.1:9/metrics", "latencyModel": str(path)}
        first = service.tracker(pb.ScaledObjectRef(name="a", namespace="llm", scalerMetadata=md))
        assert loaded == [str(path)]  # validated and used: one read
        service.tracker(pb.ScaledObjectRef(name="b", namespace="llm", scalerMetadata=md))
        assert loaded == [str(path)]  # the same file for another ScaledObject: still one read
        st = path.stat()
        path.write_text(path.read_text().replace('"notes": "', '"notes": "edited '))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        third = service.tracker(pb.ScaledObjectRef(name="c", namespace="llm", scalerMetadata=md))
        assert loaded == [str(path)] * 2  # an edited file is read again
        assert third.policy.model is not first.policy.model
    finally:
        await service.stop()

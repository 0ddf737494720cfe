"""Scheduled floors (``scheduleFloors``): the cron windows (KEDA cron trigger semantics plus a cold-start lead),
their validation, and the policy never answering below an active floor."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from kvscale.latency import load_latency_model
from scaler.metadata import MetadataError, parse_scaler_metadata
from scaler.policy import ScalingPolicy
from scaler.schedule import FloorWindow, floor_at, parse_schedule_floors
from scaler.signals import PoolSignals

MODEL = load_latency_model("llama-3.1-8b-h100")


def at(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def test_window_is_active_from_start_to_the_next_end_with_the_lead():
    w = FloorWindow("0 8 * * 1-5", "0 18 * * 1-5", 6)  # weekdays 08:00-18:00 UTC
    assert not w.active(at("2026-12-01T07:59:59"))  # a Tuesday
    assert w.active(at("2026-12-01T08:00:00")) and w.active(at("2026-12-01T17:59:59"))
    assert not w.active(at("2026-12-01T18:00:00"))
    assert not w.active(at("2026-12-05T12:00:00"))  # Saturday
    # the lead: a cold start before 08:00 the floor is asked for, not before, and the end does not move
    assert w.active(at("2026-12-01T07:58:30"), lead_s=90) and not w.active(at("2026-12-01T07:58:29"), lead_s=90)
    assert not w.active(at("2026-12-01T18:00:00"), lead_s=90)
    # a window that spans midnight (start after end in the day)
    night = FloorWindow("0 22 * * *", "0 2 * * *", 3)
    assert night.active(at("2026-12-01T23:30:00")) and night.active(at("2026-12-02T01:59:00"))
    assert not night.active(at("2026-12-02T02:00:00")) and not night.active(at("2026-12-02T21:00:00"))


def test_time_zone_and_dst():
    w = FloorWindow("0 8 * * *", "0 9 * * *", 2, "Europe/Berlin")
    # 08:00 Berlin is 07:00 UTC in winter and 06:00 UTC in summer
    assert w.active(datetime(2026, 12, 1, 7, 30, tzinfo=UTC).timestamp())
    assert not w.active(datetime(2026, 12, 1, 6, 30, tzinfo=UTC).timestamp())
    assert w.active(datetime(2026, 7, 1, 6, 30, tzinfo=UTC).timestamp())
    assert w.active(at("2026-03-29T08:30:00", "Europe/Berlin"))  # the day clocks go forward


def test_the_floor_is_the_largest_active_window():
    ws = parse_schedule_floors('[{start: "0 8 * * *", end: "0 18 * * *", desiredReplicas: 4},'
                               ' {start: "0 12 * * *", end: "0 13 * * *", desiredReplicas: "9"}]')
    assert [floor_at(ws, at(f"2026-12-01T{h}")) for h in ("07:00", "09:00", "12:30", "13:00", "19:00")] == [
        0, 4, 9, 4, 0]  # fmt: skip
    assert parse_schedule_floors("") == ()
    block = "- start: 0 8 * * *\n  end: 0 18 * * *\n  desiredReplicas: 4\n  timezone: America/New_York\n"
    assert parse_schedule_floors(block) == (FloorWindow("0 8 * * *", "0 18 * * *", 4, "America/New_York"),)


@pytest.mark.parametrize("text, message", [
    ('- {start: "0 8 * * *", end: "0 8 * * *", desiredReplicas: 2}', "start and end must differ"),
    ('- {start: "0 8 * *", end: "0 9 * * *", desiredReplicas: 2}', "not a 5-field cron"),
    ('- {start: "0 8 * * * *", end: "0 9 * * *", desiredReplicas: 2}', "not a 5-field cron"),
    ('- {start: "0 25 * * *", end: "0 9 * * *", desiredReplicas: 2}', "not a 5-field cron"),
    ('- {start: "0 0 31 2 *", end: "0 9 * * *", desiredReplicas: 2}', "never fires"),
    ('- {start: 8, end: "0 9 * * *", desiredReplicas: 2}', "must be a cron expression string"),
    ('- {start: "0 8 * * *", end: "0 9 * * *", desiredReplicas: -1}', "non-negative integer"),
    ('- {start: "0 8 * * *", end: "0 9 * * *", desiredReplicas: 1.5}', "non-negative integer"),
    ('- {start: "0 8 * * *", end: "0 9 * * *", desiredReplicas: 2, timezone: Mars/Olympus}', "unknown time zone"),
    ('- {start: "0 8 * * *", end: "0 9 * * *", desiredReplicas: 2, timezone: ../../etc/passwd}', "unknown time zone"),
    ('- {start: "0 8 * * *", end: "0 9 * * *", replicas: 2}', "unknown field 'replicas'"),
    ('- {start: "0 8 * * *", desiredReplicas: 2}', "end is required"),
    ("- {start: [}", "not YAML or JSON (line 1"),
    ("42", "expected a list of windows"),
    ("- 42", "window 1: expected a mapping"),
    ("[" + ",".join(['{start: "0 8 * * *", end: "0 9 * * *", desiredReplicas: 1}'] * 17) + "]", "at most 16"),
])  # fmt: skip
def test_bad_windows_name_the_window_and_field(text: str, message: str):
    with pytest.raises(MetadataError) as e:
        parse_scaler_metadata({"pool": "aggregated", "model": "m", "podUrls": "http://x", "scheduleFloors": text})
    assert message in str(e.value) and str(e.value).startswith("scalerMetadata.scheduleFloors: "), str(e.value)


def test_a_floor_above_max_replicas_is_refused():
    md = {"pool": "aggregated", "model": "m", "podUrls": "http://x", "maxReplicas": "8",
          "scheduleFloors": '- {start: "0 8 * * *", end: "0 9 * * *", desiredReplicas: 9}'}  # fmt: skip
    with pytest.raises(MetadataError, match=r"window 1: desiredReplicas 9 is above maxReplicas \(8\)"):
        parse_scaler_metadata(md)


def _sig(t: float, rate: float, replicas: int) -> PoolSignals:
    return PoolSignals(at=t, replicas=replicas, arrival_rate=rate, finish_rate=rate, prompt_tokens_per_s=rate * 1000,
                       generation_tokens_per_s=rate * 200, mean_isl=1000, mean_osl=200, prefix_hit_rate=0.0,
                       running=0.0, waiting=0.0, kv_usage=0.1, kv_usage_max=0.1)  # fmt: skip


@pytest.mark.parametrize("scale_to_zero", [False, True])
def test_policy_holds_the_floor_then_scales_down_after_the_end(scale_to_zero: bool):
    """Light load (1 replica's worth): 6 replicas from a cold start (90 s) before 08:00 to 08:30, then the normal
    scale-down; above the floor, demand still scales up; a signal error holds at least the floor."""
    md = {"pool": "aggregated", "model": "m", "podUrls": "http://x", "stableWindowSeconds": "60",
          "startupSeconds": "90", "scaleToZero": str(scale_to_zero).lower(),
          "scheduleFloors": '- {start: "0 8 * * *", end: "30 8 * * *", desiredReplicas: 6}'}  # fmt: skip
    t0 = at("2026-12-01T07:50:00")
    p = ScalingPolicy(parse_scaler_metadata(md), MODEL, wall_clock=lambda now: t0 + now)
    rate = 0.0 if scale_to_zero else 2.0
    seen, reasons = {}, {}
    for i in range(0, 3600 // 5):
        now = i * 5.0
        d = p.decide(now, _sig(now, rate, max(seen.get(now - 5.0, 1), 1)))
        seen[now], reasons[now] = d.desired, d.reason
    t = {k: v for k, v in seen.items()}
    assert t[600 - 95] == (0 if scale_to_zero else 1)  # 07:58:25, before the lead
    assert t[600 - 90] == 6 and p.floor(600 - 90) == 6  # 07:58:30: a cold start ahead of 08:00
    assert all(t[s] == 6 for s in range(510, 2400, 5))  # held to 08:30 whatever the load
    assert all(reasons[s] == "schedule-floor" for s in range(510, 2400, 5))  # and the floor is why, throughout
    assert t[2400 + 120] < 6  # after the end the stable window lets it go
    # demand above the floor still scales up, and a hold is never below the floor
    busy = ScalingPolicy(parse_scaler_metadata(md), MODEL, wall_clock=lambda now: t0 + now)
    d = None
    for i in range(120, 140):
        d = busy.decide(i * 5.0, _sig(i * 5.0, 200.0, 6))
    assert d is not None and d.desired > 6 and d.reason != "schedule-floor"
    # started inside a window: within its first stable window too, the floor is the reason the count holds
    inside = ScalingPolicy(parse_scaler_metadata(md), MODEL, wall_clock=lambda now: t0 + 600 + now)
    assert [inside.decide(t, _sig(t, rate, 6)).reason for t in (0.0, 5.0, 10.0)] == ["schedule-floor"] * 3
    held = ScalingPolicy(parse_scaler_metadata(md), MODEL, wall_clock=lambda now: t0 + now)
    held.decide(0.0, _sig(0.0, rate, 1))
    assert held.hold(900.0, "pods unreachable").desired == 6
    assert held.decide(905.0, _sig(905.0, rate, 6)).reason == "schedule-floor"

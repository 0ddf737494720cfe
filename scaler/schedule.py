"""Scheduled floors: a minimum replica count during known daily (or weekly) peaks, as KEDA's cron trigger gives.

The ``scheduleFloors`` metadata key holds a YAML (or JSON) list of windows with the fields of KEDA's cron trigger
(``start`` and ``end``: 5-field cron expressions, minute hour day-of-month month day-of-week; ``desiredReplicas``;
``timezone``: an IANA name, default UTC)::

    scheduleFloors: |
      - {start: "0 8 * * 1-5", end: "0 18 * * 1-5", desiredReplicas: 6, timezone: Europe/Berlin}

A window is active from a ``start`` firing to the first ``end`` firing after it (KEDA's rule: between start and
end; ``start`` equal to ``end`` is refused, as KEDA refuses it). One difference, on purpose: the floor is asked
for ``lead_s`` (the pool's ``startupSeconds``) *before* each start, so that its pods are ready at ``start`` rather
than starting then. While windows are active the floor is the largest of their ``desiredReplicas``; the scaling
policy never answers below it, and scales above it on demand as usual. After ``end`` the floor goes away and the
policy's own scale-down rules (stable window, burst hold, SLO re-check) bring the pool back down.

Cron arithmetic is :mod:`croniter`'s (time zones and DST through :mod:`zoneinfo`); nothing here reads a clock:
callers pass Unix seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import CroniterError, croniter

MAX_WINDOWS = 16
FIELDS = ("start", "end", "desiredReplicas", "timezone")


@dataclass(frozen=True)
class FloorWindow:
    """One window: at least ``replicas`` between a ``start`` and the next ``end`` firing, in ``timezone``."""

    start: str
    end: str
    replicas: int
    timezone: str = "UTC"

    def active(self, epoch_s: float, lead_s: float = 0.0) -> bool:
        """Whether ``epoch_s`` (Unix seconds) lies in ``[start - lead_s, end)`` of some firing of the window."""
        tz = ZoneInfo(self.timezone)
        # the latest start firing at or before epoch + lead (+1 s: croniter's get_prev is strict), then its end
        at = datetime.fromtimestamp(epoch_s + lead_s + 1.0, tz)
        s0 = croniter(self.start, at).get_prev(datetime)
        e0 = croniter(self.end, s0).get_next(float)
        return epoch_s < e0


def parse_schedule_floors(text: str) -> tuple[FloorWindow, ...]:
    """The windows of a ``scheduleFloors`` value (empty text: none); ValueError with the window and field."""
    if not text.strip():
        return ()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"not YAML or JSON{where}: {getattr(e, 'problem', None) or e}") from None
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list) or not doc:
        raise ValueError("expected a list of windows like [{start: '0 8 * * *', end: '0 18 * * *', "
                         "desiredReplicas: 4}]")
    if len(doc) > MAX_WINDOWS:
        raise ValueError(f"at most {MAX_WINDOWS} windows, got {len(doc)}")
    return tuple(_window(i, w) for i, w in enumerate(doc))


def _window(i: int, w: object) -> FloorWindow:
    where = f"window {i + 1}"
    if not isinstance(w, dict):
        raise ValueError(f"{where}: expected a mapping with {', '.join(FIELDS)}, got {type(w).__name__}")
    unknown = sorted(str(k) for k in w if k not in FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    for name in ("start", "end", "desiredReplicas"):
        if name not in w:
            raise ValueError(f"{where}: {name} is required")
    start, end = (_cron(where, name, w[name]) for name in ("start", "end"))
    if start == end:
        raise ValueError(f"{where}: start and end must differ (as in KEDA's cron trigger), both {start!r}")
    n = w["desiredReplicas"]
    if isinstance(n, str) and n.strip().isascii() and n.strip().isdigit():
        n = int(n)  # KEDA's cron trigger takes desiredReplicas as a string
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{where}: desiredReplicas must be a non-negative integer, got {n!r}")
    tz = w.get("timezone", "UTC")
    if not isinstance(tz, str) or not tz.strip():
        raise ValueError(f"{where}: timezone must be an IANA time zone name such as Europe/Berlin, got {tz!r}")
    try:
        ZoneInfo(tz.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{where}: unknown time zone {tz!r} (an IANA name such as Europe/Berlin)") from None
    window = FloorWindow(start, end, n, tz.strip())
    for name, expr in (("start", start), ("end", end)):
        try:  # a valid expression that never fires (Feb 31st) would never open or close the window
            croniter(expr, datetime(2026, 1, 1, tzinfo=ZoneInfo(window.timezone))).get_next(float)
        except CroniterError:
            raise ValueError(f"{where}: {name} {expr!r} never fires") from None
    return window


def _cron(where: str, name: str, expr: object) -> str:
    if not isinstance(expr, str):
        raise ValueError(f"{where}: {name} must be a cron expression string (quote it), got {expr!r}")
    e = " ".join(expr.split())
    if len(e.split(" ")) != 5 or not croniter.is_valid(e):
        raise ValueError(f"{where}: {name} {expr!r} is not a 5-field cron expression (minute hour dom month dow)")
    return e


def floor_at(windows: tuple[FloorWindow, ...], epoch_s: float, lead_s: float = 0.0) -> int:
    """The floor at ``epoch_s``: the largest ``desiredReplicas`` of the windows active then (0: none)."""
    return max((w.replicas for w in windows if w.active(epoch_s, lead_s)), default=0)

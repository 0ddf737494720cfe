"""Short-horizon demand forecast: Holt's linear (level + trend) smoothing with damped extrapolation.

Samples arrive at irregular times (signal reads, virtual ticks), so the smoothing weights come from time
constants: ``alpha = 1 - exp(-dt / level_tau_s)`` and likewise for the trend. The forecast over ``horizon_s``
(the pod cold start) extrapolates the trend with damping: ``level + trend * tau_d * (1 - exp(-h / tau_d))``, so
a trend counts fully over short horizons and saturates over long ones — a long startup does not turn noise in
the slope into a large over-provision.

Why Holt rather than a plain moving average or no forecast: on the diurnal traces the demand rises steadily
for tens of minutes, and a level-only smoother is late by about ``level_tau_s + startup``; the evaluation
(``kvscale eval scaling``, policy ``kvscale-noforecast``) shows the attainment this costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class HoltForecaster:
    """Holt level + damped trend, plus a plain exponential mean ``smoothed`` with the level's time constant.

    ``smoothed`` is the trend-free estimate of the present: after a sudden drop Holt's level stays *below* the new
    value for minutes (the negative trend keeps pulling its prediction down), so a planner should not size below
    ``smoothed``: ``max(smoothed, forecast(h))`` anticipates a rise and never undershoots after a fall.
    """

    level_tau_s: float = 20.0
    trend_tau_s: float = 120.0
    damping_tau_s: float = 90.0
    level: float | None = None
    trend: float = 0.0
    smoothed: float | None = None
    last_t: float | None = None

    def update(self, t: float, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"cannot smooth a non-finite value {value!r}")
        if self.level is None or self.last_t is None or self.smoothed is None:
            self.level, self.smoothed, self.last_t = value, value, t
            return
        dt = t - self.last_t
        if dt <= 0:
            return
        a = 1.0 - math.exp(-dt / self.level_tau_s)
        b = 1.0 - math.exp(-dt / self.trend_tau_s)
        self.smoothed += a * (value - self.smoothed)
        predicted = self.level + self.trend * dt
        new_level = predicted + a * (value - predicted)
        self.trend = self.trend + b * ((new_level - self.level) / dt - self.trend)
        self.level = max(0.0, new_level)
        self.last_t = t

    def forecast(self, horizon_s: float) -> float:
        """Value expected ``horizon_s`` from the last update (damped trend; never negative)."""
        if self.level is None:
            return math.nan
        h = max(0.0, horizon_s)
        gain = self.damping_tau_s * (1.0 - math.exp(-h / self.damping_tau_s)) if self.damping_tau_s > 0 else h
        return max(0.0, self.level + self.trend * gain)

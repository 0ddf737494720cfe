"""The scaling policy: pool signals → desired replicas. A plain object, called by the gRPC service's background
loop and by the virtual-clock evaluator alike (it never reads a clock: ``now`` is passed in).

Per decision (every signal interval):

1. **Demand**, forecast over the cold start (``startupSeconds``) with a damped Holt smoother of the arrival rate,
   in the pool's unit: uncached prefill tokens/s (prefill), generated tokens/s (decode), requests/s (aggregated).
2. **Capacity per replica** under the SLO from the latency model (``predictor.capacity``, through its memoizing
   :class:`~predictor.capacity.CapacityView`): prefill tokens/s with TTFT at the percentile ≤ SLO (M/D/1), decode
   tokens/s at the largest batch whose step meets the ITL SLO at the observed context, or the mixed requests/s of
   an aggregated replica. Divided by a bounded, smoothed observed/predicted latency correction (the model may be
   optimistic or pessimistic for this deployment).
3. **need** = demand ÷ capacity, plus corrections: a sustained, non-shrinking queue must drain within the TTFT
   budget plus the cold start with the planned (ready + starting) replicas; KV usage above ``kvUsageThreshold``
   asks for ``ready x usage ÷ threshold`` replicas. Demand is planned at ``max(smoothed rate, forecast)``.
4. **Stability**: scale up at once (at most ``maxScaleUpRate`` x per decision), or in *panic* (need on the latest
   interval ≥ ``panicThreshold`` x ready) to the latest need without waiting for the smoother; scale down only
   when the stable window is covered, to the largest need seen in it, at most ÷ ``maxScaleDownRate``, and only
   if a re-prediction with the smaller count (latency, KV usage) still meets the SLO — which is what prevents
   the 2↔1 oscillation of Dynamo's planner (N-1 pods would push KV usage over the threshold, so stay at N).
   **Recurring bursts** (:class:`BurstHold`): a burst is a run of decisions where the fast path or panic fired;
   when the latest gap between bursts was at most ``maxBurstHoldSeconds``, a scale-down looks back
   ``BURST_GAP_FACTOR`` x the longest recent gap (capped by ``maxBurstHoldSeconds``) instead of the stable window,
   so pods that a burst shorter than the cold start needed are still there when the next burst comes.
5. **Scheduled floors** (``scheduleFloors``, :mod:`scaler.schedule`): during a known peak's window (from a cold
   start before its ``start``) no answer is below the window's ``desiredReplicas`` (reason ``schedule-floor`` while
   the floor is what holds the count). ``wall_clock`` maps ``now`` to Unix seconds for the cron windows.
6. **Missing data** (a :class:`~scaler.signals.SignalError`): hold the last good decision (reason
   ``hold-signal-error``); before any good decision, hold the current replica count. Never treat it as idle.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from kvscale.latency import LatencyModel
from predictor.capacity import SLO, CapacityView, aggregated_mean_step_s, predict_prefill_ttft_s
from scaler.forecast import HoltForecaster
from scaler.metadata import ScalerSettings
from scaler.schedule import floor_at
from scaler.signals import PoolSignals

REASONS = (
    "hold-no-data",
    "hold-signal-error",
    "steady",
    "scale-up",
    "panic",
    "queue",
    "kv-cache",
    "rate-limited",
    "hold-stable-window",
    "hold-slo-check",
    "hold-burst",
    "scale-down",
    "scale-to-zero",
    "slo-unattainable",
    "max-replicas",
    "variant-split",
    "schedule-floor",
)
MIN_LATENCY_SAMPLES = 20  # observations needed before an observed percentile corrects the model
CORRECTION_DEADBAND = 1.1  # ratios within [1/x, x] count as "the model is right"
FAST_PATH_MARGIN = 1.2  # the panic-window need must exceed the smoothed one by this factor to act on it
BURST_GAP_FACTOR = 2.0  # hold burst capacity this multiple of the longest recent gap between bursts
BURST_GAPS = 3  # how many recent gaps between bursts the hold is sized from


@dataclass(frozen=True)
class Decision:
    at: float
    desired: int
    reason: str
    need: float = math.nan  # replicas the forecast demand needs (fractional, corrections included)
    ok: bool = True  # computed from good signals (False: a hold)
    active: bool = True  # what IsActive answers
    inputs: dict[str, float] = field(default_factory=dict)  # what the decision was made from (for /metrics)


class BurstHold:
    """Recognises recurring bursts and says how far back a scale-down must look to keep their capacity.

    The rule: a *burst* is a run of decisions in which the short-interval need jumped above the smoothed one (the
    fast path or panic fired); firings less than the stable window apart belong to one burst (the stable window
    already holds across such a pause). The *gap* between two bursts runs from the last firing of one to the first
    of the next. Bursts *recur* when the latest gap is at most ``max_hold_s``; then a scale-down looks back
    ``hold_s = min(max_hold_s, BURST_GAP_FACTOR x the longest of the last BURST_GAPS gaps <= max_hold_s)``
    instead of the stable window, so it keeps what the last burst needed (the largest panic-window need from the
    arrivals alone) until demand has stayed low for longer than the gaps seen. One burst (no gap yet), or one
    after a quiet spell longer than ``max_hold_s``, changes nothing; ``max_hold_s = 0`` disables the hold.
    Deterministic: only the decision times count.
    """

    def __init__(self, max_hold_s: float, merge_s: float) -> None:
        self.max_hold_s, self.merge_s = max_hold_s, merge_s
        self._bursts: deque[list[float]] = deque(maxlen=BURST_GAPS + 1)  # [first firing, last firing]

    def note(self, now: float) -> None:
        """The fast path or panic fired at ``now``."""
        if self._bursts and now - self._bursts[-1][1] <= self.merge_s:
            self._bursts[-1][1] = now
        else:
            self._bursts.append([now, now])

    def gaps(self) -> list[float]:
        b = self._bursts
        return [b[i + 1][0] - b[i][1] for i in range(len(b) - 1)]

    def hold_s(self) -> float:
        """How far back a scale-down looks (0: the bursts do not recur, the stable window alone counts)."""
        gaps = self.gaps()
        if self.max_hold_s <= 0 or not gaps or gaps[-1] > self.max_hold_s:
            return 0.0
        return min(self.max_hold_s, BURST_GAP_FACTOR * max(g for g in gaps if g <= self.max_hold_s))


class ScalingPolicy:
    """Desired replicas for one pool (one ScaledObject). Stateful: feed it every signal interval."""

    def __init__(
        self,
        settings: ScalerSettings,
        model: LatencyModel,
        *,
        forecast: bool = True,
        forecaster: HoltForecaster | None = None,
        wall_clock: Callable[[float], float] = float,
    ) -> None:
        """``wall_clock``: ``now`` -> Unix seconds, for ``scheduleFloors`` (default: ``now`` is Unix time)."""
        self.s = settings
        self.model = model
        self.slo = SLO(settings.ttft_slo_s, settings.itl_slo_s, settings.slo_percentile)
        self.capacity = CapacityView(model, self.slo, settings.max_num_seqs)
        self.use_forecast = forecast
        self.forecaster = forecaster or HoltForecaster()
        self.last: Decision | None = None
        self.last_good: Decision | None = None
        self.started_at: float | None = None
        self.panic_until = -math.inf
        self.last_active_at: float | None = None
        self.correction = 1.0
        self._corr_t: float | None = None
        self._isl: float | None = None
        self._osl: float | None = None
        self._cached = 0.0
        # (t, need, kv usage x ready) over the stable window; (t, waiting) over the panic window
        self._needs: deque[tuple[float, float, float]] = deque()
        self._peaks: deque[tuple[float, float]] = deque()  # (t, panic-window demand) over maxBurstHoldSeconds
        self._waiting: deque[tuple[float, float]] = deque()
        # (t, need at the interval's rate, arrivals, the same need from the arrivals alone) over the panic window
        self._now_needs: deque[tuple[float, float, float, float]] = deque()
        self.bursts = BurstHold(settings.max_burst_hold_s, settings.stable_window_s)
        self.errors = 0
        self.wall_clock = wall_clock

    # -- helpers -------------------------------------------------------------------------------------------------
    def _units(self, rate: float) -> float:
        """Demand in the pool's unit for an arrival rate (req/s)."""
        isl, osl = self._isl or 0.0, self._osl or 0.0
        if self.s.pool == "prefill":
            return rate * max(1.0, isl * (1.0 - self._cached))
        if self.s.pool == "decode":
            return rate * osl
        return rate

    def _per_replica(self) -> float:
        """Planned per-replica capacity: the model's, times ``targetUtilization``."""
        cap = self.capacity.per_replica(self.s.pool, self._isl or 1.0, self._osl or 1.0, self._cached)
        return cap * self.s.target_utilization

    def _predict(self, sig: PoolSignals, rate_per_replica: float) -> tuple[float, float]:
        """Predicted TTFT and ITL at the SLO percentile for the current per-replica load (nan: not modelled)."""
        p = self.s.slo_percentile
        isl, osl = self._isl or 1.0, self._osl or 1.0
        ttft = itl = math.nan
        if self.s.pool in ("prefill", "aggregated"):
            ttft = predict_prefill_ttft_s(self.model, rate_per_replica, isl, p, self._cached)
        if self.s.pool == "decode":
            batch = max(1.0, sig.running / max(sig.replicas, 1))
            itl = self.model.decode_step_time(round(batch), round(batch * (isl + osl / 2.0)))
        elif self.s.pool == "aggregated":
            itl = aggregated_mean_step_s(self.model, rate_per_replica, isl, osl, self._cached)
        return ttft, itl

    def _update_correction(self, now: float, observed: float | None, predicted: float) -> None:
        """Smooth the observed/predicted latency ratio into the bounded correction factor."""
        bound = self.s.max_latency_correction
        if observed is None or not 0 < predicted < math.inf or bound <= 1.0:
            return
        ratio = observed / predicted
        if 1.0 / CORRECTION_DEADBAND <= ratio <= CORRECTION_DEADBAND:
            ratio = 1.0
        ratio = min(max(ratio, 1.0 / bound), bound)
        dt = now - self._corr_t if self._corr_t is not None else self.s.latency_window_s
        a = 1.0 - math.exp(-max(dt, 0.0) / self.s.latency_window_s)
        self.correction += a * (ratio - self.correction)
        self._corr_t = now

    def floor(self, now: float) -> int:
        """The scheduled floor at ``now`` (0 without ``scheduleFloors``)."""
        if not self.s.schedule_floors:
            return 0
        return floor_at(self.s.schedule_floors, self.wall_clock(now), self.s.startup_s)

    def _meets(self, m: int, need_max: float, kv_load_max: float) -> bool:
        """Re-prediction with ``m`` replicas over the stable window's worst moment: capacity and KV usage."""
        if m <= 0:
            return need_max <= 0.0
        return need_max <= m + 1e-9 and kv_load_max / m <= self.s.kv_usage_threshold

    # -- the decision ----------------------------------------------------------------------------------------------
    def hold(self, now: float, error: str, current: int = -1) -> Decision:
        """Missing data: the last good decision, or the current count before any (-1: unknown, which the
        service answers as an error so that the HPA holds)."""
        self.errors += 1
        if self.last_good is not None:
            d = replace(self.last_good, at=now, reason="hold-signal-error", ok=False, active=True)
        else:
            d = Decision(now, current, "hold-no-data", ok=False, active=True)
        self.last = d = self._floored(d)
        return d

    def pending(self, now: float, current: int) -> Decision:
        """Signals not ready yet (first read): hold without counting an error."""
        if self.last_good is not None:
            d = replace(self.last_good, at=now, ok=False)
        else:
            d = Decision(now, current, "hold-no-data", ok=False, active=True)
        self.last = d = self._floored(d)
        return d

    def _floored(self, d: Decision) -> Decision:
        """A hold raised to the scheduled floor (an unknown count, -1, stays unknown)."""
        if d.desired < 0:
            return d
        floor = self.floor(d.at)
        return replace(d, desired=floor) if floor > d.desired else d

    def decide(self, now: float, sig: PoolSignals) -> Decision:
        s = self.s
        if self.started_at is None:
            self.started_at = now
        ready = sig.replicas
        base = self.last_good.desired if self.last_good is not None else ready
        if sig.mean_isl is not None:
            self._isl = sig.mean_isl
        if sig.mean_osl is not None:
            self._osl = sig.mean_osl
        if sig.prefix_hit_rate is not None:
            self._cached = min(max(sig.prefix_hit_rate, 0.0), 0.98)
        if self._isl is None and self._osl is None and sig.arrival_rate > 0:
            # traffic but no finished request yet: sizes unknown, so the demand is unknown → hold
            return self.pending(now, base)

        self.forecaster.update(now, sig.arrival_rate)
        # plan for the forecast over the cold start, never below the smoothed present (see HoltForecaster)
        level = self.forecaster.smoothed or 0.0
        rate_fc = max(level, self.forecaster.forecast(s.startup_s)) if self.use_forecast else level
        per_replica_rate = sig.arrival_rate / max(ready, 1)
        pred_ttft, pred_itl = self._predict(sig, per_replica_rate)
        obs_ttft = sig.ttft_quantile(s.slo_percentile) if sig.ttft.count >= MIN_LATENCY_SAMPLES else None
        obs_itl = sig.itl_quantile(s.slo_percentile) if sig.itl.count >= MIN_LATENCY_SAMPLES else None
        # Prefill pods: observed vs M/D/1 TTFT quantile; decode pods: observed ITL quantile vs the step time at the
        # observed batch. Aggregated pods are not corrected: a mixed step's per-token ITL tail (steps carrying a
        # prefill chunk) has no counterpart in the mean-step model, so the ratio would measure the model's form,
        # not its error; targetUtilization carries their headroom.
        if s.pool == "prefill":
            self._update_correction(now, obs_ttft, pred_ttft)
        elif s.pool == "decode":
            self._update_correction(now, obs_itl, pred_itl)
        cap = self._per_replica() / self.correction
        reason = "scale-up"
        unattainable = cap <= 0
        if unattainable:
            # No replica count meets the SLO at these request sizes (e.g. one prefill of the mean prompt takes longer
            # than the TTFT SLO): more replicas cannot help, so hold (only KV pressure still adds) and say so.
            need = need_now = float(max(base, 1))
            reason = "slo-unattainable"
        else:
            need = self._units(rate_fc) / cap
            need_now = self._units(sig.arrival_rate) / cap
        demand_now = need_now  # the interval's need from its arrivals alone, before the queue and KV corrections

        # A sustained queue (present at every read of the panic window, and not shrinking over it) must drain
        # within the TTFT budget plus the cold start (added replicas serve only after it): what the spare capacity
        # of the *planned* replicas (ready + starting: they serve within that horizon) cannot drain in that time
        # asks for more replicas. A queue the spare capacity absorbs is the normal queueing the capacity model
        # already counts; a shrinking one is being drained (more replicas would not take requests already queued
        # in an engine, and counting ready replicas only would re-ask for pods already starting).
        self._waiting.append((now, sig.waiting))
        while len(self._waiting) > 2 and self._waiting[1][0] <= now - s.panic_window_s:
            self._waiting.popleft()
        sustained = min(w for _, w in self._waiting) if len(self._waiting) >= 2 else 0.0
        if sustained > 0 and self._waiting[-1][1] < self._waiting[0][1]:
            sustained = 0.0  # draining
        planned = max(ready, base)
        if sustained > 0 and cap > 0:
            spare = max(0.0, planned - need_now)  # replicas' worth of capacity not used by the arrivals
            if s.pool == "decode":  # decode admission is bounded by batch slots, not by a token rate
                batch = max(self.capacity.decode_batch(self._isl or 1.0, self._osl or 1.0), 1)
                q_need = max(0.0, sustained / batch - spare)
            else:
                q_need = max(0.0, self._units(sustained) / (cap * (s.ttft_slo_s + s.startup_s)) - spare)
            if q_need > 0:
                need += q_need
                need_now += q_need
                reason = "queue"
        kv_load = sig.kv_usage * ready  # pod-equivalents of KV usage
        if ready > 0 and sig.kv_usage > s.kv_usage_threshold:
            kv_need = kv_load / s.kv_usage_threshold
            if kv_need > need:
                need, reason = kv_need, "kv-cache"
            need_now = max(need_now, kv_need)

        inputs = {
            "arrival_rate": sig.arrival_rate,
            "forecast_rate": rate_fc,
            "isl": self._isl or math.nan,
            "osl": self._osl or math.nan,
            "prefix_hit_rate": self._cached,
            "running": sig.running,
            "waiting": sig.waiting,
            "kv_usage": sig.kv_usage,
            "ready_replicas": float(ready),
            "capacity_per_replica": cap,
            "correction": self.correction,
            "need": need,
            "observed_ttft_s": math.nan if obs_ttft is None else obs_ttft,
            "observed_itl_s": math.nan if obs_itl is None else obs_itl,
            "predicted_ttft_s": pred_ttft,
            "predicted_itl_s": pred_itl,
            "slo_unattainable": 1.0 if unattainable else 0.0,
        }

        if not sig.idle or self.last_active_at is None:
            self.last_active_at = now
        active = True
        if s.scale_to_zero:
            active = not sig.idle
            if now - self.last_active_at >= s.stable_window_s and sig.idle and self.floor(now) == 0:
                return self._commit(Decision(now, 0, "scale-to-zero", need, True, False, inputs))

        # Fast path: the mean need over the panic window (raw interval rates, no smoothing) when it is clearly
        # above the smoothed need (a step, not noise) - so a load step moves the decision within one interval.
        # "Clearly" = beyond FAST_PATH_MARGIN and beyond 3 sigma of the Poisson noise of the arrivals counted.
        self._now_needs.append((now, need_now, sig.arrival_rate * sig.window_s, demand_now))
        while self._now_needs and self._now_needs[0][0] <= now - s.panic_window_s - 1e-9:
            self._now_needs.popleft()
        short = sum(n for _, n, _, _ in self._now_needs) / len(self._now_needs)
        counted = sum(c for _, _, c, _ in self._now_needs)
        short_demand = sum(d for _, _, _, d in self._now_needs) / len(self._now_needs)
        margin = max(FAST_PATH_MARGIN, 1.0 + 3.0 / math.sqrt(max(counted, 1.0)))
        target = math.ceil(need - 1e-9)
        held = need  # what the stable window remembers of this decision
        fast = short > margin * need and math.ceil(short - 1e-9) > target
        if fast:
            target = math.ceil(short - 1e-9)
            held = short  # the fast path's need: a scale-down must not undo it while the smoother still lags
        self._needs.append((now, held, kv_load))
        while self._needs and self._needs[0][0] < now - s.stable_window_s:
            self._needs.popleft()
        # What a burst brought, as the panic-window need from the arrivals alone: not the forecast (its trend
        # overshoots on a burst's rise) nor the queue / KV pressure the burst caused on too few pods (gone when
        # the next burst meets the held replicas).
        self._peaks.append((now, short_demand))
        while self._peaks and self._peaks[0][0] < now - s.max_burst_hold_s:
            self._peaks.popleft()
        panic = ready > 0 and need_now >= s.panic_threshold * ready
        if panic:
            self.panic_until = now + s.stable_window_s
            reason = "panic"
        if fast or panic:
            self.bursts.note(now)
        hold_s = self.bursts.hold_s()
        inputs["burst_hold_s"] = hold_s
        if now < self.panic_until:
            target = max(target, math.ceil(need_now - 1e-9))
        floor_ = 0 if s.scale_to_zero else 1
        if target > base:
            limit = max(base + 1, math.ceil(base * s.max_scale_up_rate)) if base > 0 else target
            desired = min(target, limit)
            if desired < target:
                reason = "rate-limited"
        elif target == base or now < self.panic_until:
            desired = base  # the reason stays what holds it there (queue, KV, panic), else "steady"
            reason = reason if reason in ("queue", "kv-cache", "panic") else "steady"
        elif now - self.started_at < s.stable_window_s:
            desired, reason = base, "hold-stable-window"
        else:
            need_max = max(n for _, n, _ in self._needs)
            kv_max = max(k for _, _, k in self._needs)
            cand = max(math.ceil(need_max - 1e-9), math.ceil(base / s.max_scale_down_rate), floor_)
            reason = "scale-down" if cand < base else "hold-stable-window"
            if hold_s > s.stable_window_s:  # recurring bursts: look back over the gaps between them
                burst_need = max(n for t, n in self._peaks if t >= now - hold_s)
                if math.ceil(burst_need - 1e-9) > cand:
                    cand = min(base, math.ceil(burst_need - 1e-9))
                    reason = "scale-down" if cand < base else "hold-burst"
                need_max = max(need_max, burst_need)
            while cand < base and not self._meets(cand, need_max, kv_max):
                cand += 1
                reason = "hold-slo-check" if cand == base else reason
            desired = cand
        desired = max(desired, floor_)
        scheduled = self.floor(now)
        inputs["schedule_floor"] = float(scheduled)
        if scheduled >= desired and scheduled > math.ceil(need - 1e-9):  # the floor is what holds the count
            desired, reason = scheduled, "schedule-floor"
        if unattainable and reason not in ("kv-cache",):
            reason = "slo-unattainable"
        if desired > s.max_replicas:
            desired, reason = s.max_replicas, "max-replicas"
        return self._commit(Decision(now, desired, reason, need, True, active, inputs))

    def _commit(self, d: Decision) -> Decision:
        self.last = self.last_good = d
        return d

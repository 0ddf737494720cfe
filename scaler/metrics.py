"""The scaler's own Prometheus metrics (served on ``/metrics`` by :class:`~scaler.app.ScalerApp`).

One gauge set per ScaledObject (labels :data:`LABELS`), published from each decision; removed when the ScaledObject
is forgotten, so the series stay bounded by the ScaledObjects tracked.
"""

from __future__ import annotations

import contextlib
import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from scaler.policy import REASONS, Decision

LABELS = ("namespace", "scaledobject", "pool", "model")


class ScalerMetrics:
    """The scaler's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)

        def g(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"kvscale_scaler_{name}", doc, (*LABELS, *extra), registry=r)

        self.desired = g("desired_replicas", "Replicas the scaler asks for (what GetMetrics returns).")
        self.need = g("need_replicas", "Fractional replicas the forecast demand needs, corrections included.")
        self.ready = g("ready_replicas", "Pods whose metrics were read at the last decision.")
        self.arrival = g("arrival_rate", "Requests per second entering the pool's engines (last interval).")
        self.forecast = g("forecast_arrival_rate", "Arrival rate forecast over the startup horizon.")
        self.isl = g("mean_input_tokens", "Mean prompt length of finished requests (latency window).")
        self.osl = g("mean_output_tokens", "Mean output length of finished requests (latency window).")
        self.prefix = g("prefix_hit_rate", "Fraction of prompt tokens served from the prefix cache.")
        self.waiting = g("queue_requests", "Requests waiting in the pool's engines.")
        self.running = g("running_requests", "Requests running in the pool's engines.")
        self.kv = g("kv_usage_ratio", "Mean KV-cache usage of the pool's engines (0..1).")
        self.capacity = g("capacity_per_replica", "Per-replica capacity under the SLO (pool's demand unit per s).")
        self.correction = g("latency_correction", "Observed/predicted latency correction applied to capacity.")
        self.pred_ttft = g("predicted_ttft_seconds", "Predicted TTFT at the SLO percentile (current load).")
        self.obs_ttft = g("observed_ttft_seconds", "Observed TTFT at the SLO percentile (latency window).")
        self.pred_itl = g("predicted_itl_seconds", "Predicted inter-token latency (current load).")
        self.obs_itl = g("observed_itl_seconds", "Observed inter-token latency at the SLO percentile.")
        self.schedule_floor = g("schedule_floor_replicas", "The scheduled floor now (scheduleFloors; 0: no window "
                                "active).")  # fmt: skip
        self.burst_hold = g("burst_hold_seconds", "How far back a scale-down looks for recurring bursts (0: off).")
        self.unattainable = g("slo_unattainable", "1 when no replica count meets the SLO at the current request "
                              "sizes (the decision holds instead of growing).")  # fmt: skip
        self.reason = g("decision_reason", "1 for the reason of the last decision, 0 for the others.", ("reason",))
        self.active = g("active", "What IsActive answers (1 active, 0 idle).")
        self.own_desired = g("variant_own_desired_replicas", "Variant groups: what this variant alone would ask "
                             "for (desired_replicas is its share of the group's least-cost split).")  # fmt: skip
        self.variant_req = g("variant_group_requirement", "Variant groups: the group's demand as its members "
                             "planned it (needs x per-replica capacity, held over the stable window).")  # fmt: skip
        self.variant_cost = g("variant_group_cost_per_hour", "Variant groups: cost per hour of the group's split.")
        self.variant_unavailable = g("variant_unavailable", "Variant groups: 1 while this variant is capped at its "
                                     "ready pods (its pods pending or unschedulable); its share moved.")  # fmt: skip
        self.unschedulable = g("variant_unschedulable_pods", "Variant groups: this variant's pods the scheduler "
                               "could not place (Pending, PodScheduled False: Unschedulable).")  # fmt: skip
        self.variant_exact = g("variant_split_exact", "Variant groups: 1 when the split is the exact optimum (or "
                               "the kept mix), 0 when greedy or every variant is at its maximum.")  # fmt: skip
        self.errors = Counter(
            "kvscale_scaler_signal_errors", "Failed or stale signal reads (the decision was held).", LABELS,
            registry=r,
        )  # fmt: skip
        self.pod_errors = Counter(
            "kvscale_scaler_pod_read_errors", "Pod metrics pages that could not be read or were implausible (a "
            "failed read of that pod, never a decision input).", LABELS, registry=r,
        )  # fmt: skip
        self.cost_patches = Counter(
            "kvscale_scaler_pod_deletion_cost_patches", "Pods whose pod-deletion-cost annotation was set before a "
            "scale-down.", LABELS, registry=r,
        )  # fmt: skip
        self.cost_errors = Counter(
            "kvscale_scaler_pod_deletion_cost_errors", "Failed pod-deletion-cost updates (e.g. RBAC without patch "
            "on pods); the scale-down then deletes pods in the ReplicaSet's default order.", LABELS, registry=r,
        )  # fmt: skip
        self.changes = Counter(
            "kvscale_scaler_scale_changes", "Decisions that changed the desired replica count.", LABELS, registry=r
        )
        self.trackers = Gauge("kvscale_scaler_scaledobjects", "ScaledObjects being tracked.", registry=r)
        self.rpc_latency = Histogram(
            "kvscale_scaler_grpc_request_duration_seconds", "gRPC handling time.", ("method", "code"), registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
        )  # fmt: skip
        self._gauges = [self.desired, self.need, self.ready, self.arrival, self.forecast, self.isl, self.osl,
                        self.prefix, self.waiting, self.running, self.kv, self.capacity, self.correction,
                        self.pred_ttft, self.obs_ttft, self.pred_itl, self.obs_itl, self.burst_hold,
                        self.schedule_floor, self.unattainable, self.active, self.own_desired, self.variant_req,
                        self.variant_cost, self.variant_unavailable, self.unschedulable,
                        self.variant_exact]  # fmt: skip

    def publish(self, labels: tuple[str, ...], d: Decision, changed: bool) -> None:
        if d.desired >= 0:
            self.desired.labels(*labels).set(d.desired)
        self.active.labels(*labels).set(1.0 if d.active else 0.0)
        for reason in REASONS:
            self.reason.labels(*labels, reason).set(1.0 if reason == d.reason else 0.0)
        if changed:
            self.changes.labels(*labels).inc()
        inputs = d.inputs
        for gauge, key in ((self.need, "need"), (self.ready, "ready_replicas"), (self.arrival, "arrival_rate"),
                           (self.forecast, "forecast_rate"), (self.isl, "isl"), (self.osl, "osl"),
                           (self.prefix, "prefix_hit_rate"), (self.waiting, "waiting"), (self.running, "running"),
                           (self.kv, "kv_usage"), (self.capacity, "capacity_per_replica"),
                           (self.correction, "correction"), (self.pred_ttft, "predicted_ttft_s"),
                           (self.obs_ttft, "observed_ttft_s"), (self.pred_itl, "predicted_itl_s"),
                           (self.obs_itl, "observed_itl_s"), (self.burst_hold, "burst_hold_s"),
                           (self.schedule_floor, "schedule_floor"),
                           (self.unattainable, "slo_unattainable"), (self.own_desired, "own_desired"),
                           (self.variant_req, "variant_requirement"),
                           (self.variant_cost, "variant_group_cost_per_hour"),
                           (self.variant_unavailable, "variant_unavailable"),
                           (self.unschedulable, "unschedulable_pods"),
                           (self.variant_exact, "variant_split_exact")):  # fmt: skip
            v = inputs.get(key)
            if v is not None and not math.isnan(v):
                gauge.labels(*labels).set(v)

    def remove(self, labels: tuple[str, ...]) -> None:
        for gauge in self._gauges:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        for reason in REASONS:
            with contextlib.suppress(KeyError):
                self.reason.remove(*labels, reason)
        for c in (self.errors, self.changes, self.pod_errors, self.cost_patches, self.cost_errors):
            with contextlib.suppress(KeyError):
                c.remove(*labels)

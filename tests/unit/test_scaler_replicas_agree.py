"""Two scaler replicas reading the same pods decide the same once the later one has a stable window of history
(the failover of deploy/base/scaler: KEDA reconnects to the other replica, which met the ScaledObject cold).

On the virtual clock, so both read exactly the same engine states at the same moments: the warm replica tracks
the pool from the start, the cold one from ``t0``; on steady (Poisson) traffic their decisions must agree from
``t0`` + one stable window + the forecast level's settling time on.
"""

from __future__ import annotations

from scaler.evaluate.controllers import KvscaleProducer
from scaler.evaluate.run import EvalConfig, Evaluation
from scaler.evaluate.signals import VirtualSource
from scaler.forecast import HoltForecaster
from scaler.policy import ScalingPolicy


def test_a_replica_started_later_decides_as_the_one_that_ran_all_along() -> None:
    ev = Evaluation(EvalConfig(trace="poisson", workload="chat", duration_s=600.0, peak_replicas=4.0))
    s = ev.settings["aggregated"]
    cluster = ev._cluster({"aggregated": 4})
    warm = KvscaleProducer(ScalingPolicy(s, ev.model), VirtualSource(cluster, "aggregated", s, ev.max_model_len),
                           cluster)  # fmt: skip
    cold = KvscaleProducer(ScalingPolicy(s, ev.model), VirtualSource(cluster, "aggregated", s, ev.max_model_len),
                           cluster)  # fmt: skip
    t0 = 200.0

    class Both:
        interval_s = s.signal_interval_s

        def tick(self, now: float, _cluster: object) -> None:
            warm(now)
            if now >= t0:
                cold(now)

    cluster.run(ev.trace, controller=Both())
    settle = t0 + s.stable_window_s + 3 * HoltForecaster().level_tau_s
    w = {t: d for t, d, _ in warm.trace if t >= settle}
    c = {t: d for t, d, _ in cold.trace if t >= settle}
    common = sorted(w.keys() & c.keys())
    assert len(common) > 50
    agree = sum(w[t] == c[t] for t in common) / len(common)
    assert agree >= 0.95, [(t, w[t], c[t]) for t in common if w[t] != c[t]][:10]
    # the check has teeth: right after t0, without history, the cold replica does not yet decide as the warm one
    early = [t for t, _, r in cold.trace if t < t0 + s.stable_window_s]
    w_all = {t: d for t, d, _ in warm.trace}
    c_all = {t: (d, r) for t, d, r in cold.trace}
    assert any(c_all[t][0] != w_all[t] or c_all[t][1] == "hold-no-data" for t in early)

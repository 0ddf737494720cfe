"""The HPA emulation of ``kvscale eval scaling``: Kubernetes' behaviour algorithm, and the committed ScaledObjects'
settings read from deploy/ (so the evaluation describes what a user deploys).

The HPA scales a real virtual-clock :class:`~simulator.cluster.Cluster` (no Kubernetes API server exists here;
the cluster is the scale target the evaluator uses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from models_for_tests import least_request

from kvscale.latency import load_latency_model
from scaler.evaluate.controllers import OracleController
from scaler.evaluate.run import EvalConfig, Evaluation
from scaler.hpa import DEPLOY_DIR, Hpa, HpaBehavior, HpaPolicy, HpaRules, committed_behavior
from simulator.cluster import Cluster
from simulator.engine import EngineConfig
from simulator.scheduler import SchedulerConfig


def cluster(n: int) -> Cluster:
    cfg = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=512), num_gpu_blocks=256,
                       materialize_outputs=False)  # fmt: skip
    return Cluster(load_latency_model("llama-3.1-8b-h100"), cfg, replicas={"aggregated": n}, startup_s=0.0,
                   dispatcher=least_request())


def drive(hpa: Hpa, c: Cluster, values: list[float], sync_s: float = 15.0) -> list[int]:
    """Feed one metric value per sync (continuing after the HPA's last sync); return the spec after each."""
    out = []
    t0 = hpa.last_sync + sync_s if hpa.last_sync > -1e18 else 0.0
    for i, v in enumerate(values):
        hpa.metric = lambda now, v=v: v
        hpa.sync(t0 + i * sync_s, c)
        out.append(hpa.spec)
    assert len(c.pool_replicas("aggregated")) == hpa.spec
    return out


def test_defaults_scale_up_by_max_of_4_pods_or_100_percent_per_sync():
    c = cluster(1)
    hpa = Hpa("aggregated", lambda now: 0.0, 1.0, spec=1)
    assert drive(hpa, c, [20.0] * 4) == [5, 10, 20, 20]  # 1+4 > 2x1; 2x5; 2x10


def test_defaults_scale_down_waits_300s_for_the_highest_recommendation():
    c = cluster(6)
    hpa = Hpa("aggregated", lambda now: 0.0, 1.0, spec=6)
    specs = drive(hpa, c, [6.0] + [2.0] * 25)
    # the recommendation of 6 at t=0 is in the window until t=300 (strict), so the drop comes at t=300
    assert specs[:20] == [6] * 20 and specs[20] == 2


def test_tolerance_ignores_changes_within_10_percent():
    c = cluster(10)
    hpa = Hpa("aggregated", lambda now: 0.0, 1.0, spec=10, behavior=HpaBehavior.from_spec({}, "t"))
    assert drive(hpa, c, [10.9, 11.0, 9.0, 12.0]) == [10, 10, 10, 12]  # 11/10 and 9/10 are exactly 10 %: within


def test_scale_down_pods_policy_and_short_stabilization():
    down = HpaRules(30.0, (HpaPolicy("Pods", 1, 60.0),), "Min")
    hpa = Hpa("aggregated", lambda now: 0.0, 1.0, spec=8, behavior=HpaBehavior(scale_down=down))
    specs = drive(hpa, cluster(8), [8.0] + [2.0] * 12)
    # 30 s window (strict): the 8 at t=0 counts at t=15 only; then one pod per 60 s
    assert specs[:3] == [8, 8, 7]
    assert specs[3:7] == [7, 7, 7, 6] and specs[-1] == 5


def test_select_min_and_percent_rounding():
    up = HpaRules(0.0, (HpaPolicy("Pods", 4, 15.0), HpaPolicy("Percent", 50, 15.0)), "Min")
    down = HpaRules(0.0, (HpaPolicy("Percent", 50, 15.0),), "Max")
    hpa = Hpa("aggregated", lambda now: 0.0, 1.0, spec=3, behavior=HpaBehavior(up, down))
    c = cluster(3)
    assert drive(hpa, c, [40.0]) == [5]  # min(3+4, ceil(3 x 1.5)=5)
    assert drive(hpa, c, [1.0]) == [2]  # int(5 x 0.5) = 2 (truncated), 1 is below the limit


def test_disabled_scale_down_holds():
    down = HpaRules(0.0, (HpaPolicy("Percent", 100, 15.0),), "Disabled")
    hpa = Hpa("aggregated", lambda now: 0.0, 1.0, spec=4, behavior=HpaBehavior(scale_down=down))
    assert drive(hpa, cluster(4), [1.0, 1.0, 9.0]) == [4, 4, 8]


def test_failed_metric_read_holds():
    hpa = Hpa("aggregated", lambda now: None, 1.0, spec=3, behavior=HpaBehavior.from_spec({}, "t"))
    c = cluster(3)
    hpa.sync(0.0, c)
    assert hpa.spec == 3 and hpa.events == 0


def _scaledobjects() -> dict[str, dict]:
    """The first committed ScaledObject per pool (as committed_behavior reads them); every other one of the pool
    (the variants overlay's) must configure the same HPA behaviour, so the evaluator's HPA describes each."""
    out: dict[str, dict] = {}
    for path in sorted((DEPLOY_DIR / "overlays").glob("**/scaledobject*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ScaledObject":
                first = out.setdefault(doc["spec"]["triggers"][0]["metadata"]["pool"], doc)
                assert doc["spec"]["advanced"] == first["spec"]["advanced"], doc["metadata"]["name"]
    return out


@pytest.mark.parametrize("pool", ["aggregated", "prefill", "decode"])
def test_committed_behavior_is_the_manifests(pool: str):
    """The evaluator's kvscale HPA is exactly what the committed ScaledObject of the pool configures."""
    so = _scaledobjects()[pool]
    spec = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    b = committed_behavior(pool)
    assert so["metadata"]["name"] in b.source
    for rules, raw in ((b.scale_up, spec["scaleUp"]), (b.scale_down, spec["scaleDown"])):
        assert rules.stabilization_s == raw["stabilizationWindowSeconds"]
        assert rules.select == raw.get("selectPolicy", "Max")
        assert [(p.type, p.value, p.period_s) for p in rules.policies] == [
            (p["type"], p["value"], p["periodSeconds"]) for p in raw["policies"]
        ]
    # kvscale stabilizes itself (stable window + N-1 re-check): the manifests keep the HPA's own window short
    assert b.scale_down.stabilization_s <= 60


def test_committed_behavior_missing_pool_or_manifests(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        committed_behavior("aggregated", tmp_path)
    d = tmp_path / "overlays" / "x"
    d.mkdir(parents=True)
    (d / "scaledobject.yaml").write_text(yaml.safe_dump({"kind": "ScaledObject", "metadata": {"name": "n"}, "spec": {
        "triggers": [{"type": "external", "metadata": {"pool": "decode"}}]}}))  # fmt: skip
    with pytest.raises(LookupError):
        committed_behavior("prefill", tmp_path)
    b = committed_behavior("decode", tmp_path)  # no advanced block: the Kubernetes defaults
    assert b.scale_down.stabilization_s == 300 and b.scale_up == HpaBehavior().scale_up


def test_evaluation_reports_the_hpa_each_policy_ran_under():
    ev = Evaluation(EvalConfig(trace="step", workload="chat", duration_s=600,
                               policies=("kvscale", "kvscale-hpa-default", "keda-queue", "oracle")))  # fmt: skip
    assert ev.hpa_behaviors("kvscale")["aggregated"] == committed_behavior("aggregated")
    assert ev.hpa_behaviors("kvscale-hpa-default")["aggregated"] == HpaBehavior()
    assert ev.hpa_behaviors("keda-queue")["aggregated"] == HpaBehavior()
    assert ev.hpa_behaviors("oracle")["aggregated"] is None
    default = Evaluation(EvalConfig(trace="step", workload="chat", duration_s=600, kvscale_hpa="default",
                                    policies=("kvscale",)))  # fmt: skip
    assert default.hpa_behaviors("kvscale")["aggregated"] == HpaBehavior()


def test_reactive_oracle_is_the_oracle_a_cold_start_late():
    sched = {"aggregated": np.array([2, 2, 2, 2, 6, 6, 6, 3, 3, 3, 3, 3])}
    ahead = OracleController(sched, 60.0, 90.0)
    late = OracleController(sched, 60.0, 90.0, reaction_delay_s=5.0)
    assert ahead.target("aggregated", 150.0) == 6  # starts pods a cold start ahead of the step at 240 s
    assert ahead.target("aggregated", 144.0) == 2
    # the reactive one asks at 240 + 5 s (one signal interval after the step): pods serve a cold start later
    assert late.target("aggregated", 244.0) == 2 and late.target("aggregated", 245.0) == 6
    # and holds the need it has seen for a cold start after the demand falls (at 420 s)
    assert late.target("aggregated", 420.0 + 90.0) == 6 and late.target("aggregated", 420.0 + 100.0) == 3

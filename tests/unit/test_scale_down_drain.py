"""Drain-safe scale-down on the virtual cluster: the ReplicaSet's deletion order, pod-deletion-cost, the grace
period's kill, and the evaluator's ``requests_killed_by_scale_down``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from models_for_tests import LAT, least_request

from scaler.evaluate.run import EvalConfig, Evaluation
from simulator.cluster import Cluster, Replica, deletion_order
from simulator.workload import TraceRequest

ROOT = Path(__file__).resolve().parents[2]


class Schedule:
    """Sets the pool's size at given times (and, optionally, the pods' deletion cost)."""

    interval_s = 0.5

    def __init__(self, steps: list[tuple[float, int]]) -> None:
        self.steps = steps

    def tick(self, now: float, cluster: Cluster) -> None:
        due = [n for t, n in self.steps if t <= now]
        if due:
            cluster.set_replicas("aggregated", due[-1], now)


def replica(cl: Cluster, rid: int) -> Replica:
    return cl.replicas[rid]


def test_deletion_order_follows_the_replicaset_rule() -> None:
    cl = Cluster(LAT, replicas={"aggregated": 3}, startup_s=10.0, dispatcher=least_request())
    cl.set_replicas("aggregated", 4, now=100.0)  # replica 3 starts at 100 s, ready at 110 s
    live = cl.pool_replicas("aggregated")
    # starting (not ready) first
    assert deletion_order(live, 105.0)[0].replica_id == 3
    # once ready: the one ready for the shortest time (log2 buckets: 10 s vs 200 s apart)
    assert deletion_order(live, 120.0)[0].replica_id == 3
    # a lower pod-deletion-cost goes before readiness age
    costs = {0: 5.0, 1: 0.0, 2: 7.0, 3: 9.0}
    order = deletion_order(live, 120.0, lambda r: costs[r.replica_id])
    assert [r.replica_id for r in order] == [1, 0, 2, 3]


def test_equal_log_rank_ties_are_pseudo_random_not_by_id() -> None:
    cl = Cluster(LAT, replicas={"aggregated": 8}, dispatcher=least_request())
    order = [r.replica_id for r in deletion_order(cl.pool_replicas("aggregated"), 50.0)]
    assert sorted(order) == list(range(8)) and order != list(range(8)) and order != list(range(8))[::-1]


def long_requests(n: int, output_len: int = 2000) -> list[TraceRequest]:
    return [TraceRequest(0.01 * i, None, 200, output_len) for i in range(n)]


def test_grace_period_kills_what_a_drained_replica_still_holds() -> None:
    trace = long_requests(8)
    # 2 replicas, scaled to 1 at 1 s; ~2000 decode steps take far longer than the 2 s grace period
    cl = Cluster(LAT, replicas={"aggregated": 2}, grace_s=2.0, dispatcher=least_request())
    res = cl.run(trace, controller=Schedule([(1.0, 1)]))
    killed = [r for r in res.records if r.killed]
    assert 0 < len(killed) < len(trace)
    assert all(np.isnan(r.e2e_s) for r in killed)
    victim = next(r for r in cl.replicas if r.killed)
    assert victim.deleted_s is not None and abs(victim.deleted_s - 3.0) < 0.6  # drained at ~1 s + 2 s grace
    # without a grace limit the same scale-down finishes everything
    cl2 = Cluster(LAT, replicas={"aggregated": 2}, dispatcher=least_request())
    res2 = cl2.run(trace, controller=Schedule([(1.0, 1)]))
    assert not any(r.killed for r in res2.records) and not np.isnan(res2.array("e2e_s")).any()


def test_deletion_cost_spares_the_busy_replica() -> None:
    # replica 0 gets every request; all three replicas have been ready equally long
    trace = long_requests(3, output_len=3000)

    class First:
        def choose(self, req: object, candidates: list, now: float) -> object:
            return candidates[0]

    def run(cost: bool) -> int:
        cl = Cluster(LAT, replicas={"aggregated": 3}, grace_s=1.0, dispatcher=First())
        if cost:
            cl.deletion_cost["aggregated"] = lambda r: float(r.engine.num_running + r.engine.num_waiting)
        res = cl.run(trace, controller=Schedule([(1.0, 1)]))
        return sum(r.killed for r in res.records)

    assert run(cost=True) == 0
    # the ReplicaSet's own order breaks the tie by UID, which here picks the busy replica 0 first
    assert run(cost=False) == 3


def test_eval_grace_is_the_committed_deployments() -> None:
    dep = yaml.safe_load((ROOT / "deploy/base/engine/deployment.yaml").read_text())
    assert EvalConfig().termination_grace_s == dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_eval_reports_killed_requests_and_refuses_a_negative_grace() -> None:
    cfg = EvalConfig(trace="step", workload="chat", duration_s=120.0, peak_replicas=1.0, startup_s=20.0,
                     policies=("kvscale", "keda-queue"), termination_grace_s=0.0)  # fmt: skip
    res = Evaluation(cfg).run()
    for p in res["policies"].values():
        assert p["requests_killed_by_scale_down"] >= 0
    try:
        Evaluation(EvalConfig(termination_grace_s=-1.0))
    except ValueError as e:
        assert "--termination-grace-seconds" in str(e)
    else:
        raise AssertionError("a negative grace period was accepted")

"""Virtual-clock cluster: completion, dispatchers, scaling up/down/from zero, P/D, SLO attainment, prefix hits."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import pytest
from models_for_tests import LAT, least_request

from kvscale.latency import LatencyModel, prefill_attn_term
from router.evaluate.dispatch import PipelineDispatcher
from simulator.cluster import Cluster, ClusterResult, DispatchRequest, ReplicaView
from simulator.workload import TraceRequest, build_trace


def chat_trace(rate: float = 4.0, duration_s: float = 20.0, seed: int = 1) -> list[TraceRequest]:
    return build_trace("poisson", "chat", rate, duration_s, seed=seed, max_input_len=1500, max_output_len=150)


def completed(res: ClusterResult) -> np.ndarray:
    return ~np.isnan(res.array("e2e_s"))


class Schedule:
    """A controller that sets a pool's size from a step function of time."""

    def __init__(self, steps: list[tuple[float, int]], pool: str = "aggregated", interval_s: float = 0.5) -> None:
        self.steps = steps
        self.pool = pool
        self.interval_s = interval_s

    def tick(self, now: float, cluster: Cluster) -> None:
        due = [n for t, n in self.steps if t <= now]
        if due:
            cluster.set_replicas(self.pool, due[-1], now)


def short(t: float, input_len: int = 50, output_len: int = 5) -> TraceRequest:
    return TraceRequest(t, None, input_len, output_len)


# -- basics -------------------------------------------------------------------------------------------------------


def test_poisson_chat_trace_on_two_replicas_completes_every_request() -> None:
    trace = chat_trace()
    assert len(trace) > 50
    cl = Cluster(LAT, replicas={"aggregated": 2}, dispatcher=least_request())
    res = cl.run(trace)
    assert completed(res).all()
    assert not any(r.dropped for r in res.records)
    assert {r.replica for r in res.records} == {0, 1}
    assert (res.array("e2e_s") >= res.array("ttft_s")).all()
    assert res.wall_steps == sum(r.engine.num_steps for r in cl.replicas) > 0
    assert res.end_s >= trace[-1].arrival_s
    assert res.replica_seconds == {"aggregated": pytest.approx(2 * res.end_s)}
    assert res.itl.total > 0
    for r in cl.replicas:
        assert not r.engine.has_work() and r.engine.kv.num_free_blocks == r.engine.config.num_gpu_blocks


def test_rejects_unknown_pools_and_half_a_pd_setup() -> None:
    with pytest.raises(ValueError, match="unknown pool"):
        Cluster(LAT, replicas={"gpu": 1}, dispatcher=least_request())
    with pytest.raises(ValueError, match="both"):
        Cluster(LAT, replicas={"prefill": 1}, dispatcher=least_request())


# -- dispatchers --------------------------------------------------------------------------------------------------


def long_then_shorts() -> list[TraceRequest]:
    return [short(0.0, 100, 3000)] + [short(1.0 + i) for i in range(6)]


# The router's policies through the virtual driver (router.evaluate.dispatch); the router breaks ties at random, so
# which replica comes first is the picker's choice.
def test_round_robin_cycles_through_replicas_regardless_of_load() -> None:
    res = Cluster(LAT, replicas={"aggregated": 2}, dispatcher=PipelineDispatcher("round-robin")).run(long_then_shorts())
    first = res.records[0].replica
    assert [r.replica for r in res.records] == [(first + i) % 2 for i in range(7)]
    assert completed(res).all()


def test_least_request_avoids_the_replica_busy_with_a_long_request() -> None:
    res = Cluster(LAT, replicas={"aggregated": 2}, dispatcher=least_request()).run(long_then_shorts())
    busy = res.records[0].replica
    assert [r.replica for r in res.records] == [busy] + [1 - busy] * 6
    assert completed(res).all()


def test_least_request_spreads_a_burst_before_any_sync() -> None:
    burst = [short(0.01) for _ in range(7)]
    res = Cluster(LAT, replicas={"aggregated": 3}, dispatcher=least_request()).run(burst)
    placed = [r.replica for r in res.records]
    assert sorted(placed[:3]) == sorted(placed[3:6]) == [0, 1, 2]  # each replica one before any gets a second


class Recording:
    """A dispatcher written against the interface only (as a router adapter would be): records what it is shown."""

    def __init__(self) -> None:
        self.seen: list[tuple[DispatchRequest, list[ReplicaView], float]] = []

    def choose(self, req: DispatchRequest, candidates: Sequence[ReplicaView], now: float) -> ReplicaView:
        self.seen.append((req, [copy.copy(c) for c in candidates], now))
        return max(candidates, key=lambda c: c.replica_id)


def test_a_dispatcher_sees_views_of_the_candidates_and_of_the_request() -> None:
    d = Recording()
    trace = [TraceRequest(0.0, [5, 6, 7], 3, 400, session="s1"), short(1.0)]
    res = Cluster(LAT, replicas={"aggregated": 2}, dispatcher=d).run(trace)
    assert [r.replica for r in res.records] == [1, 1]  # the returned view picks the replica
    (req0, cands0, t0), (req1, cands1, t1) = d.seen
    assert all(type(c) is ReplicaView for c in cands0 + cands1)  # not the cluster's Replica (no engine)
    assert [(c.replica_id, c.name, c.pool, c.role) for c in cands0] == [
        (0, "aggregated-0", "aggregated", "both"),
        (1, "aggregated-1", "aggregated", "both"),
    ]
    assert (req0.request_id, req0.arrival_s, req0.input_len, req0.output_len) == ("0", 0.0, 3, 400)
    assert (req0.prompt_token_ids, req0.session, req0.decode_leg) == ([5, 6, 7], "s1", False)
    assert (t0, t1) == (0.0, 1.0) and req1.prompt_token_ids is None
    assert [(c.in_flight, c.synced_s) for c in cands0] == [(0, None), (0, None)]
    one = cands1[1]  # as of the sync at 0.8 s: request 0 still decoding (400 tokens) on replica 1
    assert (one.in_flight, one.running, one.waiting, one.synced_s) == (1, 1, 0, pytest.approx(0.8))
    assert 0 < one.kv_usage < 1 and cands1[0].kv_usage == 0


def test_a_pd_dispatcher_sees_each_pool_and_the_decode_leg() -> None:
    prefill_d, decode_d = Recording(), Recording()
    Cluster(LAT, replicas={"prefill": 1, "decode": 1}, dispatcher={"prefill": prefill_d, "decode": decode_d}).run(
        [short(0.0)]
    )
    ((p_req, (p_view,), _),) = prefill_d.seen
    ((d_req, (d_view,), d_at),) = decode_d.seen
    assert (p_req.request_id, p_req.decode_leg, p_view.pool, p_view.role) == ("0", False, "prefill", "prefill")
    assert (d_req.request_id, d_req.decode_leg, d_view.pool, d_view.role) == ("0-d", True, "decode", "decode")
    assert d_req.arrival_s == 0.0 < d_at  # the decode leg is dispatched when the prefill finished


# -- scaling ------------------------------------------------------------------------------------------------------


def test_scale_up_then_down_with_a_controller() -> None:
    startup = 2.0
    trace = [
        short(0.5),
        short(1.5),  # replica 1 is starting: must go to replica 0
        short(2.5),
        short(4.0, 100, 1500),  # one long request on each replica ...
        short(4.05, 100, 1500),
        short(7.0),  # ... after replica 1 was drained at 6.0: back to replica 0
        short(8.0),
    ]
    cl = Cluster(LAT, replicas={"aggregated": 1}, startup_s=startup, dispatcher=least_request())
    res = cl.run(trace, controller=Schedule([(1.0, 2), (6.0, 1)]))
    assert completed(res).all()

    r0, r1 = cl.replicas
    assert (r1.created_s, r1.ready_s) == (1.0, 1.0 + startup)
    placed = [r.replica for r in res.records]
    assert placed[:3] == [0, 0, 0] and placed[5:] == [0, 0] and sorted(placed[3:5]) == [0, 1]  # the long ones: one each
    for rec in res.records:
        if rec.replica == 1:
            assert rec.arrival_s >= r1.ready_s

    # replica 1 was drained at 6.0 but finished its long request before being deleted
    assert r1.draining and r1.deleted_s is not None
    long_on_r1 = next(r for r in res.records if r.replica == 1)
    assert long_on_r1.arrival_s + long_on_r1.e2e_s <= r1.deleted_s + 1e-9
    assert r1.deleted_s > 6.0 and not r1.engine.has_work()
    assert r0.deleted_s is None and not r0.draining

    assert res.replica_seconds["aggregated"] == pytest.approx(res.end_s + (r1.deleted_s - r1.created_s))
    assert (1.0, "aggregated", 1, 2) in res.timeline  # starting replica counts in the total only
    assert (3.0, "aggregated", 2, 2) in res.timeline
    assert (6.0, "aggregated", 1, 2) in res.timeline  # draining: not serving, not yet deleted


def test_scale_down_drains_a_replica_that_is_still_starting_first() -> None:
    cl = Cluster(LAT, replicas={"aggregated": 1}, startup_s=10.0, dispatcher=least_request())
    cl.set_replicas("aggregated", 2, now=0.0)  # replica 1: ready at 10
    cl.startup_s = 0.0
    cl.set_replicas("aggregated", 3, now=1.0)  # replica 2: newer, but ready at once
    cl.set_replicas("aggregated", 2, now=2.0)
    assert [(r.replica_id, r.draining) for r in cl.replicas] == [(0, False), (1, True), (2, False)]
    assert cl.replicas[1].deleted_s == 2.0  # idle: deleted at once
    cl.set_replicas("aggregated", 1, now=3.0)  # among ready idle replicas, the newest goes
    assert [(r.replica_id, r.draining) for r in cl.replicas] == [(0, False), (1, True), (2, True)]
    assert [(t, serving, total) for t, _, serving, total in cl.timeline] == [
        (0.0, 1, 1),
        (0.0, 1, 2),
        (1.0, 2, 3),
        (2.0, 2, 2),
        (3.0, 1, 1),
    ]


def test_scale_from_zero_backlog_waits_for_the_first_replica() -> None:
    cl = Cluster(LAT, replicas={"aggregated": 0}, startup_s=3.0, dispatcher=least_request())
    trace = [short(0.1), short(0.2), short(5.0)]
    res = cl.run(trace, controller=Schedule([(0.5, 1)]))
    assert not any(r.dropped for r in res.records)
    assert completed(res).all()
    (rep,) = cl.replicas
    assert (rep.created_s, rep.ready_s) == (0.5, 3.5)
    assert all(r.replica == rep.replica_id for r in res.records)
    assert res.replica_seconds["aggregated"] == pytest.approx(res.end_s - 0.5)


def test_requests_are_dropped_when_no_replica_ever_comes_up() -> None:
    # until_s is needed: without it run() never returns here (bug, see test_run_returns_when_no_replica_ever_comes_up)
    cl = Cluster(LAT, replicas={"aggregated": 0}, dispatcher=least_request())
    res = cl.run([short(0.1), short(0.2)], until_s=5.0)
    assert all(r.dropped for r in res.records)
    assert not completed(res).any()
    assert res.slo_attainment(10.0, 10.0) == 0.0


# -- P/D ----------------------------------------------------------------------------------------------------------


def test_pd_cluster_completes_every_request_and_releases_prefill_blocks() -> None:
    trace = chat_trace(rate=3.0, duration_s=10.0, seed=4)
    cl = Cluster(LAT, replicas={"prefill": 1, "decode": 1}, dispatcher=least_request())
    res = cl.run(trace)
    prefill, decode = cl.replicas
    assert (prefill.pool, decode.pool) == ("prefill", "decode")
    assert completed(res).all()
    assert all(r.replica == decode.replica_id for r in res.records)  # the record names the decode replica
    assert prefill.engine.held == {}
    for rep in cl.replicas:
        assert rep.engine.kv.num_free_blocks == rep.engine.config.num_gpu_blocks
    assert prefill.engine.generation_tokens_total == len(trace)  # one discarded token per prefill
    assert decode.engine.generation_tokens_total == sum(min(t.output_len, 8192 - t.input_len) for t in trace)
    assert set(res.replica_seconds) == {"prefill", "decode"}


def test_pd_ttft_includes_the_kv_transfer() -> None:
    def ttft(per_token_s: float) -> float:
        lat = LatencyModel("t", LAT.coefficients, kv_transfer_base_s=0.0071, kv_transfer_per_token_s=per_token_s)
        res = Cluster(lat, replicas={"prefill": 1, "decode": 1}, dispatcher=least_request()).run([short(0.05, 2000, 4)])
        return float(res.records[0].ttft_s)

    fast, slow = ttft(1e-6), ttft(1e-3)
    assert slow - fast == pytest.approx((1e-3 - 1e-6) * 1999, rel=1e-9)


# Regression: a request added to an idle replica must not be computed from the replica's stale busy_until
# (before it arrived), which made TTFT and E2E too small, even negative.


def test_ttft_on_an_idle_replica_is_the_prefill_time() -> None:
    res = Cluster(LAT, dispatcher=least_request()).run([short(0.5, 200, 4), short(3.0, 200, 4)])
    assert res.array("ttft_s") == pytest.approx([LAT.prefill_time(200)] * 2, rel=1e-9)


def test_ttft_after_scale_from_zero_includes_the_cold_start() -> None:
    cl = Cluster(LAT, replicas={"aggregated": 0}, startup_s=3.0, dispatcher=least_request())
    res = cl.run([short(0.1)], controller=Schedule([(0.5, 1)]))
    assert res.records[0].ttft_s >= 3.5 - 0.1


def test_pd_ttft_is_at_least_prefill_plus_transfer_plus_one_step() -> None:
    res = Cluster(LAT, replicas={"prefill": 1, "decode": 1}, dispatcher=least_request()).run([short(0.5, 200, 4)])
    floor = LAT.prefill_time(200) + LAT.kv_transfer_time(199) + LAT.step_time(1, prefill_attn_term(1, 199), 0, 0)
    assert res.records[0].ttft_s >= floor - 1e-12


# Regression: a finished prefill hands its decode leg over when it finishes, not at the next sync.
def test_pd_ttft_is_exactly_prefill_plus_transfer_plus_one_step() -> None:
    res = Cluster(LAT, replicas={"prefill": 1, "decode": 1}, dispatcher=least_request()).run([short(0.0, 200, 4)])
    ideal = LAT.prefill_time(200) + LAT.kv_transfer_time(199) + LAT.step_time(1, prefill_attn_term(1, 199), 0, 0)
    assert res.records[0].ttft_s == pytest.approx(ideal, rel=1e-9)


# Regression: with startup_s=0 a replica started by set_replicas must still flush the router backlog.
def test_scale_from_zero_with_instant_startup_serves_the_backlog() -> None:
    cl = Cluster(LAT, replicas={"aggregated": 0}, startup_s=0.0, dispatcher=least_request())
    res = cl.run([short(0.1)], controller=Schedule([(0.5, 1)]), until_s=10.0)  # until_s: the bug would hang
    assert not res.records[0].dropped


# Regression (EngineCore.add_request, reached through Cluster._advance): busy_until used to move up to the
# arrival only when the engine had no work. A decode replica whose only
# request waits for its KV pull has work but a stale busy_until, so a decode leg added later is scheduled, and its KV
# pull modelled, from that stale time, before the leg arrived.
def test_pd_decode_leg_arriving_while_another_waits_for_its_kv_pays_its_own_transfer() -> None:
    lat = LatencyModel("t", LAT.coefficients, kv_transfer_base_s=1.0, kv_transfer_per_token_s=0.0)
    cl = Cluster(lat, replicas={"prefill": 1, "decode": 1}, dispatcher=least_request())
    res = cl.run([short(0.0, 200, 4), short(0.5, 200, 4)])
    assert (res.array("ttft_s") >= lat.prefill_time(200) + 1.0).all()


# Regression (simulator/cluster.py, Cluster.run): without until_s, a backlog that nothing can ever serve (no replica, no
# controller) keeps _busy() true, so sync events are re-pushed forever and run() never returns.
@pytest.mark.timeout(1)
def test_run_returns_when_no_replica_ever_comes_up() -> None:
    res = Cluster(LAT, replicas={"aggregated": 0}, dispatcher=least_request()).run([short(0.1)])
    assert res.records[0].dropped


# -- SLO attainment and prefix caching ---------------------------------------------------------------------------


def test_slo_attainment_is_a_fraction_and_monotone_in_the_slo() -> None:
    trace = chat_trace(rate=6.0, duration_s=15.0)
    res = Cluster(LAT, replicas={"aggregated": 1}, dispatcher=least_request()).run(trace)
    ttft_grid = [0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0]
    itl_grid = [0.013, 0.015, 0.02, 0.05]
    table = np.array([[res.slo_attainment(t, i) for i in itl_grid] for t in ttft_grid])
    assert ((table >= 0.0) & (table <= 1.0)).all()
    assert (np.diff(table, axis=0) >= 0).all() and (np.diff(table, axis=1) >= 0).all()
    assert table.min() < table.max()  # the grid spans the interesting range
    assert res.slo_attainment(math.inf, math.inf) == 1.0
    # the ITL SLO counts too: only single-token answers (no inter-token gap) meet an impossible one
    assert res.slo_attainment(math.inf, 1e-6) == pytest.approx(np.mean([t.output_len == 1 for t in trace]))
    assert math.isnan(ClusterResult([], {}, [], res.itl, 0, 0.0).slo_attainment(1.0, 1.0))


def test_shared_prefix_trace_hits_the_prefix_cache() -> None:
    trace = build_trace("poisson", "shared-prefix", 3.0, 10.0, seed=3, prefix_len=256, num_tenants=3, max_output_len=50)
    res = Cluster(LAT, dispatcher=least_request()).run(trace)
    cached = res.array("cached_tokens")
    seen: set[int | None] = set()
    for t, c in zip(trace, cached, strict=True):
        if t.prefix_group in seen:
            assert c >= 256, t  # the tenant's whole system prompt (16 full blocks) is a hit
        seen.add(t.prefix_group)
    assert len(seen) == 3
    assert cached.sum() >= 256 * (len(trace) - 3) > 0


def test_synthetic_prompts_never_hit_the_prefix_cache() -> None:
    res = Cluster(LAT, dispatcher=least_request()).run(chat_trace(duration_s=10.0))
    assert (res.array("cached_tokens") == 0).all()

"""Scheduler and engine core: token budget, chunked prefill, max_num_seqs, preemption, timing, validation, abort
and the two sides of prefill/decode disaggregation."""

from __future__ import annotations

import math
import zlib

import pytest
from models_for_tests import LAT

from kvscale.latency import prefill_attn_term
from simulator.engine import EngineConfig, EngineCore, StepOutput
from simulator.request import Request, Status
from simulator.scheduler import ScheduledBatch, SchedulerConfig

BS = 16


def make_engine(
    *, num_gpu_blocks: int = 4096, kv_hold_timeout_s: float = 480.0, record_events: bool = False, **sched: int
) -> EngineCore:
    cfg = EngineConfig(
        scheduler=SchedulerConfig(**{"max_model_len": 4096, **sched}),
        block_size=BS,
        num_gpu_blocks=num_gpu_blocks,
        kv_hold_timeout_s=kv_hold_timeout_s,
    )
    return EngineCore(cfg, LAT, record_events=record_events)


def prompt(n: int, seed: int = 0) -> list[int]:
    return [1000 + (seed * 7919 + i * 104729) % 20000 for i in range(n)]


def req(rid: str, n_prompt: int, max_tokens: int, seed: int | None = None, **kw: object) -> Request:
    tokens = prompt(n_prompt, zlib.crc32(rid.encode()) % 1000 if seed is None else seed)
    return Request(rid, tokens, max_tokens, 0.0, **kw)


def record_batches(eng: EngineCore) -> list[tuple[float, list[tuple[str, int, int, int]], ScheduledBatch, set[str]]]:
    """Wrap the scheduler to log every batch: (now, [(id, new tokens, computed before, prompt len)], batch,
    ids running before the step)."""
    log: list[tuple[float, list[tuple[str, int, int, int]], ScheduledBatch, set[str]]] = []
    inner = eng.scheduler.schedule

    def schedule(now: float) -> ScheduledBatch:
        running_before = {r.request_id for r in eng.scheduler.running}
        b = inner(now)
        if b.items:
            items = [(r.request_id, n, r.num_computed_tokens, r.num_prompt_tokens) for r, n in b.items]
            log.append((now, items, b, running_before))
        return b

    eng.scheduler.schedule = schedule  # type: ignore[method-assign]
    return log


def run(eng: EngineCore, arrivals: list[tuple[float, Request]], *, fast_forward: bool = True) -> list[StepOutput]:
    """Drive the engine with a virtual clock: advance to each arrival, add it, then run to completion."""
    outs: list[StepOutput] = []
    now = 0.0
    for t, r in sorted(arrivals, key=lambda x: x[0]):
        outs += eng.advance(now, t, fast_forward=fast_forward)
        now = t
        eng.add_request(r, now)
    outs += eng.advance(now, math.inf, fast_forward=fast_forward)
    return outs


def assert_all_done(reqs: list[Request]) -> None:
    for r in reqs:
        assert r.status is Status.FINISHED_LENGTH, r.request_id
        assert r.num_output_tokens == r.max_tokens == len(r.output_token_ids), r.request_id
        assert r.arrival_time <= r.first_scheduled_time < r.first_token_time <= r.finish_time, r.request_id


# -- batching ---------------------------------------------------------------------------------------------------


def test_token_budget_is_respected_every_step_and_saturated_under_load() -> None:
    eng = make_engine(max_num_batched_tokens=64)
    log = record_batches(eng)
    reqs = [req(f"r{i}", n, 12) for i, n in enumerate([10, 150, 37, 90, 64, 5])]
    run(eng, [(0.0, r) for r in reqs], fast_forward=False)
    assert_all_done(reqs)
    sizes = [sum(n for _, n, _, _ in items) for _, items, _, _ in log]
    assert max(sizes) == 64
    assert all(0 < s <= 64 for s in sizes)
    assert sizes.count(64) >= 4  # 356 prompt tokens cannot go through in fewer full steps


def test_running_decodes_are_served_before_a_new_long_prompt_which_gets_the_rest_of_the_budget() -> None:
    eng = make_engine(max_num_batched_tokens=64)
    log = record_batches(eng)
    a = req("a", 10, 40)
    b = req("b", 500, 3)
    run(eng, [(0.0, a), (0.05, b)], fast_forward=False)
    assert_all_done([a, b])
    with_b_prefill = [items for _, items, _, _ in log if any(i[0] == "b" and i[2] < 500 for i in items)]
    assert len(with_b_prefill) == math.ceil(500 / 63)
    for items in with_b_prefill:
        assert items[0][:2] == ("a", 1)  # a's decode first
        assert items[0][2] >= 10  # ... and it is a decode
        assert items[1][0] == "b" and items[1][1] == min(63, 500 - items[1][2])
    # a decoded in every step from its first token to its last: never starved by b's prefill
    assert a.num_output_tokens == 40
    assert sum(1 for _, items, _, _ in log if any(i[0] == "a" for i in items)) == 40


def test_long_prompt_is_chunked_across_steps_and_ttft_is_the_sum_of_their_times() -> None:
    eng = make_engine(max_num_batched_tokens=64)
    log = record_batches(eng)
    r = req("r", 200, 1)
    run(eng, [(0.0, r)], fast_forward=False)
    chunks = [(items[0][1], items[0][2]) for _, items, _, _ in log]
    assert chunks == [(64, 0), (64, 64), (64, 128), (8, 192)]
    expected = sum(LAT.step_time(n, prefill_attn_term(n, c), 0, 0) for n, c in chunks)
    assert r.first_token_time == pytest.approx(expected, rel=1e-12)
    assert r.finish_time == r.first_token_time


def test_long_prefill_token_threshold_caps_one_requests_chunk() -> None:
    eng = make_engine(max_num_batched_tokens=64, long_prefill_token_threshold=24)
    log = record_batches(eng)
    run(eng, [(0.0, req("r", 60, 2))], fast_forward=False)
    assert [items[0][1] for _, items, _, _ in log] == [24, 24, 12, 1]


def test_max_num_seqs_is_respected() -> None:
    eng = make_engine(max_num_seqs=2)
    log = record_batches(eng)
    reqs = [req(f"r{i}", 30 + i, 5 + i) for i in range(5)]
    run(eng, [(0.0, r) for r in reqs], fast_forward=False)
    assert_all_done(reqs)
    assert max(len(items) for _, items, _, _ in log) == 2
    # FCFS: r2 is admitted only once one of r0, r1 finished
    assert reqs[2].first_scheduled_time >= min(reqs[0].finish_time, reqs[1].finish_time)


# -- preemption ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast_forward", [True, False])
def test_preemption_under_a_small_cache_and_every_request_still_finishes(fast_forward: bool) -> None:
    eng = make_engine(num_gpu_blocks=12)  # 192 tokens; each request grows to 100 tokens (7 blocks)
    log = record_batches(eng)
    reqs = [req(f"r{i}", 40, 60) for i in range(4)]
    run(eng, [(0.01 * i, r) for i, r in enumerate(reqs)], fast_forward=fast_forward)
    assert eng.scheduler.num_preemptions > 0
    preempting = [(items, before) for _, items, b, before in log if b.preempted]
    assert preempting
    for items, before in preempting:  # a step that preempts admits nobody from the waiting queue
        assert {rid for rid, *_ in items} <= before
    assert sum(r.num_preemptions for r in reqs) == eng.scheduler.num_preemptions
    assert reqs[0].num_preemptions == 0  # the victim is always the last running request
    assert_all_done(reqs)
    assert eng.kv.num_free_blocks == 12
    assert not eng.has_work()

    # outputs do not depend on having been preempted
    roomy = make_engine()
    twins = [req(f"r{i}", 40, 60) for i in range(4)]
    run(roomy, [(0.01 * i, r) for i, r in enumerate(twins)], fast_forward=fast_forward)
    assert roomy.scheduler.num_preemptions == 0
    assert [r.output_token_ids for r in reqs] == [r.output_token_ids for r in twins]


# -- timing -------------------------------------------------------------------------------------------------------


def test_ttft_of_a_request_arriving_during_a_long_prefill() -> None:
    eng = make_engine()
    a = req("a", 4000, 5)
    b = req("b", 100, 5)
    d_a = LAT.prefill_time(4000)
    run(eng, [(0.0, a), (d_a / 2, b)])
    assert a.first_token_time == pytest.approx(d_a, rel=1e-12)
    # b waits for a's prefill step to end, then is prefilled next to a's first decode
    assert b.first_scheduled_time == pytest.approx(d_a, rel=1e-12)
    step2 = LAT.step_time(100, prefill_attn_term(100, 0), 1, 4001)
    assert b.first_token_time - b.arrival_time == pytest.approx(d_a / 2 + step2, rel=1e-12)


def test_step_time_equals_the_latency_model_of_the_batch_features() -> None:
    eng = make_engine(max_num_batched_tokens=96, num_gpu_blocks=40)
    log = record_batches(eng)
    reqs = [req(f"r{i}", n, m) for i, (n, m) in enumerate([(300, 20), (17, 40), (80, 8), (5, 30), (140, 12)])]
    outs = run(eng, [(0.013 * i, r) for i, r in enumerate(reqs)], fast_forward=False)
    assert_all_done(reqs)
    steps = [o for o in outs if o.outputs]
    assert len(steps) == len(log) == eng.num_steps
    saw_mixed = False
    for out, (now, items, _, _) in zip(steps, log, strict=True):
        decodes = [(n, c) for _, n, c, p in items if n == 1 and c >= p]
        prefills = [(n, c) for _, n, c, p in items if not (n == 1 and c >= p)]
        saw_mixed |= bool(decodes and prefills)
        expected = LAT.step_time(
            sum(n for n, _ in prefills),
            sum(prefill_attn_term(n, c) for n, c in prefills),
            len(decodes),
            sum(c + 1 for _, c in decodes),
        )
        assert out.start == now
        assert out.end - out.start == pytest.approx(expected, rel=1e-9)
    assert saw_mixed


# -- validation and abort -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "request_", "match"),
    [
        ({"max_model_len": 100}, Request("x", list(range(90)), 11, 0.0), "max_model_len"),
        ({"num_gpu_blocks": 4}, Request("x", list(range(60)), 5, 0.0), "KV cache capacity"),
        ({}, Request("x", [], 5, 0.0), "at least one token"),
        ({}, Request("x", [1, 2], 0, 0.0), "max_tokens"),
    ],
)
def test_add_request_rejects_invalid_requests(kwargs: dict, request_: Request, match: str) -> None:
    eng = make_engine(**kwargs)
    with pytest.raises(ValueError, match=match):
        eng.add_request(request_, 0.0)
    assert eng.num_waiting == 0 and eng.requests == {}


def test_add_request_accepts_exactly_max_model_len_and_kv_capacity() -> None:
    eng = make_engine(max_model_len=100)
    eng.add_request(Request("x", list(range(90)), 10, 0.0), 0.0)
    eng = make_engine(num_gpu_blocks=4)
    eng.add_request(Request("x", list(range(60)), 4, 0.0), 0.0)


def test_add_request_rejects_a_duplicate_id() -> None:
    eng = make_engine()
    eng.add_request(req("x", 5, 2), 0.0)
    with pytest.raises(ValueError, match="duplicate"):
        eng.add_request(req("x", 7, 2), 0.0)
    assert eng.num_waiting == 1


def test_abort_frees_blocks_of_a_running_request_and_removes_a_waiting_one() -> None:
    eng = make_engine(max_num_seqs=1, num_gpu_blocks=64)
    a, b = req("a", 100, 50), req("b", 30, 5)
    eng.add_request(a, 0.0)
    eng.add_request(b, 0.0)
    eng.advance(0.0, 0.1)
    assert a.status is Status.RUNNING and eng.kv.num_free_blocks < 64
    assert eng.abort_request("a", 0.1) is a
    assert a.status is Status.FINISHED_ABORTED and a.finish_reason == "abort" and a.finish_time == 0.1
    assert a.block_ids == [] and eng.kv.num_free_blocks == 64 and eng.num_running == 0
    assert eng.abort_request("a", 0.1) is None

    c = req("c", 10, 3)
    eng.add_request(c, 0.1)
    assert eng.abort_request("c", 0.1) is c and eng.num_waiting == 1  # only b is left waiting
    eng.advance(0.1, math.inf)
    assert_all_done([b])
    assert c.num_output_tokens == 0 and eng.kv.num_free_blocks == 64


# -- P/D prefill side ---------------------------------------------------------------------------------------------


def test_prefill_side_finishes_after_one_token_and_holds_blocks_until_released() -> None:
    eng = make_engine(num_gpu_blocks=64)
    r = req("p", 100, 50, do_remote_decode=True)
    run(eng, [(0.0, r)])
    assert r.status is Status.FINISHED_LENGTH and r.num_output_tokens == 1
    assert r.finish_time == pytest.approx(LAT.prefill_time(100), rel=1e-12)
    assert "p" in eng.held and eng.kv.num_free_blocks == 64 - math.ceil(101 / BS)
    assert eng.next_wakeup() == pytest.approx(r.finish_time + 480.0)
    assert eng.release_held("p") is True
    assert eng.kv.num_free_blocks == 64 and eng.held == {}
    assert eng.release_held("p") is False


def test_prefill_side_hold_expires_after_the_timeout() -> None:
    eng = make_engine(num_gpu_blocks=64, kv_hold_timeout_s=2.0)
    p = req("p", 100, 1, do_remote_decode=True)
    run(eng, [(0.0, p)])
    deadline = p.finish_time + 2.0
    # still held before the deadline
    eng.add_request(req("early", 4, 1), deadline - 1.0)
    eng.advance(deadline - 1.0, math.inf)
    assert "p" in eng.held
    # gone once a step runs after it
    eng.add_request(req("late", 4, 1), deadline + 0.5)
    eng.advance(deadline + 0.5, math.inf)
    assert eng.held == {} and eng.kv.num_free_blocks == 64


def test_a_request_blocked_by_held_blocks_starts_exactly_when_the_hold_expires() -> None:
    eng = make_engine(num_gpu_blocks=10, kv_hold_timeout_s=3.0)
    p = req("p", 120, 1, do_remote_decode=True)  # holds 8 of 10 blocks
    run(eng, [(0.0, p)])
    q = req("q", 100, 2)  # needs 7 blocks
    eng.add_request(q, p.finish_time)
    eng.advance(p.finish_time, math.inf)
    assert q.first_scheduled_time == pytest.approx(p.finish_time + 3.0)
    assert_all_done([q])


# -- P/D decode side ----------------------------------------------------------------------------------------------


def test_decode_side_waits_for_the_transfer_then_recomputes_only_the_last_prompt_token() -> None:
    eng = make_engine()
    r = req("d", 100, 4, remote_prefill={"from": 0})
    eng.add_request(r, 0.0)
    assert r.status is Status.WAITING_FOR_REMOTE_KVS
    outs = eng.advance(0.0, math.inf, fast_forward=False)
    ready = LAT.kv_transfer_time(99)
    assert r.kv_ready_time == pytest.approx(ready)
    assert outs[0].start == pytest.approx(ready)
    assert outs[0].prefill_tokens == 1
    assert r.first_token_time == pytest.approx(ready + LAT.step_time(1, prefill_attn_term(1, 99), 0, 0), rel=1e-12)
    assert r.num_cached_tokens == 0
    assert_all_done([r])
    assert eng.prompt_tokens_total == 100


def test_decode_side_pulls_only_what_the_local_prefix_cache_misses() -> None:
    eng = make_engine()
    shared = prompt(64, seed=5)
    warm = Request("warm", shared + prompt(20, seed=6), 2, 0.0)
    run(eng, [(0.0, warm)])
    t0 = warm.finish_time + 1.0
    r = Request("d", shared + prompt(36, seed=7), 3, 0.0, remote_prefill={"from": 0})
    hits_before = eng.kv.prefix_hits
    eng.add_request(r, t0)
    eng.advance(t0, math.inf)
    assert r.num_cached_tokens == 64
    assert eng.kv.prefix_hits - hits_before == 64
    expected = t0 + LAT.kv_transfer_time(100 - 1 - 64) + LAT.step_time(1, prefill_attn_term(1, 99), 0, 0)
    assert r.first_token_time == pytest.approx(expected, rel=1e-12)
    assert_all_done([r])


# Regression (EngineCore.add_request): busy_until used to move up to the arrival only when the engine had no
# work. An engine whose only request waits for its KV pull has work but a stale busy_until, so a request added later
# and driven from busy_until (as Cluster._advance does) is scheduled before it arrived.
def test_a_request_added_while_another_waits_for_its_kv_pull_starts_after_it_arrives() -> None:
    eng = make_engine()
    eng.add_request(req("x", 50, 3, remote_prefill={"from": 0}), 0.0)  # KV ready at kv_transfer_time(49) ~ 9 ms
    eng.advance(eng.busy_until, 0.005)
    y = req("y", 50, 3)
    eng.add_request(y, 0.005)
    eng.advance(eng.busy_until, math.inf)
    assert y.first_scheduled_time >= 0.005


# Regression (simulator/engine.py, EngineCore.advance): when step() returns None and next_wakeup() is not in the future,
# ``t = max(wake, t)`` does not move and advance loops forever. Reached on a decode replica whose remote-prefill
# requests hold every block while the first one whose KV has arrived needs one more block for its last prompt token
# (prompt = k * block_size + 1): nothing runs, and the wakeup is that request's past kv_ready_time.
@pytest.mark.timeout(1)
def test_advance_returns_when_remote_pulls_fill_the_cache() -> None:
    eng = make_engine(num_gpu_blocks=4)
    for i in range(2):
        eng.add_request(req(f"d{i}", 2 * BS + 1, 1, remote_prefill={"from": 0}), 0.0)  # 2 blocks each on arrival
    eng.advance(0.0, math.inf)

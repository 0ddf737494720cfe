"""EngineCore.advance fast-forwards pure-decode stretches in closed form; the result must be the same as stepping
one step at a time (property test over random small workloads)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models_for_tests import LAT

from simulator.engine import EngineConfig, EngineCore
from simulator.request import Request, Status
from simulator.scheduler import SchedulerConfig


@dataclass(frozen=True)
class Spec:
    arrival: float
    prompt: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    config: EngineConfig
    requests: tuple[Spec, ...]
    # True: advance from engine.busy_until, literally as Cluster._advance does; False: from the driver's clock
    from_busy_until: bool = False


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 8))
    shared = draw(st.booleans())
    prefix = [rng.randrange(100, 30000) for _ in range(draw(st.integers(1, 200)))] if shared else []
    specs = []
    t = 0.0
    for _ in range(n):
        t += 0.0 if draw(st.booleans()) else rng.expovariate(8.0)  # simultaneous arrivals, too
        length = draw(st.integers(1, 300))
        head = prefix[:length] if shared and draw(st.booleans()) else []
        tokens = head + [rng.randrange(100, 30000) for _ in range(length - len(head))]
        specs.append(Spec(t, tuple(tokens), draw(st.integers(1, 200))))
    block_size = draw(st.sampled_from([4, 16]))
    largest = max(math.ceil((len(s.prompt) + s.max_tokens) / block_size) for s in specs)
    small_cache = draw(st.booleans())
    num_gpu_blocks = largest + draw(st.integers(0, largest // 2)) if small_cache else 4096
    sched = SchedulerConfig(
        max_num_seqs=draw(st.sampled_from([1, 2, 3, 256])),
        max_num_batched_tokens=draw(st.sampled_from([16, 64, 512, 8192])),
        max_model_len=1024,
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 48])),
    )
    cfg = EngineConfig(
        scheduler=sched,
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        enable_prefix_caching=draw(st.booleans()) or shared,
    )
    return Workload(cfg, tuple(specs), draw(st.booleans()))


def replay(w: Workload, *, fast_forward: bool) -> tuple[EngineCore, list[Request]]:
    """Drive one engine the way the virtual-clock cluster does: advance to each arrival, add it, then drain."""
    eng = EngineCore(w.config, LAT)
    reqs = [Request(f"r{i}", list(s.prompt), s.max_tokens, s.arrival) for i, s in enumerate(w.requests)]
    now = 0.0
    for r in reqs:
        eng.advance(eng.busy_until if w.from_busy_until else now, r.arrival_time, fast_forward=fast_forward)
        now = r.arrival_time
        eng.add_request(r, now)
    eng.advance(eng.busy_until if w.from_busy_until else now, math.inf, fast_forward=fast_forward)
    return eng, reqs


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_fast_forward_equals_stepping_one_by_one(w: Workload) -> None:
    fast, fast_reqs = replay(w, fast_forward=True)
    slow, slow_reqs = replay(w, fast_forward=False)

    for f, s in zip(fast_reqs, slow_reqs, strict=True):
        rid = f.request_id
        assert s.status is Status.FINISHED_LENGTH and s.num_output_tokens == s.max_tokens, rid
        assert f.status is s.status, rid
        assert f.num_output_tokens == s.num_output_tokens, rid
        assert f.output_token_ids == s.output_token_ids, rid
        assert f.num_cached_tokens == s.num_cached_tokens, rid
        assert f.num_preemptions == s.num_preemptions, rid
        assert close(f.first_scheduled_time, s.first_scheduled_time), rid
        assert close(f.first_token_time, s.first_token_time), (rid, f.first_token_time, s.first_token_time)
        assert close(f.finish_time, s.finish_time), (rid, f.finish_time, s.finish_time)

    assert fast.num_steps == slow.num_steps
    assert (fast.kv.prefix_queries, fast.kv.prefix_hits) == (slow.kv.prefix_queries, slow.kv.prefix_hits)
    assert fast.scheduler.num_preemptions == slow.scheduler.num_preemptions
    assert fast.generation_tokens_total == slow.generation_tokens_total
    assert close(fast.busy_until, slow.busy_until)
    assert fast.kv.num_free_blocks == slow.kv.num_free_blocks == w.config.num_gpu_blocks


def test_fast_forward_actually_skips_steps() -> None:
    """Guard against the property test passing because fast-forward never kicks in."""
    w = Workload(
        EngineConfig(scheduler=SchedulerConfig(max_model_len=1024), block_size=16, num_gpu_blocks=256),
        (Spec(0.0, tuple(range(100, 150)), 200), Spec(0.0, tuple(range(300, 380)), 150)),
    )
    eng = EngineCore(w.config, LAT)
    reqs = [Request(f"r{i}", list(s.prompt), s.max_tokens, 0.0) for i, s in enumerate(w.requests)]
    for r in reqs:
        eng.add_request(r, 0.0)
    outs = eng.advance(0.0, math.inf)
    assert len(outs) < 10  # 200 steps collapse into a handful of outputs
    assert eng.num_steps == 200
    _, stepped = replay(w, fast_forward=False)
    assert [r.output_token_ids for r in reqs] == [r.output_token_ids for r in stepped]

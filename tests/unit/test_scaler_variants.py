"""Heterogeneous variants: the least-cost split of a group's requirement (``scaler.variants``)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from scaler.variants import KEEP_WITHIN, Variant, VariantGroup, split


def brute_force(req: float, vs: list[Variant]) -> float | None:
    """The least cost over every count combination (independent of scaler.variants' enumeration)."""
    best = None
    for counts in itertools.product(*(range(v.min_replicas, v.max_replicas + 1) for v in vs)):
        if sum(n * v.capacity for n, v in zip(counts, vs, strict=True)) >= req - 1e-9:
            cost = sum(n * v.cost_per_hour for n, v in zip(counts, vs, strict=True))
            best = cost if best is None else min(best, cost)
    return best


def random_group(rng: random.Random) -> list[Variant]:
    return [Variant(f"v{i}", round(rng.uniform(0.5, 6), 2), round(rng.uniform(1, 20), 2),
                    lo := rng.randint(0, 2), rng.randint(lo, 7)) for i in range(rng.randint(1, 3))]  # fmt: skip


def test_exact_split_is_the_least_cost_cover() -> None:
    rng = random.Random(7)
    for _ in range(300):
        vs = random_group(rng)
        req = rng.uniform(0, sum(v.capacity * v.max_replicas for v in vs) * 1.1)
        s = split(req, vs)
        best = brute_force(req, vs)
        if best is None:
            assert s.method == "at-max" and not s.feasible
            assert s.counts == {v.name: v.max_replicas for v in vs}
        else:
            assert s.capacity >= req - 1e-9 and s.method in ("exact", "kept")
            if s.method == "exact":
                assert s.cost_per_hour == pytest.approx(best)
            else:  # the minimally changed current mix, kept within the tolerance of the optimum
                assert best - 1e-9 <= s.cost_per_hour <= best * (1 + KEEP_WITHIN) + 1e-9
            assert split(req, vs, exact=True).cost_per_hour <= best * (1 + KEEP_WITHIN) + 1e-9
        for v in vs:
            assert v.min_replicas <= s.counts[v.name] <= v.max_replicas


def test_greedy_is_within_one_replica_of_the_dearest_variant() -> None:
    rng = random.Random(11)
    for _ in range(300):
        vs = random_group(rng)
        req = rng.uniform(0, sum(v.capacity * v.max_replicas for v in vs))
        g, best = split(req, vs, exact=False), brute_force(req, vs)
        assert best is not None and g.capacity >= req - 1e-9
        assert g.cost_per_hour <= best + max(v.cost_per_hour for v in vs) + 1e-9


def test_cheapest_capacity_per_dollar_first_and_bounds_respected() -> None:
    h100 = Variant("h100", cost_per_hour=4.0, capacity=10.0, max_replicas=10)  # 0.40 per unit
    a100 = Variant("a100", cost_per_hour=1.6, capacity=3.0, max_replicas=4)  # 0.53 per unit
    assert split(40, [h100, a100]).counts == {"h100": 4, "a100": 0}
    assert split(33, [h100, a100]).counts == {"h100": 3, "a100": 1}  # 3.5 h100s' worth: an a100 is cheaper
    assert split(130, [h100, a100]).counts == {"h100": 10, "a100": 4}  # beyond all: everything, flagged
    assert not split(130, [h100, a100]).feasible
    floor = Variant("a100", cost_per_hour=1.6, capacity=3.0, min_replicas=2, max_replicas=4)
    assert split(5, [h100, floor]).counts == {"h100": 0, "a100": 2}


def test_current_mix_is_kept_within_the_tolerance() -> None:
    a = Variant("a", 2.0, 5.0, max_replicas=10, current=2)
    b = Variant("b", 2.05, 5.0, max_replicas=10, current=0)
    over = split(10, [a, Variant("b", 2.0, 5.0, max_replicas=10, current=2)])  # 20 units for 10: twice the cost
    assert over.cost_per_hour == 4.0 and sum(over.counts.values()) == 2
    kept = split(10, [Variant("a", 2.0, 5.0, max_replicas=10, current=0),
                      Variant("b", 2.0 * (1 + KEEP_WITHIN / 2), 5.0, max_replicas=10, current=2)])  # fmt: skip
    assert kept.method == "kept" and kept.counts == {"a": 0, "b": 2}
    moved = split(10, [a, Variant("b", 3.0, 5.0, max_replicas=10, current=2)])  # b is 50 % dearer: move
    assert moved.counts == {"a": 2, "b": 0}
    assert split(10, [a, b]).counts == {"a": 2, "b": 0}


def test_a_variant_no_replica_of_which_meets_the_slo_stays_at_its_minimum() -> None:
    s = split(20, [Variant("ok", 3.0, 10.0), Variant("dead", 1.0, 0.0, min_replicas=1, max_replicas=5)])
    assert s.counts == {"ok": 2, "dead": 1}


def test_pending_variant_is_capped_at_its_ready_pods_and_its_share_moves() -> None:
    g = VariantGroup(unavailable_after_s=100.0, retry_after_s=600.0)
    common = {"min_replicas": 0, "max_replicas": 10}
    # the cheap variant (a100) is asked for 4 but only 1 pod ever becomes ready (no nodes of that type)
    h100_ready = 1
    for t in range(0, 301, 10):
        g.update("h100", t, cost_per_hour=4.0, desired=1, capacity=10.0, ready=h100_ready, **common)
        s = g.update("a100", t, cost_per_hour=1.0, desired=4, capacity=5.0, ready=1, **common)
        h100_ready = s.counts["h100"]  # h100 nodes exist: its pods become ready
        if 0 < t < 100:  # 20 units (the h100 member has no pod: its one-replica floor is not demand), cheapest
            assert s.counts == {"h100": 0, "a100": 4}
    assert g.unavailable(300) == ["a100"]
    assert s.counts["a100"] <= 1 and s.capacity >= s.requirement  # the rest moved to the h100s
    # the cap holds until it expires (no flapping back at once), then the cheap variant is tried again
    s = g.update("a100", 310, cost_per_hour=1.0, desired=4, capacity=5.0, ready=1, **common)
    assert s.counts["a100"] <= 1
    assert g.update("a100", 310 + 601, cost_per_hour=1.0, desired=4, capacity=5.0, ready=1,
                    **common).counts["a100"] > 1  # retried after retry_after_s  # fmt: skip


def test_unschedulable_pods_make_a_variant_unavailable_sooner_than_slow_starting_ones() -> None:
    """Short of ready pods: with pods the scheduler could not place it is unavailable after
    ``unschedulable_after_s``; with scheduled pods still starting, only after ``unavailable_after_s``."""
    common = {"min_replicas": 0, "max_replicas": 10}

    def run(unschedulable: int | None) -> list[str]:
        g = VariantGroup(unavailable_after_s=300.0, retry_after_s=600.0, unschedulable_after_s=60.0)
        for t in range(0, 121, 10):
            g.update("h100", t, cost_per_hour=4.0, desired=1, capacity=10.0, ready=1, **common)
            s = g.update("a100", t, cost_per_hour=1.0, desired=4, capacity=5.0, ready=1,
                         unschedulable=unschedulable, **common)  # fmt: skip
        assert s.capacity >= s.requirement
        return g.unavailable(120)

    assert run(3) == ["a100"]  # no node of that type for over a minute: its share moved
    assert run(0) == [] and run(None) == []  # starting (or unknown): still waiting for its pods


def test_requirement_sums_fractional_needs_and_holds_over_the_stable_window() -> None:
    g = VariantGroup(unavailable_after_s=1e9, retry_after_s=1.0, stable_window_s=60.0)
    kw = {"cost_per_hour": 1.0, "min_replicas": 0, "max_replicas": 10, "capacity": 10.0, "ready": 2}
    g.update("a", 0, desired=2, need=1.2, **kw)
    s = g.update("b", 0, desired=2, need=1.2, **{**kw, "cost_per_hour": 1.5})
    assert s.requirement == pytest.approx(24.0)  # 2.4 replicas' worth, not 4 rounded-up ones
    assert s.counts == {"a": 3, "b": 0}
    s = g.update("a", 30, desired=1, need=0.2, **kw)  # demand falls: held for the stable window
    assert s.requirement == pytest.approx(24.0)
    s = g.update("a", 90, desired=1, need=0.2, **kw)
    assert s.requirement == pytest.approx(14.0)
    s = g.update("a", 95, desired=5, need=None, **kw)  # growing: its desired count is what it plans
    assert s.requirement == pytest.approx(62.0)


def test_requirement_is_what_the_members_planned() -> None:
    g = VariantGroup(unavailable_after_s=1e9, retry_after_s=1.0)
    g.update("h100", 0, cost_per_hour=4.0, min_replicas=0, max_replicas=10, desired=3, capacity=10.0, ready=3)
    s = g.update("a100", 0, cost_per_hour=1.6, min_replicas=0, max_replicas=10, desired=2, capacity=3.0, ready=2)
    assert s.requirement == pytest.approx(3 * 10 + 2 * 3)
    assert s.capacity >= s.requirement and s.cost_per_hour == pytest.approx(brute_force(36, [
        Variant("h100", 4.0, 10.0, 0, 10), Variant("a100", 1.6, 3.0, 0, 10)]))  # fmt: skip
    assert math.isfinite(s.cost_per_hour)

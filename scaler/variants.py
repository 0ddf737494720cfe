"""Heterogeneous variants: several Deployments of one role on different hardware, scaled together at least cost.

Each variant has its own ScaledObject (metadata ``variantGroup`` naming the group, ``costPerHour`` the price of
one replica, ``latencyModel`` its hardware's model, ``minReplicas``/``maxReplicas`` its bounds). Every member
decides for itself as usual (its own pods' signals, its own latency model, its own stability rules); the group
then turns those decisions into one requirement and splits it across the variants:

* **requirement** ``R``: the sum over members of what each plans to serve, in the pool's demand unit (prefill
  tokens/s, decode tokens/s or requests/s): its fractional ``need`` (forecast demand with its queue and KV
  corrections) times what one of its replicas serves under the SLO (its decision's ``capacity_per_replica``), or,
  while it grows (scale-up, panic, queue, KV pressure: the fast paths), its ``desired`` count times that capacity;
  a member with no ready pod counts 0 (it sees no traffic, and its own one-replica floor is not demand). ``R`` is
  held at its largest value over the stable window (as a single pool's scale-down is), and the members' needs
  are summed before rounding, so the group does not pay one rounded-up replica per variant;
* **split** (:func:`split`): the integer counts ``n_i`` in ``[min_i, max_i]`` with ``sum n_i x capacity_i >= R``
  at the least ``sum n_i x cost_i``: exact (enumeration) for small groups, else greedy (cheapest capacity per
  dollar first; its cost is at most the optimum plus the price of one replica of the dearest variant, since the
  greedy order is the optimum of the fractional problem and only its last variant is rounded up);
* **hysteresis**: the current counts, grown by the cheapest capacity per dollar (or shrunk from the dearest) just
  enough to cover ``R``, are kept while they cost at most ``KEEP_WITHIN`` more than the optimum, so near-equal
  mixes do not swap pods back and forth (every swap pays a cold start for the new pods);
* **unavailable variants**: a member whose ready pods stayed below its share for ``unavailable_after_s`` (two
  cold starts and a minute: its pods never became ready) is capped at its ready pods, and the rest of the
  requirement goes to the others; so is one short of ready pods while some of its pods are unschedulable (the
  pod watch sees them Pending with PodScheduled False, reason Unschedulable: no node of that GPU type) for
  ``unschedulable_after_s`` (60 s: the scheduler's retries and a node autoscaler's first reaction; a node it
  adds later frees the cap as its pods become ready). The cap is retried when it expires (``retry_after_s``).

Each member's ``GetMetrics`` then answers its share; the decision's reason is ``variant-split``.

:data:`GROWING` are the member reasons whose ``desired`` count (not the fractional need) is what it plans.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from scaler.policy import Decision

EXACT_MAX_COMBINATIONS = 200_000  # enumerate when the product of the free ranges (all but one variant) is below this
KEEP_WITHIN = 0.15  # keep the (minimally changed) current mix while it costs at most 15 % above the optimum
GROWING = frozenset({"scale-up", "panic", "queue", "kv-cache", "rate-limited", "max-replicas"})


def planned_need(reason: str, need: float) -> float | None:
    """What a member's decision contributes: its fractional ``need``, or None (its desired count) while growing."""
    return None if reason in GROWING or not math.isfinite(need) else need


@dataclass(frozen=True)
class Variant:
    name: str
    cost_per_hour: float
    capacity: float  # demand units one replica serves under the SLO
    min_replicas: int = 0
    max_replicas: int = 100
    current: int = 0  # replicas it has now (its share as last applied)


@dataclass(frozen=True)
class Split:
    counts: dict[str, int]
    cost_per_hour: float
    capacity: float
    requirement: float
    method: str  # exact | greedy | kept | at-max
    feasible: bool = True


def _cost(variants: Sequence[Variant], counts: Sequence[int]) -> float:
    return sum(v.cost_per_hour * n for v, n in zip(variants, counts, strict=True))


def _cap(variants: Sequence[Variant], counts: Sequence[int]) -> float:
    return sum(v.capacity * n for v, n in zip(variants, counts, strict=True))


def _exact(vs: Sequence[Variant], need: float) -> list[int] | None:
    """The least-cost counts meeting ``need`` (None: the product of ranges is too large to enumerate)."""
    *free, last = vs
    ranges = [range(v.min_replicas, v.max_replicas + 1) for v in free]
    if math.prod(len(r) for r in ranges) > EXACT_MAX_COMBINATIONS:
        return None
    best: tuple[float, float, int, list[int]] | None = None
    for combo in itertools.product(*ranges):
        rest = need - _cap(free, combo)
        n_last = last.min_replicas if rest <= 0 else max(last.min_replicas, math.ceil(rest / last.capacity - 1e-9))
        if n_last > last.max_replicas:
            continue
        counts = [*combo, n_last]
        # least cost, then least spare capacity, then fewest changes to the current counts
        key = (round(_cost(vs, counts), 9), round(_cap(vs, counts) - need, 9),
               sum(abs(n - v.current) for n, v in zip(counts, vs, strict=True)), counts)  # fmt: skip
        if best is None or key < best:
            best = key
    return None if best is None else best[3]


def _by_value(vs: Sequence[Variant]) -> list[int]:
    """Indices of ``vs``, cheapest capacity per dollar first."""
    return sorted(range(len(vs)), key=lambda i: (vs[i].cost_per_hour / vs[i].capacity, vs[i].name))


def _grow(vs: Sequence[Variant], counts: list[int], need: float) -> list[int]:
    """``counts`` grown by the cheapest capacity per dollar (within each maximum) until they cover ``need``."""
    for i in _by_value(vs):
        rest = need - _cap(vs, counts)
        if rest <= 0:
            break
        counts[i] = min(vs[i].max_replicas, counts[i] + math.ceil(rest / vs[i].capacity - 1e-9))
    return counts


def _greedy(vs: Sequence[Variant], need: float) -> list[int]:
    return _grow(vs, [v.min_replicas for v in vs], need)


def _incremental(vs: Sequence[Variant], need: float) -> list[int]:
    """The current counts changed as little as possible: grown by the cheapest capacity per dollar until they cover
    ``need``, or shrunk from the dearest per unit of capacity while they still cover it."""
    counts = [min(max(v.current, v.min_replicas), v.max_replicas) for v in vs]
    if _cap(vs, counts) < need:
        return _grow(vs, counts, need)
    for i in reversed(_by_value(vs)):
        while counts[i] > vs[i].min_replicas and _cap(vs, counts) - vs[i].capacity >= need - 1e-9:
            counts[i] -= 1
    return counts


def split(requirement: float, variants: Sequence[Variant], *, exact: bool = True) -> Split:
    """Counts per variant covering ``requirement`` at the least cost (see the module docstring)."""
    if not variants:
        raise ValueError("a variant group needs at least one variant")
    vs = [v for v in variants if v.capacity > 0]
    dead = [v for v in variants if v.capacity <= 0]  # no replica of it meets the SLO: keep it at its minimum
    base = {v.name: v.min_replicas for v in dead}
    if not vs:
        return Split(base, _cost(dead, list(base.values())), 0.0, requirement, "at-max", requirement <= 0)
    need = max(0.0, requirement)
    top = [v.max_replicas for v in vs]
    if _cap(vs, top) < need:  # even every replica is not enough: all at their maximum
        counts, method, feasible = top, "at-max", False
    else:
        counts = _exact(vs, need) if exact else None
        method = "exact" if counts is not None else "greedy"
        if counts is None:
            counts = _greedy(vs, need)
        feasible = True
        inc = _incremental(vs, need)
        if _cost(vs, inc) <= _cost(vs, counts) * (1 + KEEP_WITHIN) + 1e-9:
            counts, method = inc, "kept"
    out = {**{v.name: n for v, n in zip(vs, counts, strict=True)}, **base}
    return Split(out, _cost(vs, counts) + _cost(dead, list(base.values())), _cap(vs, counts), requirement, method,
                 feasible)  # fmt: skip


@dataclass
class Member:
    """What the group knows of one variant: its settings and its last own decision."""

    name: str
    cost_per_hour: float
    min_replicas: int
    max_replicas: int
    desired: int = 0
    need: float | None = None  # fractional need when not growing (None: count desired)
    capacity: float = 0.0
    ready: int = 0
    share: int | None = None
    short_since: float | None = None  # since when its ready pods are below its share
    unschedulable: int = 0  # its pods the scheduler could not place (0 where unknown)
    unschedulable_since: float | None = None  # since when it is short with unschedulable pods
    capped_until: float = -math.inf


@dataclass
class VariantGroup:
    """The members of one group (namespace, ``variantGroup``, pool) and their last split."""

    unavailable_after_s: float
    retry_after_s: float
    stable_window_s: float = 0.0  # the requirement is held at its largest value over this window
    unschedulable_after_s: float = 60.0  # short of pods with unschedulable ones this long: unavailable
    members: dict[str, Member] = field(default_factory=dict)
    last: Split | None = None
    _history: deque[tuple[float, float]] = field(default_factory=deque)

    @classmethod
    def for_pods(cls, startup_s: float, stable_window_s: float) -> VariantGroup:
        """A group whose members' pods start in ``startup_s``: a variant short of pods for two cold starts and a
        minute is unavailable, retried after ``max(600 s, 4 cold starts)``."""
        return cls(unavailable_after_s=2 * startup_s + 60.0, retry_after_s=max(600.0, 4 * startup_s),
                   stable_window_s=stable_window_s)

    def observe(self, name: str, now: float, d: Decision, *, ready: int, cost_per_hour: float, min_replicas: int,
                max_replicas: int, unschedulable: int | None = None) -> Split:  # fmt: skip
        """:meth:`update` from member ``name``'s own good decision ``d`` (its capacity per replica and what it
        plans, :func:`planned_need`) with ``ready`` pods."""
        cap = d.inputs.get("capacity_per_replica", 0.0)
        return self.update(name, now, cost_per_hour=cost_per_hour, min_replicas=min_replicas,
                           max_replicas=max_replicas, desired=d.desired,
                           capacity=cap if math.isfinite(cap) and cap > 0 else 0.0, ready=ready,
                           need=planned_need(d.reason, d.need), unschedulable=unschedulable)  # fmt: skip

    def update(self, name: str, now: float, *, cost_per_hour: float, min_replicas: int, max_replicas: int,
               desired: int, capacity: float, ready: int, need: float | None = None,
               unschedulable: int | None = None) -> Split:  # fmt: skip
        """Record member ``name``'s latest own decision and re-split the group. ``need``: the member's fractional
        need when it is not growing (None: its ``desired`` count is what it plans). ``unschedulable``: its pods
        the scheduler could not place (None: unknown, e.g. static pod URLs or the virtual cluster)."""
        m = self.members.get(name)
        if m is None:
            m = self.members[name] = Member(name, cost_per_hour, min_replicas, max_replicas)
        m.cost_per_hour, m.min_replicas, m.max_replicas = cost_per_hour, min_replicas, max_replicas
        m.desired, m.capacity, m.ready = desired, capacity, ready
        m.unschedulable = max(int(unschedulable or 0), 0)
        m.need = need if need is None or math.isfinite(need) else None
        variants = []
        for x in self.members.values():
            if x.share is not None and x.ready < x.share:
                x.short_since = now if x.short_since is None else x.short_since
                if x.unschedulable <= 0:
                    x.unschedulable_since = None
                elif x.unschedulable_since is None:
                    x.unschedulable_since = now
                since = x.unschedulable_since
                no_node = since is not None and now - since >= self.unschedulable_after_s
                if (no_node or now - x.short_since >= self.unavailable_after_s) and now >= x.capped_until:
                    x.capped_until = now + self.retry_after_s
            else:
                x.short_since = x.unschedulable_since = None
            hi = x.max_replicas
            if now < x.capped_until:
                hi = max(min(hi, x.ready), x.min_replicas)
            variants.append(Variant(x.name, x.cost_per_hour, x.capacity, min(x.min_replicas, hi), hi,
                                    x.share if x.share is not None else x.desired))  # fmt: skip
        # a member with no ready pod sees no traffic: its own floor (one replica) is not demand
        raw = sum((x.desired if x.need is None else max(x.need, 0.0)) * x.capacity
                  for x in self.members.values() if x.ready > 0)  # fmt: skip
        self._history.append((now, raw))
        while self._history and self._history[0][0] < now - self.stable_window_s:
            self._history.popleft()
        requirement = max(r for _, r in self._history)
        s = split(requirement, variants)
        for x in self.members.values():
            x.share = s.counts[x.name]
        self.last = s
        return s

    def forget(self, name: str) -> None:
        self.members.pop(name, None)

    def unavailable(self, now: float) -> list[str]:
        return sorted(x.name for x in self.members.values() if now < x.capped_until)

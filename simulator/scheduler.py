"""Continuous-batching scheduler after vLLM v1's ``Scheduler.schedule()``.

Every step has a token budget (``max_num_batched_tokens``). Running requests are served first, in order: a decode
asks for one token, a request still prefilling for the rest of its prompt (chunked to the budget). If a running
request cannot get a KV block, the *last* running request is preempted (freed, reset to zero computed tokens and
put back at the head of the waiting queue: vLLM's recompute preemption) until it fits. Then, if nothing was
preempted, waiting requests are admitted FCFS while the budget, ``max_num_seqs`` and free blocks allow, each first
attaching its longest cached prefix.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from simulator.kv_cache import KVCacheManager
from simulator.request import Request, Status


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 1024
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    long_prefill_token_threshold: int = 0  # 0 = no cap on one request's chunk beyond the step budget

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(slots=True)
class ScheduledBatch:
    """What one step computes: (request, new tokens) pairs, plus the step-time features of the batch."""

    items: list[tuple[Request, int]] = field(default_factory=list)
    prefill_tokens: int = 0
    prefill_attn: float = 0.0
    decode_seqs: int = 0
    decode_ctx: int = 0
    preempted: list[Request] = field(default_factory=list)

    def add(self, req: Request, n: int) -> None:
        self.items.append((req, n))
        c = req.num_computed_tokens
        if n == 1 and c >= req.num_prompt_tokens:
            self.decode_seqs += 1
            self.decode_ctx += c + 1
        else:
            self.prefill_tokens += n
            self.prefill_attn += n * (c + n / 2.0)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        kv_transfer_time: Callable[[int], float] = lambda tokens: 0.0,
    ) -> None:
        self.config = config
        self.kv = kv
        self.kv_transfer_time = kv_transfer_time
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, n: int, budget: int) -> int:
        t = self.config.long_prefill_token_threshold
        if t > 0:
            n = min(n, t)
        return min(n, budget)

    def _preempt(self, victim: Request) -> None:
        self.kv.free(victim)
        victim.status = Status.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self, now: float) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        kv = self.kv

        # 1. running requests, in order
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            if (
                n == 1
                and req.num_computed_tokens < len(req.block_ids) * kv.block_size
                and req.num_hashed_blocks >= len(req.block_hashes)
            ):  # a decode whose slot exists and has nothing to hash: what allocate() would conclude, cheaply
                batch.add(req, 1)
                budget -= 1
                i += 1
                continue
            while not kv.allocate(req, n):
                victim = self.running.pop()  # lowest priority under FCFS: the last one
                if any(r is victim for r, _ in batch.items):  # it may have been scheduled earlier in this step
                    batch.items = [(r, k) for r, k in batch.items if r is not victim]
                    batch = _rebuild(batch)
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            else:
                batch.add(req, n)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: nothing after it can run either

        # 2. waiting requests, only if nothing was preempted (as vLLM)
        if batch.preempted:
            return batch
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.status is Status.WAITING_FOR_REMOTE_KVS:
                if not self._remote_kv_ready(req, now):
                    skipped.append(self.waiting.popleft())
                    continue
                n = self._chunk(req.num_tokens - req.num_computed_tokens, budget)
                computed: list[int] = []
            else:
                computed = kv.computed_prefix(req) if req.num_computed_tokens == 0 else []
                n_cached = len(computed) * kv.block_size
                n = self._chunk(req.num_tokens - req.num_computed_tokens - n_cached, budget)
            if not kv.allocate(req, n, computed):
                break
            self.waiting.popleft()
            if req.status is not Status.WAITING_FOR_REMOTE_KVS and req.num_computed_tokens == 0:
                hit = len(computed) * kv.block_size
                kv.record_prefix_query(req.num_tokens, hit)
                req.num_computed_tokens = hit
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = hit
            if req.first_scheduled_time < 0:
                req.first_scheduled_time = now
            req.status = Status.RUNNING
            self.running.append(req)
            batch.add(req, n)
            budget -= n
        for req in reversed(skipped):
            self.waiting.appendleft(req)
        return batch

    def _remote_kv_ready(self, req: Request, now: float) -> bool:
        """P/D decode side (like vLLM's NIXL connector): attach the local prefix hit, allocate blocks for the rest
        of the prompt but its last token and start the pull; the request runs once the pulled KV is in place,
        recomputing only the last prompt token."""
        if req.kv_ready_time < 0:
            computed = self.kv.computed_prefix(req)
            hit = len(computed) * self.kv.block_size
            remote = max(req.num_prompt_tokens - 1 - hit, 0)
            if not self.kv.allocate(req, remote, computed):
                return False
            self.kv.record_prefix_query(req.num_tokens, hit)
            req.num_cached_tokens = hit
            req.num_computed_tokens = hit + remote
            req.kv_ready_time = now + self.kv_transfer_time(remote)
        return now >= req.kv_ready_time

    def remove_finished(self, finished: list[Request]) -> None:
        if finished:
            gone = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in gone]

    def abort(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)


def _rebuild(batch: ScheduledBatch) -> ScheduledBatch:
    """Recompute a batch's features after a request was dropped from it (rare: preemption of a scheduled one)."""
    out = ScheduledBatch(preempted=batch.preempted)
    for r, n in batch.items:
        out.add(r, n)
    return out

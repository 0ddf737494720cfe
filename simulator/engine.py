"""The engine core: one vLLM-like replica (scheduler + KV cache + step-time model), driven by any clock.

The core never reads a clock. A driver calls ``step(now)``: the core schedules a batch at ``now``, applies its
effects (tokens appended, blocks cached, requests finished) and returns when the step *ends* according to the
latency model. The HTTP driver sleeps until then and streams the tokens; the virtual-clock driver jumps there.
``advance(now, until)`` runs several steps at once and fast-forwards pure-decode stretches in closed form
(bit-for-bit the same result as stepping one by one; tested), which is what makes hour-long traces cheap.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvscale.hashing import ROOT_HASH, block_hashes
from kvscale.latency import LatencyModel
from kvscale.traces.prompts import BlockPrompt
from simulator.kv_cache import KVCacheManager
from simulator.request import Request, Status, SyntheticPrompt
from simulator.scheduler import ScheduledBatch, Scheduler, SchedulerConfig

# P/D prefill side: how long blocks of a finished prefill wait for the decode side's pull (vLLM's NIXL default
# VLLM_NIXL_ABORT_REQUEST_TIMEOUT is 480 s).
DEFAULT_KV_HOLD_TIMEOUT_S = 480.0


@dataclass(frozen=True, slots=True)
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    block_size: int = 16
    num_gpu_blocks: int = 32768
    enable_prefix_caching: bool = True
    # Output token ids are drawn deterministically from [lo, hi): the driver picks a range its tokenizer decodes.
    output_token_range: tuple[int, int] = (1000, 30000)
    kv_hold_timeout_s: float = DEFAULT_KV_HOLD_TIMEOUT_S
    # False: outputs are counted, not materialised, and output blocks are never registered in the prefix cache.
    # The virtual-clock driver uses this (its traces cannot refer to generated tokens); timing is unchanged.
    materialize_outputs: bool = True


@dataclass(slots=True)
class StepOutput:
    """Effects of one step, or of a fast-forwarded run of ``num_steps`` decode steps.

    ``outputs`` lists (request, n): the request got ``n`` new tokens (0 or 1 for a single step; ``num_steps`` for
    every request of a run, one per step). Step j of a run lasts ``step_durations()[j]``: the first step's
    duration plus ``j * step_slope_s``.
    ``itl_tokens`` counts the new tokens that follow an earlier token of their request (inter-token gaps).
    """

    start: float
    end: float
    outputs: list[tuple[Request, int]]
    finished: list[Request]
    preempted: list[Request]
    prefill_tokens: int = 0
    decode_seqs: int = 0
    itl_tokens: int = 0
    num_steps: int = 1
    step_slope_s: float = 0.0

    def step_durations(self) -> np.ndarray:
        k = self.num_steps
        if k == 1:
            return np.array([self.end - self.start])
        first = (self.end - self.start - self.step_slope_s * k * (k - 1) / 2.0) / k
        return first + self.step_slope_s * np.arange(k)


class EngineCore:
    def __init__(self, config: EngineConfig, latency: LatencyModel, *, record_events: bool = False) -> None:
        self.config = config
        self.latency = latency
        self.kv = KVCacheManager(
            config.num_gpu_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            record_events=record_events,
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, latency.kv_transfer_time)
        self.requests: dict[str, Request] = {}
        # P/D prefill side: finished requests whose blocks wait for the decoder's pull: id -> (request, deadline)
        self.held: dict[str, tuple[Request, float]] = {}
        self.busy_until = 0.0
        lo, hi = config.output_token_range
        self._token_pool = np.random.default_rng(7).integers(lo, hi, 4099).tolist()
        # counters (the HTTP driver exports them as vllm:* metrics)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps = 0

    # -- requests ------------------------------------------------------------------------------------------------
    def add_request(self, req: Request, now: float, *, arrival_time: float | None = None) -> None:
        """Queue ``req`` at ``now``. ``arrival_time`` (default ``now``) is when the request reached the server, if
        earlier: the API server's per-request overhead lies between the two, and TTFT counts from arrival."""
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if req.num_prompt_tokens < 1:
            raise ValueError("prompt must have at least one token")
        total = req.num_prompt_tokens + req.max_tokens
        if total > self.config.scheduler.max_model_len:
            raise ValueError("prompt plus max_tokens exceeds max_model_len")
        if total > self.config.num_gpu_blocks * self.config.block_size:
            raise ValueError("prompt plus max_tokens exceeds the KV cache capacity")
        # Nothing computed so far can have started before this arrival (idle, or only waiting for KV pulls).
        self.busy_until = max(self.busy_until, now)
        req.arrival_time = now if arrival_time is None else min(arrival_time, now)
        if isinstance(req.prompt_token_ids, SyntheticPrompt | BlockPrompt):  # lazy prompts hash themselves
            req.block_hashes = req.prompt_token_ids.block_hashes(self.config.block_size)
        else:
            req.block_hashes = block_hashes(req.prompt_token_ids, self.config.block_size, extra=req.extra_key)
        if req.remote_prefill is not None:
            req.status = Status.WAITING_FOR_REMOTE_KVS
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def abort_request(self, request_id: str, now: float) -> Request | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.abort(req)
        self.kv.free(req)
        req.status = Status.FINISHED_ABORTED
        req.finish_time = now
        return req

    def release_held(self, request_id: str) -> bool:
        """P/D: the decoder pulled the KV of a finished prefill; free its blocks."""
        item = self.held.pop(request_id, None)
        if item is None:
            return False
        self.kv.free(item[0])
        return True

    def _expire_held(self, now: float) -> None:
        if self.held:
            for rid in [rid for rid, (_, deadline) in self.held.items() if deadline <= now]:
                self.release_held(rid)

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished()

    def next_wakeup(self) -> float | None:
        """Earliest time something changes without a new request (a KV pull completing, a hold expiring)."""
        times = [r.kv_ready_time for r in self.scheduler.waiting if r.kv_ready_time >= 0]
        times += [deadline for _, deadline in self.held.values()]
        return min(times) if times else None

    # -- stepping ------------------------------------------------------------------------------------------------
    def _new_tokens(self, req: Request, n: int) -> list[int]:
        """Deterministic pseudo-random output ids: a window into a fixed pool, offset by the request id."""
        pool = self._token_pool
        start = (zlib.crc32(req.request_id.encode()) + req.num_output_tokens) % len(pool)
        out = pool[start : start + n]
        while len(out) < n:
            out += pool[: n - len(out)]
        return out

    def _append(self, req: Request, n: int) -> None:
        if not self.config.materialize_outputs:
            req.num_output_tokens += n
            return
        req.output_token_ids.extend(self._new_tokens(req, n))
        req.num_output_tokens += n
        bs = self.config.block_size
        n_full_before = len(req.block_hashes)
        n_full = req.num_tokens // bs
        if n_full > n_full_before:
            parent = req.block_hashes[-1] if req.block_hashes else ROOT_HASH
            tail = req.token_slice(n_full_before * bs, n_full * bs)
            req.block_hashes.extend(block_hashes(tail, bs, parent=parent, extra=req.extra_key))

    def _finish(self, req: Request, now: float, finished: list[Request]) -> None:
        req.status = Status.FINISHED_LENGTH
        req.finish_time = now
        self.requests.pop(req.request_id, None)
        finished.append(req)
        if req.do_remote_decode:
            self.held[req.request_id] = (req, now + self.config.kv_hold_timeout_s)
        else:
            self.kv.free(req)

    def step(self, now: float) -> StepOutput | None:
        """Schedule and run one step starting at ``now``; None when nothing can run now."""
        now = max(now, self.busy_until)
        self._expire_held(now)
        batch = self.scheduler.schedule(now)
        if not batch.items:
            return None if not batch.preempted else StepOutput(now, now, [], [], batch.preempted)
        dur = self.latency.step_time(batch.prefill_tokens, batch.prefill_attn, batch.decode_seqs, batch.decode_ctx)
        end = now + dur
        return self._apply(batch, now, end)

    def _apply(self, batch: ScheduledBatch, start: float, end: float) -> StepOutput:
        outputs: list[tuple[Request, int]] = []
        finished: list[Request] = []
        itl_tokens = 0
        for req, n in batch.items:
            req.num_computed_tokens += n
            if req.num_computed_tokens < req.num_tokens:
                outputs.append((req, 0))  # a prefill chunk that does not reach the end of the prompt yet
                continue
            if req.first_token_time < 0:
                req.first_token_time = end
                self.prompt_tokens_total += req.num_prompt_tokens
            self._append(req, 1)
            if req.num_output_tokens > 1:
                itl_tokens += 1
            req.last_token_time = end
            self.generation_tokens_total += 1
            outputs.append((req, 1))
            if req.num_output_tokens >= req.max_tokens or req.do_remote_decode:
                self._finish(req, end, finished)
        self.scheduler.remove_finished(finished)
        self.busy_until = end
        self.num_steps += 1
        return StepOutput(
            start, end, outputs, finished, batch.preempted, batch.prefill_tokens, batch.decode_seqs, itl_tokens
        )

    # -- fast-forward ----------------------------------------------------------------------------------------------
    def _pure_decode_run(self, now: float, until: float) -> StepOutput | None:
        """Run k >= 2 identical-shape decode steps in closed form when nothing else can change the batch:
        nobody waiting (or ``max_num_seqs`` reached), every running request decoding, enough free blocks."""
        sched = self.scheduler
        running = sched.running
        if not running or self.held or (sched.waiting and len(running) < sched.config.max_num_seqs):
            return None
        if sched.config.long_prefill_token_threshold == 0 and len(running) > sched.config.max_num_batched_tokens:
            return None
        d = len(running)
        ctx0 = 0
        k = 1 << 30
        for r in running:
            c = r.num_computed_tokens
            if c != r.num_tokens - 1 or c < r.num_prompt_tokens:
                return None
            ctx0 += c + 1
            k = min(k, r.max_tokens - r.num_output_tokens)
        if k < 2:
            return None
        coef = self.latency.coefficients
        first = coef.base_s + coef.per_decode_seq_s * d + coef.per_decode_ctx_s * ctx0
        slope = coef.per_decode_ctx_s * d
        # steps must start before `until`: start_j = now + j*first + slope*j*(j-1)/2 < until
        if math.isfinite(until):
            k = min(k, _steps_before(until - now, first, slope))
        k = self._fit_blocks(running, k)
        if k < 2:
            return None
        end = now + k * first + slope * k * (k - 1) / 2.0
        kv = self.kv
        bs = self.config.block_size
        caching = self.config.enable_prefix_caching
        finished: list[Request] = []
        outputs: list[tuple[Request, int]] = []
        for r in running:
            c = r.num_computed_tokens
            need = -(-(c + k) // bs) - len(r.block_ids)  # blocks for tokens c+1 .. c+k (checked by _fit_blocks)
            if need > 0:
                kv.take_blocks(r, need)
            self._append(r, k)
            r.num_computed_tokens = c + k
            if caching and (c + k) // bs > r.num_hashed_blocks < len(r.block_hashes):
                kv.cache_full_blocks(r, c + k)
            r.last_token_time = end
            outputs.append((r, k))
        self.generation_tokens_total += k * d
        for r in list(running):
            if r.num_output_tokens >= r.max_tokens:
                self._finish(r, end, finished)
        sched.remove_finished(finished)
        self.busy_until = end
        self.num_steps += k
        return StepOutput(now, end, outputs, finished, [], 0, d, itl_tokens=d * k, num_steps=k, step_slope_s=slope)

    def _fit_blocks(self, running: list[Request], k: int) -> int:
        """Largest k' <= k whose new blocks fit in the free pool (binary search; rarely binding)."""
        bs = self.config.block_size
        free = self.kv.num_free_blocks
        if len(running) * (k // bs + 1) <= free:  # cheap upper bound
            return k

        def need(kk: int) -> int:
            return sum(max(0, -(-(r.num_computed_tokens + kk) // bs) - len(r.block_ids)) for r in running)

        if need(k) <= free:
            return k
        lo, hi = 0, k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if need(mid) <= free:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def advance(self, now: float, until: float, *, fast_forward: bool = True) -> list[StepOutput]:
        """Run every step that starts before ``until`` (the last one may end after it)."""
        outs: list[StepOutput] = []
        t = max(now, self.busy_until)
        while t < until and self.has_work():
            out = self._pure_decode_run(t, until) if fast_forward else None
            if out is None:
                out = self.step(t)
            if out is None:
                wake = self.next_wakeup()
                if wake is None or wake >= until or wake <= t:
                    break  # nothing can run before new input (wake <= t: blocked, e.g. a KV pull with no free block)
                t = wake
                continue
            outs.append(out)
            t = out.end
        return outs

    def stats(self) -> dict[str, Any]:
        return {
            "running": self.num_running,
            "waiting": self.num_waiting,
            "kv_usage": self.kv.usage,
            "prefix_queries": self.kv.prefix_queries,
            "prefix_hits": self.kv.prefix_hits,
            "preemptions": self.scheduler.num_preemptions,
        }


def _steps_before(span: float, first: float, slope: float) -> int:
    """Number of steps j >= 0 with j*first + slope*j*(j-1)/2 < span (step j's start offset)."""
    if span <= 0:
        return 0
    if slope <= 0:
        return math.ceil(span / first) if first > 0 else 1 << 30
    # solve slope/2 j^2 + (first - slope/2) j - span = 0
    b = first - slope / 2.0
    j = (-b + math.sqrt(b * b + 2.0 * slope * span)) / slope
    n = math.ceil(j)
    while n > 0 and (n - 1) * first + slope * (n - 1) * (n - 2) / 2.0 >= span:
        n -= 1
    while n * first + slope * n * (n - 1) / 2.0 < span:
        n += 1
    return n

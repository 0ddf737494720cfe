"""A request inside the engine model, with vLLM v1's lifecycle states."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvscale.traces.prompts import BlockPrompt


class Status(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"  # P/D decode side: KV being pulled from a prefill pod
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_LENGTH = "length"
    FINISHED_STOPPED = "stop"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (Status.FINISHED_LENGTH, Status.FINISHED_STOPPED, Status.FINISHED_ABORTED)


class SyntheticPrompt:
    """A unique prompt of ``length`` tokens that is never materialised unless sliced (virtual-clock traces with
    hundreds of thousands of requests). Its block hashes are random, so it shares no prefix with anything."""

    __slots__ = ("length", "seed")

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, s: slice) -> list[int]:
        start, stop, _ = s.indices(self.length)
        return [1000 + (self.seed * 40503 + i * 2654435761) % 29000 for i in range(start, stop)]

    def block_hashes(self, block_size: int) -> list[int]:
        rng = np.random.default_rng(self.seed)
        return rng.integers(1, 2**63 - 1, self.length // block_size, dtype=np.int64).tolist()


@dataclass(eq=False, slots=True)
class Request:
    """One sequence. ``max_tokens`` output tokens are generated unless aborted (the model has no EOS)."""

    request_id: str
    prompt_token_ids: list[int] | SyntheticPrompt | BlockPrompt
    max_tokens: int
    arrival_time: float
    lora_name: str | None = None
    # P/D: prefill side returns KV to a remote decoder; decode side receives KV from a remote prefiller.
    do_remote_decode: bool = False
    remote_prefill: dict[str, Any] | None = None
    extra_key: bytes = b""  # mixed into block hashes (LoRA adapters get distinct cache entries)

    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)  # empty when the engine does not materialise them
    num_output_tokens: int = 0
    num_prompt_tokens: int = -1  # set from the prompt
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full blocks of all tokens so far
    num_hashed_blocks: int = 0  # leading blocks of block_ids already registered in the prefix cache
    num_cached_tokens: int = -1  # prefix-cache hit at first schedule; -1 until then
    num_preemptions: int = 0
    kv_ready_time: float = -1.0  # P/D decode side: when the pulled KV is in place
    first_scheduled_time: float = -1.0
    first_token_time: float = -1.0
    last_token_time: float = -1.0
    finish_time: float = -1.0
    user: Any = None  # driver-owned payload (HTTP stream queue, virtual-clock stats)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Token ids ``[start, stop)`` of prompt + output."""
        p = len(self.prompt_token_ids)
        out = list(self.prompt_token_ids[start : min(stop, p)]) if start < p else []
        if stop > p:
            out.extend(self.output_token_ids[max(start - p, 0) : stop - p])
        return out

"""Open-loop workloads for the routing benchmark (text prompts, ~1 token per word with the simulator's tokenizer).

* ``shared-prefix`` — llm-d's prefix-cache benchmark design scaled to this machine: many tenants, each with a
  long system prompt shared by all its requests, short unique user queries, short answers; Poisson arrivals,
  tenants uniform. The tenants' prefixes together exceed one pod's KV cache but fit in all pods' caches, so a
  router that partitions tenants gets hits and one that spreads them thrashes (the regime llm-d measured).
* ``multi-turn`` — chat sessions (header ``x-session-id``): a system prompt, then turns that resend the whole
  history plus a new user message; think time between turns.
* ``mixed-length`` — mostly short requests with a minority of very long prompts (JD Cloud's long/short case).
* ``prefill-heavy`` — long unique prompts, short answers (P/D versus aggregated).

Arrivals come from the simulator's Poisson process (:func:`simulator.workload.poisson`); the scenarios shape text
prompts (the routers compared here hash text, not token ids).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kvscale.traces.format import TraceRequest
from router.context import all_ints, render_token_ids
from simulator.workload import completion_body, poisson

WORKLOADS = ("shared-prefix", "multi-turn", "mixed-length", "prefill-heavy")
MODEL = "sim-model"


@dataclass
class BenchRequest:
    at_s: float
    body: dict[str, Any]
    chat: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    kind: str = ""  # e.g. "short" / "long" (mixed-length), tenant or session id


def _words(rng: random.Random, n: int, tag: str = "") -> str:
    # distinct-looking words; the tag keeps different tenants' texts apart from the first word on
    return " ".join(f"{tag}w{rng.randrange(100_000)}" for _ in range(n))


@dataclass(frozen=True)
class Scale:
    """Sizes of the workloads (defaults tuned with the scaled latency model; see docs/routing.md)."""

    tenants_per_backend: int = 6
    system_prompt_words: int = 1500
    query_words: tuple[int, int] = (40, 80)
    output_tokens: tuple[int, int] = (16, 48)


# For real vLLM CPU pods serving the tiny test model (max_model_len 1024; ~7 tokens per tagged word): system prompts
# of ~680 tokens (21 blocks of 32), requests of ~750 tokens; 12 tenants on 2 pods need ~260 blocks.
TINY_VLLM_SCALE = Scale(tenants_per_backend=6, system_prompt_words=100, query_words=(8, 16), output_tokens=(8, 16))
TINY_VLLM_BLOCKS = 160  # per pod (--num-gpu-blocks-override): one pod holds ~7 of the 12 tenants' prefixes


def build(name: str, *, backends: int, rate: float, duration: float, seed: int = 0,
          scale: Scale | None = None) -> list[BenchRequest]:  # fmt: skip
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {WORKLOADS}")
    rng = random.Random(seed)
    sc = scale or Scale()
    arrivals = poisson(rate, duration, np.random.default_rng(seed)).tolist()  # the simulator's arrival process
    out: list[BenchRequest] = []
    if name == "shared-prefix":
        tenants = [_words(rng, sc.system_prompt_words, f"t{i}") for i in range(sc.tenants_per_backend * backends)]
        for t in arrivals:
            k = rng.randrange(len(tenants))
            prompt = tenants[k] + "\nQuestion: " + _words(rng, rng.randint(*sc.query_words))
            out.append(BenchRequest(t, {"model": MODEL, "prompt": prompt,
                                        "max_tokens": rng.randint(*sc.output_tokens)}, kind=f"tenant{k}"))  # fmt: skip
    elif name == "mixed-length":
        for t in arrivals:
            long = rng.random() < 0.15
            n = rng.randint(2500, 4000) if long else rng.randint(100, 300)
            out.append(BenchRequest(t, {"model": MODEL, "prompt": _words(rng, n),
                                        "max_tokens": 16 if long else rng.randint(16, 32)},
                                    kind="long" if long else "short"))  # fmt: skip
    elif name == "prefill-heavy":
        for t in arrivals:
            out.append(BenchRequest(t, {"model": MODEL, "prompt": _words(rng, rng.randint(2000, 3500)),
                                        "max_tokens": 64}, kind="long"))  # fmt: skip
    else:  # multi-turn: each arrival is a turn; sessions advance in order, new ones open as needed
        sessions: list[dict[str, Any]] = []
        for t in arrivals:
            live = [s for s in sessions if s["turns"] < 6 and s["next_at"] <= t]
            if not live or rng.random() < 0.25:
                s = {"id": f"s{len(sessions)}", "turns": 0, "next_at": 0.0,
                     "messages": [{"role": "system", "content": _words(rng, 400, f"s{len(sessions)}")}]}  # fmt: skip
                sessions.append(s)
            else:
                s = rng.choice(live)
            s["messages"].append({"role": "user", "content": _words(rng, rng.randint(30, 60))})
            out.append(BenchRequest(t, {"model": MODEL, "messages": list(s["messages"]),
                                        "max_tokens": rng.randint(*sc.output_tokens)}, chat=True,
                                    headers={"x-session-id": s["id"]}, kind=s["id"]))  # fmt: skip
            # the next turn resends a (synthetic) assistant answer: the history is what matters for caching
            s["messages"].append({"role": "assistant", "content": _words(rng, 32)})
            s["turns"] += 1
            s["next_at"] = t + rng.expovariate(0.5)
    return out


def as_text_prompts(requests: list[BenchRequest]) -> list[BenchRequest]:
    """The requests with each token-id prompt sent as text, one word per id (the router's rendering of an id
    prompt): for a gateway that takes only text. With the simulator's tokenizer each word is one token, so lengths
    and prefix sharing stay as the trace records them (the ids differ)."""
    out = []
    for r in requests:
        ids = r.body.get("prompt")
        if isinstance(ids, list) and ids and all_ints(ids):
            r = replace(r, body={**r.body, "prompt": render_token_ids(ids)})
        out.append(r)
    return out


def from_trace(trace: list[TraceRequest]) -> list[BenchRequest]:
    """A recorded trace's requests as the benchmark sends them: token-id prompts (prefix blocks expanded exactly as
    the virtual clock expands them, so both drivers see the same sharing), ``max_tokens`` = the output length."""
    return [BenchRequest(t.arrival_s, completion_body(t, MODEL, i), kind="trace") for i, t in enumerate(trace)]

"""Simulator pods for the routing benchmark and the routing tests: in-process (tests) or as processes (benchmark).

A pod publishes KV events (ZMQ PUB, optional replay ROUTER) like a vLLM pod started with ``--kv-events-config``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from kvscale.latency import LatencyModel
from kvscale.testing.procs import ManagedProcess, free_port
from kvscale.tokenizer import FallbackTokenizer, Tokenizer
from router.kvevents import EventSource
from simulator.engine import EngineConfig
from simulator.kv_publisher import KVEventsConfig
from simulator.scheduler import SchedulerConfig
from simulator.server import ServeConfig, SimServer

KV_TOPIC = "kv-events"


@dataclass
class Pod:
    """A running engine pod as the router sees it."""

    url: str
    port: int
    kv_port: int
    replay_port: int | None
    role: str = "both"
    sim: SimServer | None = None  # in-process pods only
    process: ManagedProcess | None = None  # process pods only
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def events(self) -> EventSource:
        return EventSource(
            endpoint=f"tcp://127.0.0.1:{self.kv_port}",
            topic=KV_TOPIC,
            replay_endpoint=f"tcp://127.0.0.1:{self.replay_port}" if self.replay_port else None,
        )


def kv_events_config(kv_port: int, replay_port: int | None) -> KVEventsConfig:
    return KVEventsConfig(
        enable_kv_cache_events=True,
        publisher="zmq",
        endpoint=f"tcp://*:{kv_port}",
        replay_endpoint=f"tcp://*:{replay_port}" if replay_port else None,
        topic=KV_TOPIC,
    )


@contextlib.asynccontextmanager
async def sim_pod(
    latency: LatencyModel,
    *,
    model: str = "sim-model",
    role: str = "both",
    block_size: int = 16,
    num_gpu_blocks: int = 4096,
    max_model_len: int = 4096,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 2048,
    tokenizer: Tokenizer | None = None,
    replay: bool = True,
    port: int | None = None,
    kv_port: int | None = None,
    replay_port: int | None = None,
    lora_modules: dict[str, str] | None = None,
) -> AsyncIterator[Pod]:
    """An in-process simulator pod on free ports (or the ones given, to restart a pod in place)."""
    port = port or free_port()
    kv_port = kv_port or free_port()
    replay_port = (replay_port or free_port()) if replay else None
    tok = tokenizer or FallbackTokenizer()
    config = ServeConfig(model=model, port=port, max_model_len=max_model_len, role=role,
                         kv_events=kv_events_config(kv_port, replay_port),
                         lora_modules=dict(lora_modules or {}))  # fmt: skip
    engine_config = EngineConfig(
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  max_model_len=max_model_len),  # fmt: skip
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        output_token_range=tok.output_token_range(),
    )
    sim = SimServer(config, engine_config, latency, tok)
    runner = web.AppRunner(sim.app(), handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield Pod(f"http://127.0.0.1:{port}", port, kv_port, replay_port, role, sim=sim)
    finally:
        await runner.cleanup()


def start_sim_pod_process(
    latency_model: str | Path,
    *,
    log_path: Path,
    model: str = "sim-model",
    role: str = "both",
    block_size: int = 16,
    num_gpu_blocks: int | None = None,
    max_model_len: int = 8192,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 2048,
    replay: bool = True,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> Pod:
    """``kvscale sim serve`` as a child process (own interpreter: the benchmark's pods do not share a loop)."""
    port, kv_port = free_port(), free_port()
    replay_port = free_port() if replay else None
    cfg: dict[str, Any] = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{kv_port}",
                           "topic": KV_TOPIC}  # fmt: skip
    if replay_port:
        cfg["replay_endpoint"] = f"tcp://*:{replay_port}"
    cmd = [python, "-m", "router.bench.sim_proc", "--port", str(port), "--model", model, "--role", role,
           "--latency-model", str(latency_model), "--block-size", str(block_size),
           "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
           "--max-num-batched-tokens", str(max_num_batched_tokens),
           "--kv-events-config", json.dumps(cfg), "--engine-id", f"{role}-{port}",
           *(["--num-gpu-blocks", str(num_gpu_blocks)] if num_gpu_blocks else []), *extra_args]  # fmt: skip
    proc = ManagedProcess(cmd, log_path=log_path, name=f"sim-{role}-{port}")
    proc.start()
    pod = Pod(f"http://127.0.0.1:{port}", port, kv_port, replay_port, role, process=proc)
    return pod

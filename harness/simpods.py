"""Simulator pods on free ports: the real ``simulator.server`` app on a real socket, in this process (tests) or as
a process of its own (benchmarks, the demo). The one pod launcher of the project; nothing here is a mock.

* :func:`sim_pod` / :func:`start_sim_pod` — in this process (an aiohttp runner on this event loop);
* :func:`sim_pod_process` — ``python -m simulator serve`` as a child process (its own interpreter and loop);
* latency models for tests: :func:`step_model` (every step takes ``base_s``), :func:`slow_latency_model` (a few
  requests/s fill a replica), :func:`write_latency_model`.

A pod may publish KV events (ZMQ PUB, optional replay ROUTER) as a vLLM pod started with ``--kv-events-config``.
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

from harness.procs import ManagedProcess, free_port
from kvscale.latency import LatencyModel, StepCoefficients
from kvscale.tokenizer import FallbackTokenizer, Tokenizer
from simulator.engine import EngineConfig
from simulator.kv_publisher import KVEventsConfig
from simulator.scheduler import SchedulerConfig
from simulator.server import ServeConfig, SimServer

__all__ = [
    "KV_TOPIC",
    "SIM_MODEL",
    "Pod",
    "kv_events_config",
    "sim_pod",
    "sim_pod_process",
    "sim_pods",
    "slow_latency_model",
    "start_sim_pod",
    "step_model",
    "write_latency_model",
]

SIM_MODEL = "sim-model"
KV_TOPIC = "kv-events"


def step_model(base_s: float) -> LatencyModel:
    """A latency model where every engine step takes exactly ``base_s`` seconds."""
    return LatencyModel(name=f"const-{base_s}", coefficients=StepCoefficients(base_s, 0.0, 0.0, 0.0, 0.0))


def slow_latency_model() -> LatencyModel:
    """A deliberately slow engine so a few requests/s fill a replica (and the CPU stays free): a 40-token prompt
    prefills in ~100 ms, a decode step takes ~42 ms. Aggregated capacity ~6.5 req/s per replica (SLO TTFT 500 ms /
    ITL 100 ms at p90, 40-token prompts, 8 output tokens)."""
    return LatencyModel(
        name="test-slow",
        coefficients=StepCoefficients(
            base_s=0.04, per_prefill_token_s=1.5e-3, per_prefill_attn_s=0.0, per_decode_seq_s=2e-3,
            per_decode_ctx_s=1e-6,
        ),  # fmt: skip
        kind="estimate",
        notes="test model",
        extra={"kv_cache": {"num_gpu_blocks": 4096, "block_size": 16}},
    )


def write_latency_model(path: Path, model: LatencyModel | None = None) -> Path:
    """Write ``model`` (default :func:`slow_latency_model`) as a JSON artifact at ``path``."""
    path.write_text((model or slow_latency_model()).dumps())
    return path


@dataclass
class Pod:
    """A simulator pod as a client sees it: its URLs, and the server (in-process) or the process behind it."""

    url: str
    port: int
    kv_port: int | None = None
    replay_port: int | None = None
    role: str = "both"
    sim: SimServer | None = None  # in-process pods
    process: ManagedProcess | None = None  # process pods
    labels: dict[str, str] = field(default_factory=dict)
    runner: web.AppRunner | None = None

    @property
    def metrics_url(self) -> str:
        return self.url + "/metrics"

    @property
    def kv_endpoint(self) -> str | None:
        return f"tcp://127.0.0.1:{self.kv_port}" if self.kv_port else None

    @property
    def replay_endpoint(self) -> str | None:
        return f"tcp://127.0.0.1:{self.replay_port}" if self.replay_port else None

    def start(self, timeout_s: float = 60.0) -> Pod:
        """A process pod: start it and wait until ``/health`` answers."""
        assert self.process is not None, "in-process pods are started by start_sim_pod"
        self.process.start()
        self.process.wait_http_ready(self.url + "/health", timeout=timeout_s)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.process is not None:
            self.process.stop()


def kv_events_config(kv_port: int, replay_port: int | None) -> KVEventsConfig:
    return KVEventsConfig(
        enable_kv_cache_events=True,
        publisher="zmq",
        endpoint=f"tcp://*:{kv_port}",
        replay_endpoint=f"tcp://*:{replay_port}" if replay_port else None,
        topic=KV_TOPIC,
    )


async def start_sim_pod(
    latency: LatencyModel | None = None,
    *,
    model: str = SIM_MODEL,
    role: str = "both",
    block_size: int = 16,
    num_gpu_blocks: int = 4096,
    max_model_len: int = 4096,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 2048,
    tokenizer: Tokenizer | None = None,
    kv_events: bool = False,
    replay: bool = True,
    port: int | None = None,
    kv_port: int | None = None,
    replay_port: int | None = None,
    **serve: Any,
) -> Pod:
    """An in-process simulator pod on free ports (or the ones given, to restart a pod in place); stop it with
    :meth:`Pod.stop`. ``latency`` defaults to :func:`step_model` (1 ms steps); ``max_num_seqs`` and
    ``max_num_batched_tokens`` to the scheduler's defaults; ``serve`` holds more
    :class:`~simulator.server.ServeConfig` fields (``lora_modules``, ``metrics_flavor``, ...)."""
    port = port or free_port()
    if kv_events:
        kv_port = kv_port or free_port()
        replay_port = (replay_port or free_port()) if replay else None
        serve["kv_events"] = kv_events_config(kv_port, replay_port)
    else:
        kv_port = replay_port = None
    tok = tokenizer or FallbackTokenizer()
    config = ServeConfig(model=model, port=port, max_model_len=max_model_len, role=role, **serve)
    engine_config = EngineConfig(
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len), block_size=block_size,
        num_gpu_blocks=num_gpu_blocks, output_token_range=tok.output_token_range(),
    )  # fmt: skip
    sim = SimServer(config, engine_config, latency or step_model(1e-3), tok)
    runner = web.AppRunner(sim.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return Pod(f"http://127.0.0.1:{port}", port, kv_port, replay_port, role, sim=sim, runner=runner)


@contextlib.asynccontextmanager
async def sim_pod(latency: LatencyModel | None = None, **kw: Any) -> AsyncIterator[Pod]:
    """:func:`start_sim_pod` as a context manager (the pod stops on exit)."""
    pod = await start_sim_pod(latency, **kw)
    try:
        yield pod
    finally:
        await pod.stop()


@contextlib.asynccontextmanager
async def sim_pods(n: int, latency: LatencyModel | None = None, **kw: Any) -> AsyncIterator[list[Pod]]:
    """``n`` in-process pods (every one stopped on exit)."""
    started: list[Pod] = []
    try:
        for _ in range(n):
            started.append(await start_sim_pod(latency, **kw))
        yield started
    finally:
        for p in started:
            with contextlib.suppress(Exception):
                await p.stop()


def sim_pod_process(
    latency_model: str | Path | LatencyModel,
    *,
    log_path: Path,
    port: int | None = None,
    model: str = SIM_MODEL,
    role: str = "both",
    kv_events: bool = False,
    replay: bool = True,
    engine_id: str | None = None,
    args: Sequence[str] = (),
    cpu: int | None = None,
    python: str = sys.executable,
) -> Pod:
    """``python -m simulator serve`` as a child process, not yet started (:meth:`Pod.start`).

    ``latency_model``: a file, a built-in name, or a model (written next to ``log_path``). ``args``: more
    ``kvscale sim serve`` flags. ``cpu`` pins the process with ``taskset``."""
    port = port or free_port()
    if isinstance(latency_model, LatencyModel):
        latency_model = write_latency_model(log_path.parent / f"{latency_model.name}.json", latency_model)
    cmd = [python, "-m", "simulator", "serve", "--port", str(port), "--model", model, "--role", role,
           "--latency-model", str(latency_model), "--engine-id", engine_id or f"{role}-{port}"]  # fmt: skip
    kv_port = replay_port = None
    if kv_events:
        kv_port = free_port()
        replay_port = free_port() if replay else None
        cfg: dict[str, Any] = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{kv_port}",
                               "topic": KV_TOPIC}  # fmt: skip
        if replay_port:
            cfg["replay_endpoint"] = f"tcp://*:{replay_port}"
        cmd += ["--kv-events-config", json.dumps(cfg)]
    cmd += list(args)
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = ManagedProcess(cmd, log_path=log_path, name=f"sim-{role}-{port}")
    return Pod(f"http://127.0.0.1:{port}", port, kv_port, replay_port, role, process=proc)

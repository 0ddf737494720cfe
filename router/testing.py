"""Helpers for tests and benchmarks: in-process simulator pods and routers on free ports, simulator subprocesses.

Everything here runs the real servers (aiohttp on real sockets); nothing is mocked.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from kvscale.testing.procs import ManagedProcess, free_port
from router.app import STATE_KEY, RouterState, create_app
from router.backends import parse_backend_spec
from router.config import RouterConfig

__all__ = ["RunningRouter", "RunningSim", "serve_router", "serve_sim", "sim_process", "step_model"]

SIM_MODEL = "sim-model"
_SIM_MAIN = (
    "import argparse, sys\n"
    "from simulator.cli import add_serve_args, serve_main\n"
    "p = argparse.ArgumentParser()\nadd_serve_args(p)\nsys.exit(serve_main(p.parse_args()))\n"
)


def step_model(base_s: float):
    """A latency model where every engine step takes exactly ``base_s`` seconds."""
    from kvscale.latency import LatencyModel, StepCoefficients

    return LatencyModel(name=f"const-{base_s}", coefficients=StepCoefficients(base_s, 0.0, 0.0, 0.0, 0.0))


@dataclass
class RunningSim:
    url: str
    sim: Any  # simulator.server.SimServer


@contextlib.asynccontextmanager
async def serve_sim(
    *, base_s: float = 1e-3, model: str = SIM_MODEL, num_gpu_blocks: int = 4096, max_model_len: int = 4096,
    **config_kw: Any,
) -> AsyncIterator[RunningSim]:  # fmt: skip
    """An in-process ``kvscale sim serve`` on a free port."""
    from kvscale.tokenizer import FallbackTokenizer
    from simulator.engine import EngineConfig
    from simulator.scheduler import SchedulerConfig
    from simulator.server import ServeConfig, SimServer

    tok = FallbackTokenizer()
    port = free_port()
    config = ServeConfig(model=model, port=port, max_model_len=max_model_len, **config_kw)
    engine_config = EngineConfig(
        scheduler=SchedulerConfig(max_model_len=max_model_len), block_size=16, num_gpu_blocks=num_gpu_blocks,
        output_token_range=tok.output_token_range(),
    )  # fmt: skip
    sim = SimServer(config, engine_config, step_model(base_s), tok)
    runner = web.AppRunner(sim.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield RunningSim(f"http://127.0.0.1:{port}", sim)
    finally:
        await runner.cleanup()


def sim_process(log_dir: Path, *, base_s: float = 1e-3, port: int | None = None, extra: list[str] | None = None,
                cpu: int | None = None) -> tuple[ManagedProcess, str]:  # fmt: skip
    """A ``kvscale sim serve`` subprocess (not yet started) with a constant-step latency model; returns
    (process, base URL). ``cpu`` pins it with ``taskset``."""
    port = port or free_port()
    model_file = log_dir / f"const-{base_s}.json"
    model_file.write_text(step_model(base_s).dumps())
    # The simulator's own CLI entry, not `kvscale sim serve`: independent of the other parts' CLIs.
    cmd = [sys.executable, "-c", _SIM_MAIN, "--port", str(port), "--latency-model", str(model_file), *(extra or [])]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    return ManagedProcess(cmd, log_path=log_dir / f"sim-{port}.log", name=f"sim-{port}"), f"http://127.0.0.1:{port}"


@dataclass
class RunningRouter:
    url: str
    app: web.Application

    @property
    def state(self) -> RouterState:
        return self.app[STATE_KEY]


@contextlib.asynccontextmanager
async def serve_router(backends: list[str] | None = None, *, discovery: Any = None, **config_kw: Any
                       ) -> AsyncIterator[RunningRouter]:  # fmt: skip
    """An in-process router on a free port (as ``kvscale router serve`` runs it: handler cancellation on)."""
    port = free_port()
    config_kw.setdefault("governance_log", None)
    config = RouterConfig(port=port, backends=[parse_backend_spec(b) for b in backends or []], **config_kw)
    app = create_app(config, discovery=discovery)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield RunningRouter(f"http://127.0.0.1:{port}", app)
    finally:
        await runner.cleanup()

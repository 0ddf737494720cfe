"""``kvscale demo``: the whole stack locally — simulated (or real vLLM CPU) pods, the router in front of them, the
KEDA external scaler over gRPC, and a local controller playing KEDA + HPA that starts and stops pods — under a
ramp / burst / idle traffic pattern sent through the router. Live progress, then a summary table, a PNG plot and
a JSON summary in ``--out``. Every process it starts is stopped at the end, also on Ctrl-C.

Pieces: :mod:`demo.stack` (pods file, router/scaler entry points), :mod:`demo.control` (HPA math,
KEDA loop, local pods). See ``docs/demo.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from demo.control import KedaHpa, LocalCluster, ScaledObjectLoop, demo_behavior
from harness.procs import ManagedProcess, free_port, stop_together
from harness.simpods import SIM_MODEL, sim_pod_process
from kvscale.loadgen import Sample, stream_completion
from simulator.workload import (
    TOKEN_ID_HIGH,
    TOKEN_ID_LOW,
    TraceRequest,
    WorkloadSpec,
    completion_body,
    thinned,
    trace_at,
)

# Phases as fractions of --duration: (name, start, end).
PHASES = (("warm", 0.0, 0.15), ("ramp", 0.15, 0.40), ("burst", 0.40, 0.60), ("idle", 0.60, 1.0))


# -- configuration ------------------------------------------------------------------------------------------------
def demo_latency_model(engine: str) -> Any:
    """A latency model whose pods saturate at a few requests/s, so that this machine can drive several of them.

    sim: every step costs 30 ms + 0.5 ms per prefill token + 5 ms per decode sequence — an aggregated pod serves
    ~2.4 req/s of ~200-token prompts / ~32-token outputs within TTFT 600 ms / ITL 80 ms (p90). The simulated pods
    *and* the scaler use this same artifact. vllm-cpu: a rough estimate of the tiny test model on 2 shared cores
    (not fitted; the scaler's observed-latency correction absorbs part of the error).
    """
    from kvscale.latency import LatencyModel, StepCoefficients

    if engine == "sim":
        return LatencyModel(
            name="demo-slow-pod", coefficients=StepCoefficients(0.030, 0.0005, 0.0, 0.005, 0.0), kind="estimate",
            hardware="simulated", model=SIM_MODEL, engine="kvscale-sim",
            notes="kvscale demo: a deliberately slow pod so that replicas follow a load this machine can drive",
        )  # fmt: skip
    return LatencyModel(
        name="demo-tiny-cpu", coefficients=StepCoefficients(0.030, 0.003, 0.0, 0.010, 0.0), kind="estimate",
        hardware="cpu", model="kvscale-tiny", engine="vllm-cpu", notes="kvscale demo: rough, not fitted",
    )  # fmt: skip


@dataclass
class DemoConfig:
    engine: str = "sim"
    pools: str = "aggregated"
    duration_s: float = 150.0
    peak_rate: float = 8.0
    base_rate: float = 1.0
    idle_rate: float = 0.2
    polling_interval_s: float = 5.0
    startup_delay_s: float = 5.0
    min_replicas: int = 1
    max_replicas: int = 6
    scale_down_window_s: float = 20.0
    scaler_stable_window_s: float = 20.0
    ttft_slo_ms: float = 600.0
    itl_slo_ms: float = 80.0
    prompt_tokens: int = 200
    output_tokens: int = 32
    window_s: float = 10.0
    seed: int = 0
    live: bool | None = None  # None: when the console is a terminal

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> DemoConfig:
        return cls(
            engine=a.engine, pools=a.pools, duration_s=a.duration, peak_rate=a.peak_rate, base_rate=a.base_rate,
            idle_rate=a.idle_rate, polling_interval_s=a.polling_interval, startup_delay_s=a.startup_delay,
            min_replicas=a.min_replicas, max_replicas=a.max_replicas, scale_down_window_s=a.stabilization_window,
            scaler_stable_window_s=a.scaler_stable_window, ttft_slo_ms=a.ttft_slo_ms, itl_slo_ms=a.itl_slo_ms,
            prompt_tokens=a.prompt_tokens, output_tokens=a.output_tokens, seed=a.seed, live=a.live,
        )  # fmt: skip

    def rate_at(self, t: float) -> float:
        """Offered load (req/s) at ``t`` seconds: warm at the base rate, linear ramp to ~60 % of the peak, burst
        at the peak, then idle."""
        f = t / self.duration_s
        mid = max(self.base_rate, 0.6 * self.peak_rate)
        if f < PHASES[0][2]:
            return self.base_rate
        if f < PHASES[1][2]:
            x = (f - PHASES[1][1]) / (PHASES[1][2] - PHASES[1][1])
            return self.base_rate + x * (mid - self.base_rate)
        if f < PHASES[2][2]:
            return self.peak_rate
        return self.idle_rate

    def phase_at(self, t: float) -> str:
        f = t / self.duration_s
        return next((name for name, _, end in PHASES if f < end), PHASES[-1][0])


def add_demo_args(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    a = p.add_argument
    a("--engine", choices=("sim", "vllm-cpu"), default="sim", help="simulated pods, or real vLLM CPU pods")
    a("--pools", choices=("aggregated", "pd"), default="aggregated",
      help="one aggregated pool, or prefill + decode pools (P/D; sim only)")
    a("--duration", type=float, default=None,
      help=f"seconds of traffic (default {d.duration_s:g} for sim, 300 for vllm-cpu)")
    a("--peak-rate", type=float, default=None, help=f"burst arrival rate, req/s (default {d.peak_rate:g}; vllm-cpu 4)")
    a("--base-rate", type=float, default=None, help=f"warm-phase rate, req/s (default {d.base_rate:g})")
    a("--idle-rate", type=float, default=d.idle_rate, help="idle-phase rate, req/s")
    a("--polling-interval", type=float, default=d.polling_interval_s, help="KEDA pollingInterval, seconds")
    a("--startup-delay", type=float, default=d.startup_delay_s,
      help="seconds before a new pod may become Ready (model load time)")
    a("--min-replicas", type=int, default=d.min_replicas)
    a("--max-replicas", type=int, default=None, help=f"per pool (default {d.max_replicas}; vllm-cpu 2)")
    a("--stabilization-window", type=float, default=d.scale_down_window_s,
      help="HPA scaleDown stabilizationWindowSeconds")
    a("--scaler-stable-window", type=float, default=d.scaler_stable_window_s,
      help="the scaler's stableWindowSeconds (its own scale-down hold)")
    a("--ttft-slo-ms", type=float, default=None, help=f"default {d.ttft_slo_ms:g} (vllm-cpu 1500)")
    a("--itl-slo-ms", type=float, default=None, help=f"default {d.itl_slo_ms:g} (vllm-cpu 150)")
    a("--prompt-tokens", type=int, default=None, help=f"mean prompt length (default {d.prompt_tokens}; vllm-cpu 48)")
    a("--output-tokens", type=int, default=None, help=f"mean output length (default {d.output_tokens}; vllm-cpu 16)")
    a("--out", default=None, help="output directory (default: a new temporary one)")
    a("--seed", type=int, default=d.seed)
    a("--live", action=argparse.BooleanOptionalAction, default=None,
      help="live table (default: when stdout is a terminal; else a progress line every few seconds)")


# -- traffic ------------------------------------------------------------------------------------------------------
def demo_trace(cfg: DemoConfig) -> list[TraceRequest]:
    """The demo's traffic, from the simulator's workload generator: arrivals at ``cfg.rate_at(t)`` (thinning a
    Poisson process at the peak rate), chat-sized requests whose first ~60 % is one of 4 tenants' system prompts
    (prefix-cache hits) and the rest a unique question; lengths lognormal around ``--prompt-tokens`` and
    ``--output-tokens``."""
    peak = max(cfg.peak_rate, cfg.base_rate, cfg.idle_rate, 1e-6)
    rate = np.vectorize(cfg.rate_at, otypes=[float])
    times = thinned(peak, cfg.duration_s, np.random.default_rng(cfg.seed + 1), lambda t: rate(t) / peak)
    prefix = max(8, int(cfg.prompt_tokens * 0.6))
    query = max(4, cfg.prompt_tokens - prefix)
    spec = WorkloadSpec("demo-chat", input_median=query, input_sigma=0.3, output_median=cfg.output_tokens,
                        output_sigma=0.3, max_input_len=prefix + 3 * query, max_output_len=3 * cfg.output_tokens,
                        num_tenants=4, prefix_len=prefix)  # fmt: skip
    return trace_at(times, spec, cfg.seed)


@dataclass
class Req:
    sent_at: float  # seconds since the traffic start
    phase: str
    sample: Sample | None = None
    done_at: float | None = None


async def drive_traffic(cfg: DemoConfig, router_url: str, model: str, clock: Callable[[], float], t0: float,
                        reqs: list[Req], token_range: tuple[int, int]) -> None:  # fmt: skip
    """Send :func:`demo_trace` open loop, each request at its arrival time, streamed through the router."""
    tasks: set[asyncio.Task[None]] = set()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def one(req: Req, body: dict[str, Any]) -> None:
            req.sample = await stream_completion(session, router_url, body, timeout_s=120.0)
            req.done_at = clock() - t0

        for i, r in enumerate(demo_trace(cfg)):
            await asyncio.sleep(max(0.0, t0 + r.arrival_s - clock()))
            req = Req(clock() - t0, cfg.phase_at(r.arrival_s))
            reqs.append(req)
            task = asyncio.create_task(one(req, completion_body(r, model, i, token_range=token_range, seed=cfg.seed)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(max(0.0, t0 + cfg.duration_s - clock()))
        # let the last requests finish (bounded)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30.0)


# -- statistics ---------------------------------------------------------------------------------------------------
def meets_slo(s: Sample, ttft_s: float, itl_s: float) -> bool:
    """A request meets the SLO if it succeeded, its TTFT ≤ the TTFT SLO and its mean inter-token latency (TPOT)
    ≤ the ITL SLO."""
    if not s.ok or not s.ttft_s <= ttft_s:
        return False
    return not s.itls_s or sum(s.itls_s) / len(s.itls_s) <= itl_s


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def stats_of(samples: list[Sample], ttft_s: float, itl_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    ttfts = [s.ttft_s for s in ok if not math.isnan(s.ttft_s)]
    itls = [x for s in ok for x in s.itls_s]
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "ttft_p50_s": _pct(ttfts, 50), "ttft_p90_s": _pct(ttfts, 90), "ttft_p99_s": _pct(ttfts, 99),
        "itl_p50_s": _pct(itls, 50), "itl_p90_s": _pct(itls, 90),
        "slo_attainment": (sum(meets_slo(s, ttft_s, itl_s) for s in samples) / len(samples)) if samples else None,
    }  # fmt: skip


@dataclass
class Timeline:
    rows: list[dict[str, Any]] = field(default_factory=list)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _frac(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


class Monitor:
    """Samples the state every second into the timeline and renders the live view."""

    def __init__(self, cfg: DemoConfig, cluster: LocalCluster, loops: list[ScaledObjectLoop], reqs: list[Req],
                 t0: float, clock: Callable[[], float], scaler_metrics_url: str) -> None:  # fmt: skip
        self.cfg, self.cluster, self.loops, self.reqs, self.t0, self.clock = cfg, cluster, loops, reqs, t0, clock
        self.scaler_metrics_url = scaler_metrics_url
        self.timeline = Timeline()
        self.scaler: dict[str, dict[str, Any]] = {}

    async def read_scaler(self, session: aiohttp.ClientSession) -> None:
        """The scaler's own view per pool (its /metrics): decision reason, fractional need, arrival rate."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            async with session.get(self.scaler_metrics_url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return
        view: dict[str, dict[str, Any]] = {}
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                pool = smp.labels.get("pool")
                if pool is None:
                    continue
                v = view.setdefault(pool, {})
                if smp.name == "kvscale_scaler_decision_reason" and smp.value == 1.0:
                    v["reason"] = smp.labels["reason"]
                elif smp.name in ("kvscale_scaler_need_replicas", "kvscale_scaler_arrival_rate",
                                  "kvscale_scaler_capacity_per_replica"):  # fmt: skip
                    v[smp.name.removeprefix("kvscale_scaler_")] = smp.value
        self.scaler = view

    def sample(self) -> dict[str, Any]:
        cfg = self.cfg
        t = self.clock() - self.t0
        recent = [r for r in self.reqs if r.done_at is not None and r.done_at >= t - cfg.window_s and r.sample]
        st = stats_of([r.sample for r in recent if r.sample], cfg.ttft_slo_ms / 1000, cfg.itl_slo_ms / 1000)
        arrivals = sum(1 for r in self.reqs if r.sent_at >= t - 5.0)
        row: dict[str, Any] = {
            "t": round(t, 2), "phase": cfg.phase_at(min(t, cfg.duration_s - 1e-9)),
            "offered_rps": cfg.rate_at(min(t, cfg.duration_s - 1e-9)) if t < cfg.duration_s else 0.0,
            "arrival_rps": arrivals / 5.0, "in_flight": sum(1 for r in self.reqs if r.done_at is None),
            **{k: st[k] for k in ("ttft_p50_s", "ttft_p90_s", "itl_p50_s", "itl_p90_s", "slo_attainment")},
            "pools": {},
        }  # fmt: skip
        for lp in self.loops:
            last = lp.decisions[-1] if lp.decisions else None
            row["pools"][lp.pool] = {
                "replicas": len(self.cluster.live(lp.pool)), "ready": len(self.cluster.ready(lp.pool)),
                "metric": None if last is None else last.metric, "active": None if last is None else last.active,
                "scaler": self.scaler.get(lp.pool, {}),
            }  # fmt: skip
        self.timeline.rows.append(row)
        return row

    def render(self, row: dict[str, Any]) -> Group:
        cfg = self.cfg
        head = Text.assemble(
            ("kvscale demo ", "bold"), f"t={row['t']:.0f}/{cfg.duration_s:.0f}s  phase=", (row["phase"], "cyan"),
            f"  offered {row['offered_rps']:.1f} req/s  arrivals {row['arrival_rps']:.1f} req/s  "
            f"in flight {row['in_flight']}",
        )  # fmt: skip
        pools = Table(title=None, box=None, pad_edge=False)
        for col in ("pool", "replicas", "ready", "scaler metric", "active", "scaler need", "reason"):
            pools.add_column(col, justify="right")
        for name, p in row["pools"].items():
            sc = p["scaler"]
            need = f"{sc['need_replicas']:.2f}" if "need_replicas" in sc else "-"
            pools.add_row(name, str(p["replicas"]), str(p["ready"]),
                          "-" if p["metric"] is None else f"{p['metric']:.0f}", str(p["active"]), need,
                          sc.get("reason", "-"))  # fmt: skip
        lat = Text(
            f"last {cfg.window_s:.0f}s: TTFT p50/p90 {_ms(row['ttft_p50_s'])}/{_ms(row['ttft_p90_s'])} ms "
            f"(SLO {cfg.ttft_slo_ms:.0f})  ITL p50/p90 {_ms(row['itl_p50_s'])}/{_ms(row['itl_p90_s'])} ms "
            f"(SLO {cfg.itl_slo_ms:.0f})  SLO attainment {_frac(row['slo_attainment'])}"
        )
        return Group(head, pools, lat)

    def line(self, row: dict[str, Any]) -> str:
        reps = " ".join(f"{n}={p['replicas']}({p['ready']} ready, {p['scaler'].get('reason', '-')})"
                        for n, p in row["pools"].items())
        return (f"t={row['t']:5.0f}s {row['phase']:5} offered={row['offered_rps']:.1f}/s {reps} "
                f"TTFT p90={_ms(row['ttft_p90_s'])}ms ITL p90={_ms(row['itl_p90_s'])}ms "
                f"SLO={_frac(row['slo_attainment'])}")  # fmt: skip

    async def run(self, console: Console, live: bool, stop: asyncio.Event, session: aiohttp.ClientSession) -> None:
        if live:
            with Live(console=console, refresh_per_second=2, transient=False) as view:
                while not stop.is_set():
                    await self.read_scaler(session)
                    view.update(self.render(self.sample()))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
            return
        n = 0
        while not stop.is_set():
            await self.read_scaler(session)
            row = self.sample()
            if n % 5 == 0:
                console.print(self.line(row), highlight=False)
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


# -- the stack ----------------------------------------------------------------------------------------------------
class Stack:
    """Every process the demo starts; :meth:`stop_all` is synchronous so it also runs after Ctrl-C."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.procs: list[ManagedProcess] = []
        self.cluster: LocalCluster | None = None
        self.pids: list[dict[str, Any]] = []
        self.t0 = time.monotonic()  # the traffic start, once known

    def start(self, cmd: list[str], name: str) -> ManagedProcess:
        return self.adopt(ManagedProcess(cmd, log_path=self.out / "logs" / f"{name}.log", name=name).start(), name)

    def adopt(self, proc: ManagedProcess, name: str) -> ManagedProcess:
        """Stop ``proc`` (already started) with the rest of the stack."""
        self.procs.append(proc)
        self.pids.append({"name": name, "pid": proc.pid})
        return proc

    def stop_all(self) -> None:
        """Stop every process (pods included) in one shared bound (SIGTERM to all, SIGKILL after 5 s), not 5 s per
        process; then the cluster records its pods' stop times (their processes have ended by then)."""
        stop_together(list(reversed(self.procs)), 5.0)
        if self.cluster is not None:
            self.cluster.stop_all()


def _pod_factory(cfg: DemoConfig, stack: Stack, model_file: Path, tiny_model_dir: Path | None):
    def sim_pod(pool: str, role: str, name: str) -> tuple[Any, str, int | None]:
        pod = sim_pod_process(model_file, log_path=stack.out / "logs" / f"pod-{name}.log", role=role,
                              engine_id=name, args=["--max-num-seqs", "64"])  # fmt: skip
        assert pod.process is not None
        stack.adopt(pod.process.start(), f"pod-{name}")
        return pod.process, pod.url, pod.process.pid

    def vllm_pod(pool: str, role: str, name: str) -> tuple[Any, str, int | None]:
        from harness.vllm_server import start_vllm_cpu

        assert tiny_model_dir is not None
        server = start_vllm_cpu(tiny_model_dir, log_path=stack.out / "logs" / f"pod-{name}.log", wait=False,
                                env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})  # fmt: skip
        stack.adopt(server.process, f"pod-{name}")
        return server.process, server.url, server.process.pid

    return sim_pod if cfg.engine == "sim" else vllm_pod


async def _wait_http(proc: ManagedProcess, url: str, timeout_s: float, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.is_running():
            raise RuntimeError(f"{proc.name} exited at start-up:\n{proc.log_tail(30)}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not ready at {url} after {timeout_s:.0f}s:\n{proc.log_tail(30)}")
        await asyncio.sleep(0.2)


def scaler_metadata(cfg: DemoConfig, pool: str, model: str, model_file: Path) -> dict[str, str]:
    """The ScaledObject trigger metadata, as in deploy/ but with the demo's selector and compressed time scales."""
    # the scaler decides between KEDA's polls; under 1 s a read sees too few requests (noisy rates)
    interval = min(max(cfg.polling_interval_s / 2, 1.0), 2.0)
    return {
        "pool": pool, "model": model, "latencyModel": str(model_file),
        "ttftSloMs": f"{cfg.ttft_slo_ms:g}", "itlSloMs": f"{cfg.itl_slo_ms:g}", "sloPercentile": "90",
        "podSelector": f"app=kvscale-demo,pool={pool}", "metricsPort": "8000",
        "stableWindowSeconds": f"{cfg.scaler_stable_window_s:g}",
        "panicWindowSeconds": f"{min(cfg.scaler_stable_window_s, max(cfg.polling_interval_s * 2, 2)):g}",
        # decision → Ready takes up to one polling interval plus the pod start: the forecast horizon
        "startupSeconds": f"{cfg.startup_delay_s + cfg.polling_interval_s:g}",
        "signalIntervalSeconds": f"{interval:g}",
        "latencyWindowSeconds": f"{max(cfg.window_s, interval):g}",
        "maxNumSeqs": "64" if cfg.engine == "sim" else "256",
        # aggregated pods: the mean-step capacity model does not see the ITL tail of steps carrying a prefill
        "targetUtilization": "0.6",
    }  # fmt: skip


async def run_demo(cfg: DemoConfig, out: Path, console: Console, stack: Stack) -> dict[str, Any]:
    clock = time.monotonic
    pools = ["aggregated"] if cfg.pools == "aggregated" else ["prefill", "decode"]
    roles = {"aggregated": "both", "prefill": "prefill", "decode": "decode"}
    model_file = out / "latency-model.json"
    model_file.write_text(demo_latency_model(cfg.engine).dumps())
    tiny_dir: Path | None = None
    model = SIM_MODEL
    token_range = (TOKEN_ID_LOW, TOKEN_ID_HIGH)
    if cfg.engine == "vllm-cpu":
        from harness.tinymodel import VOCAB_SIZE, cached_tiny_model
        from harness.vllm_server import SERVED_MODEL_NAME

        tiny_dir = cached_tiny_model()  # the test suite's copy: built once per machine
        model = SERVED_MODEL_NAME
        token_range = (TOKEN_ID_LOW, VOCAB_SIZE)  # the tiny model's vocabulary
    pods_file = out / "pods.json"
    router_port, scaler_port, scaler_metrics = free_port(), free_port(), free_port()
    router_url = f"http://127.0.0.1:{router_port}"

    cluster = LocalCluster(pods_file, _pod_factory(cfg, stack, model_file, tiny_dir), roles, model,
                           startup_delay_s=cfg.startup_delay_s,
                           ready_timeout_s=240.0 if cfg.engine == "vllm-cpu" else 60.0, clock=clock)  # fmt: skip
    stack.cluster = cluster
    py = sys.executable
    scaler = stack.start([py, "-m", "demo.stack", "scaler", "--pods-file", str(pods_file),
                          "--port", str(scaler_port), "--metrics-port", str(scaler_metrics)], "scaler")  # fmt: skip
    router = stack.start([py, "-m", "demo.stack", "router", "--pods-file", str(pods_file),
                          "--host", "127.0.0.1", "--port", str(router_port), "--policy", "least-request",
                          "--health-interval-s", "1", "--governance-log", str(out / "logs" / "router-requests.jsonl")],
                         "router")  # fmt: skip
    loops = [ScaledObjectLoop(f"kvscale-{p}", p, scaler_metadata(cfg, p, model, model_file),
                              KedaHpa(p, cfg.min_replicas, cfg.max_replicas,
                                      demo_behavior(cfg.scale_down_window_s, cfg.polling_interval_s)),
                              cluster, cfg.polling_interval_s, clock=clock) for p in pools]  # fmt: skip

    async with aiohttp.ClientSession() as session:
        cluster.session = session
        for p in pools:
            cluster.scale(p, max(cfg.min_replicas, 1))
        with console.status("starting the router, the scaler and the first pods ..."):
            await _wait_http(scaler, f"http://127.0.0.1:{scaler_metrics}/healthz", 60, session)
            await _wait_http(router, f"{router_url}/health", 60, session)
            for p in pools:
                await cluster.wait_ready(p, max(cfg.min_replicas, 1), 300.0 if cfg.engine == "vllm-cpu" else 60.0)
            await _wait_http(router, f"{router_url}/ready", 30, session)
        console.print(f"[bold]stack up[/]: router {router_url}, scaler gRPC 127.0.0.1:{scaler_port} "
                      f"(metrics :{scaler_metrics}), pools {', '.join(pools)}; output in {out}")  # fmt: skip

        import grpc  # not at module level: GRPC_* environment variables are read when gRPC initializes

        from protos import externalscaler_pb2_grpc as pb_grpc

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{scaler_port}")
        stub = pb_grpc.ExternalScalerStub(channel)
        reqs: list[Req] = []
        t0 = stack.t0 = clock()
        monitor = Monitor(cfg, cluster, loops, reqs, t0, clock, f"http://127.0.0.1:{scaler_metrics}/metrics")
        stop = asyncio.Event()
        live = cfg.live if cfg.live is not None else console.is_terminal
        keda = [asyncio.create_task(lp.run(stub), name=f"keda-{lp.pool}") for lp in loops]
        ui = asyncio.create_task(monitor.run(console, live, stop, session))
        try:
            traffic = asyncio.create_task(drive_traffic(cfg, router_url, model, clock, t0, reqs, token_range))
            done, _ = await asyncio.wait([traffic, *keda], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not traffic:  # a KEDA loop ended: only by an error (e.g. GetMetricSpec failed)
                    traffic.cancel()
                    task.result()
            traffic.result()
            wall = clock() - t0
        finally:
            stop.set()
            for task in keda:
                task.cancel()
            await asyncio.gather(*keda, ui, return_exceptions=True)
            await cluster.drain_tasks()
            await channel.close()
    return summarize(cfg, out, loops, cluster, monitor, reqs, t0, wall, router_url, scaler_port)


# -- results ------------------------------------------------------------------------------------------------------
def summarize(cfg: DemoConfig, out: Path, loops: list[ScaledObjectLoop], cluster: LocalCluster, monitor: Monitor,
              reqs: list[Req], t0: float, wall: float, router_url: str,
              scaler_port: int) -> dict[str, Any]:  # fmt: skip
    ttft_s, itl_s = cfg.ttft_slo_ms / 1000, cfg.itl_slo_ms / 1000
    rows = monitor.timeline.rows
    phases = []
    for name, a, b in PHASES:
        lo, hi = a * cfg.duration_s, b * cfg.duration_s
        in_phase = [r for r in rows if lo <= r["t"] < hi]
        ph: dict[str, Any] = {"phase": name, "start_s": lo, "end_s": hi,
                              **stats_of([r.sample for r in reqs if r.phase == name and r.sample], ttft_s, itl_s)}
        for lp in loops:
            reps = [r["pools"][lp.pool]["replicas"] for r in in_phase] or [0]
            ph[f"{lp.pool}_replicas_mean"] = float(np.mean(reps))
            ph[f"{lp.pool}_replicas_max"] = int(max(reps))
            ph[f"{lp.pool}_replicas_end"] = int(reps[-1])
        phases.append(ph)
    pools = {}
    for lp in loops:
        reps = [r["pools"][lp.pool]["replicas"] for r in rows] or [0]
        changes = [{"t": round(d.t - t0, 2), "from": d.current, "to": d.desired, "metric": d.metric}
                   for d in lp.decisions if d.desired != d.current]  # fmt: skip
        pools[lp.pool] = {
            "scaledobject": lp.name, "metadata": lp.metadata, "metric_name": lp.metric_name, "target": lp.target,
            "replicas_start": int(reps[0]), "replicas_max": int(max(reps)), "replicas_end": int(reps[-1]),
            "scale_events": changes, "rpc_errors": lp.rpc_errors, "polls": len(lp.decisions),
        }  # fmt: skip
    samples = [r.sample for r in reqs if r.sample]
    summary = {
        "config": asdict(cfg),
        "wall_s": round(wall, 1),
        "router": router_url, "scaler": f"127.0.0.1:{scaler_port}",
        "overall": stats_of(samples, ttft_s, itl_s),
        "unfinished_requests": sum(1 for r in reqs if r.sample is None),
        "phases": phases,
        "pools": pools,
        "pods": pod_rows(cluster, t0),
        "pod_failures": cluster.failures,
        "timeline": rows,
        "files": {"summary": str(out / "summary.json"), "plot": str(out / "demo.png"), "logs": str(out / "logs")},
    }
    return summary


def pod_rows(cluster: LocalCluster, t0: float) -> list[dict[str, Any]]:
    """Each pod's lifecycle, seconds from the traffic start."""
    return [{"name": p.name, "pool": p.pool, "pid": p.pid,
             **{k: (None if v is None else round(v - t0, 2))
                for k, v in (("created", p.created_at), ("ready", p.ready_at), ("stopping", p.stopping_at),
                             ("stopped", p.stopped_at))}} for p in cluster.pods]  # fmt: skip


def write_plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["timeline"]
    cfg = summary["config"]
    t = [r["t"] for r in rows]
    fig, ax = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    ax[0].plot(t, [r["offered_rps"] for r in rows], label="offered", color="tab:gray", ls="--")
    ax[0].plot(t, [r["arrival_rps"] for r in rows], label="arrivals (5 s)", color="tab:blue")
    ax[0].set_ylabel("load (req/s)")
    ax[0].legend(loc="upper left")
    for pool in summary["pools"]:
        ax[1].step(t, [r["pools"][pool]["replicas"] for r in rows], where="post", label=f"{pool} replicas")
        ax[1].step(t, [r["pools"][pool]["ready"] for r in rows], where="post", ls=":", label=f"{pool} ready")
    ax[1].set_ylabel("replicas")
    ax[1].legend(loc="upper left")

    def ms(v: float | None) -> float:
        return float("nan") if v is None else v * 1000

    ax[2].plot(t, [ms(r["ttft_p50_s"]) for r in rows], label="TTFT p50")
    ax[2].plot(t, [ms(r["ttft_p90_s"]) for r in rows], label="TTFT p90")
    ax[2].axhline(cfg["ttft_slo_ms"], color="tab:red", ls="--", label="TTFT SLO")
    ax[2].set_ylabel(f"TTFT (ms, last {cfg['window_s']:g} s)")
    ax[2].set_xlabel("seconds")
    ax[2].legend(loc="upper left")
    for a in ax:
        for ph in summary["phases"]:
            a.axvline(ph["start_s"], color="k", alpha=0.15)
    ax[0].set_title(f"kvscale demo ({cfg['engine']}, {cfg['pools']}): replicas follow load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(summary: dict[str, Any], console: Console) -> None:
    cfg = summary["config"]
    pools = list(summary["pools"])
    table = Table(title=f"kvscale demo summary — SLO: TTFT ≤ {cfg['ttft_slo_ms']:g} ms and mean ITL ≤ "
                        f"{cfg['itl_slo_ms']:g} ms per request")  # fmt: skip
    for col in ("phase", "reqs", "errors", *[f"{p} replicas mean/max" for p in pools],
                "TTFT p50/p90 ms", "ITL p50/p90 ms", "SLO attainment"):  # fmt: skip
        table.add_column(col, justify="right")
    for ph in [*summary["phases"], {"phase": "all", **summary["overall"]}]:
        reps = [f"{ph[f'{p}_replicas_mean']:.1f}/{ph[f'{p}_replicas_max']}" if f"{p}_replicas_mean" in ph
                else f"{summary['pools'][p]['replicas_start']}→{summary['pools'][p]['replicas_max']}→"
                     f"{summary['pools'][p]['replicas_end']}" for p in pools]  # fmt: skip
        table.add_row(ph["phase"], str(ph["requests"]), str(ph["errors"]), *reps,
                      f"{_ms(ph['ttft_p50_s'])}/{_ms(ph['ttft_p90_s'])}",
                      f"{_ms(ph['itl_p50_s'])}/{_ms(ph['itl_p90_s'])}", _frac(ph["slo_attainment"]))  # fmt: skip
    console.print(table)
    for p, info in summary["pools"].items():
        ev = ", ".join(f"{e['from']}→{e['to']}@{e['t']:.0f}s" for e in info["scale_events"]) or "none"
        console.print(f"[bold]{p}[/] scale events: {ev}  (polls {info['polls']}, gRPC errors {info['rpc_errors']})")
    if summary["pod_failures"]:
        console.print(f"[red]pod failures[/]: {'; '.join(summary['pod_failures'])}")
    console.print(f"wall {summary['wall_s']:.0f}s · plot {summary['files']['plot']} · summary "
                  f"{summary['files']['summary']} · logs {summary['files']['logs']}")  # fmt: skip


def demo_main(args: argparse.Namespace) -> int:
    engine = args.engine
    if engine == "vllm-cpu":
        from harness.vllm_server import vllm_available

        if args.pools == "pd":
            print("kvscale demo: --pools pd needs the simulator (vLLM CPU has no KV-transfer connector here)",
                  file=sys.stderr)  # fmt: skip
            return 2
        if not vllm_available():
            print("kvscale demo --engine vllm-cpu: vLLM is not importable in this Python. Install the engine extra "
                  "(`make install-engine`) or run the simulated demo (`kvscale demo`).", file=sys.stderr)  # fmt: skip
            return 2
    vllm = engine == "vllm-cpu"
    args.duration = args.duration if args.duration is not None else (300.0 if vllm else DemoConfig.duration_s)
    args.peak_rate = args.peak_rate if args.peak_rate is not None else (4.0 if vllm else DemoConfig.peak_rate)
    args.base_rate = args.base_rate if args.base_rate is not None else (0.5 if vllm else DemoConfig.base_rate)
    d = DemoConfig()
    for name, vllm_default in (("max_replicas", 2), ("ttft_slo_ms", 1500.0), ("itl_slo_ms", 150.0),
                               ("prompt_tokens", 48), ("output_tokens", 16)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, vllm_default if vllm else getattr(d, name))
    try:
        cfg = DemoConfig.from_args(args)
        KedaHpa("check", cfg.min_replicas, cfg.max_replicas, demo_behavior(cfg.scale_down_window_s, 1.0))
        if cfg.duration_s < 10 or cfg.polling_interval_s <= 0 or cfg.peak_rate <= 0:
            raise ValueError("need --duration >= 10, --polling-interval > 0 and --peak-rate > 0")
    except ValueError as e:
        print(f"kvscale demo: {e}", file=sys.stderr)
        return 2
    # Pods are started (fork + exec) while the gRPC channel is open: gRPC's fork handlers are not needed and log
    # a line per fork otherwise.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    console = Console(width=max(Console().width, 110))
    out = Path(args.out or tempfile.mkdtemp(prefix="kvscale-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    stack = Stack(out)
    started = time.monotonic()
    try:
        summary = asyncio.run(run_demo(cfg, out, console, stack))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping every process the demo started[/]")
        return 130
    except Exception as e:  # start-up failures carry the log tail of the process that failed
        console.print(f"[red]kvscale demo failed[/]: {e}")
        return 1
    finally:
        stack.stop_all()
        (out / "processes.json").write_text(json.dumps(stack.pids))
    if stack.cluster is not None:  # the pods still up at the end were stopped just now
        summary["pods"] = pod_rows(stack.cluster, stack.t0)
    summary["total_wall_s"] = round(time.monotonic() - started, 1)
    summary["processes"] = stack.pids
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    write_plot(summary, out / "demo.png")
    print_summary(summary, console)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="the whole stack locally: pods, router, scaler and a KEDA+HPA controller under a traffic pattern",
        description="Starts simulated (or vLLM CPU) pods, the router, the KEDA external scaler (gRPC) and a local "
                    "KEDA+HPA controller; sends ramp/burst/idle traffic through the router; writes summary.json, "
                    "demo.png and logs to --out.",
    )  # fmt: skip
    add_demo_args(demo)
    demo.set_defaults(func=demo_main)

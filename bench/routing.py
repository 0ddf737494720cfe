"""``kvscale bench routing``: simulator pods (real-time HTTP, KV events) behind each router configuration in turn.

For every configuration the benchmark starts fresh pods (cold caches, fresh counters), starts the router (the
kvscale router app in its own process, or the ``vllm-router`` or ``sglang-router`` binary), replays the same
open-loop workload through it with a streaming client, reads the pods' prefix-cache counters, and stops
everything. Reported per policy: TTFT p50/p90/p99, ITL p50/p90, throughput, prefix hit rate (pods'
``vllm:prefix_cache_hits / queries``), errors; plus per-workload extras (short-request TTFT for mixed-length,
SLO prediction error for ``slo``).

The pods run a latency model slow enough that a few pods saturate at a request rate this machine can drive:
the built-in ``llama-3.1-8b-h100`` step-time coefficients multiplied by ``--slowdown`` (default 5).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.workloads import MODEL, BenchRequest, Scale, as_text_prompts, build, from_trace
from harness.procs import ManagedProcess, ProcessError, free_port
from harness.simpods import Pod, sim_pod_process
from kvscale.engine_stats import ScrapeError, scrape
from kvscale.latency import DEFAULT_MODEL, StepCoefficients, load_latency_model
from kvscale.loadgen import stream_completion
from kvscale.traces.format import TraceRequest
from router.policies.best import POLICIES as BEST_POLICIES
from router.policies.kv_events import POLICIES as KV_EVENTS_POLICIES

KVSCALE_POLICIES = ("round-robin", "least-request", "prefix", "kv-events", "slo", "best")
VLLM_ROUTER_POLICIES = ("round_robin", "cache_aware", "kv_aware")
EXTRA_POLICIES = {"mixed-length": ("length-buckets", "best+buckets"), "multi-turn": ("session-affinity",)}
VLLM_ROUTER_BIN = Path(sys.executable).with_name("vllm-router")
# The SGLang gateway (PyPI sglang-router, Rust), run with its own defaults (cache_threshold, balance thresholds,
# eviction interval): the process form of peer:sglang-cache-aware
SGLANG_ROUTER_POLICIES = ("round_robin", "cache_aware")
SGLANG_ROUTER_BIN = Path(sys.executable).with_name("sglang-router")

# The combination the benchmark chose (see docs/routing.md), registered as the router's ``best`` preset; the
# benchmark redefines it with its scaled latency model.
BEST_SPEC: dict[str, Any] = BEST_POLICIES["best"]


@dataclass
class BenchConfig:
    backends: int = 4
    workload: str = "shared-prefix"
    rate: float = 16.0
    duration: float = 60.0
    json_path: str | None = None
    policies: list[str] | None = None  # None: the workload's default set
    slowdown: float = 5.0
    latency_model: str = DEFAULT_MODEL
    num_gpu_blocks: int = 1000
    max_num_batched_tokens: int = 2048
    seed: int = 0
    ttft_slo_ms: float = 2000.0
    itl_slo_ms: float = 250.0
    pd: str | None = None  # "P:D": also run P/D disaggregated with P prefill + D decode pods
    scale: Scale = field(default_factory=Scale)
    drain_timeout_s: float = 120.0
    keep_logs: bool = False
    engine: str = "sim"  # "sim": simulator pods, fresh per configuration; "vllm-cpu": real vLLM pods, shared
    model_dir: str | None = None  # vllm-cpu: the served model directory (None: build the tiny test model)
    repeat: int = 1  # interleaved rounds over the configurations; figures are the medians over rounds
    trace: list[TraceRequest] | None = None  # a recorded trace replayed instead of the workload
    max_model_len: int = 8192


@dataclass
class Sample:
    ok: bool
    status: int
    kind: str
    ttft_s: float = math.nan
    itls_s: list[float] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    error: str = ""
    request_id: str = ""


def default_policies(workload: str, pd: str | None) -> list[str]:
    names = list(KVSCALE_POLICIES) + list(EXTRA_POLICIES.get(workload, ()))
    names += [f"vllm-router:{p}" for p in VLLM_ROUTER_POLICIES]
    names += [f"sglang-router:{p}" for p in SGLANG_ROUTER_POLICIES]
    if pd:
        names.append(f"pd:{pd}")
    return names


# -- one run ---------------------------------------------------------------------------------------------------------
def scaled_latency_model(cfg: BenchConfig, out_dir: Path) -> Path:
    base = load_latency_model(cfg.latency_model)
    c = base.coefficients
    k = cfg.slowdown
    scaled = StepCoefficients(c.base_s * k, c.per_prefill_token_s * k, c.per_prefill_attn_s * k,
                              c.per_decode_seq_s * k, c.per_decode_ctx_s * k)  # fmt: skip
    model = base.__class__(
        name=f"{base.name}-x{k:g}", coefficients=scaled, kv_transfer_base_s=base.kv_transfer_base_s * k,
        kv_transfer_per_token_s=base.kv_transfer_per_token_s * k, kind=base.kind, hardware=base.hardware,
        model=base.model, engine=base.engine, notes=f"{base.name} step times x{k:g} (routing benchmark)",
    )  # fmt: skip
    path = out_dir / f"{model.name}.json"
    path.write_text(model.dumps())
    return path


def _configured(spec: dict[str, Any], configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy of a preset's spec with the given scorers' configs replaced (by scorer type)."""
    out = json.loads(json.dumps(spec))
    for s in out["scorers"]:
        if s["type"] in configs:
            s["config"] = configs[s["type"]]
    return out


def _policy_file(cfg: BenchConfig, latency_path: Path, out_dir: Path, record_path: Path) -> Path:
    # Real vLLM pods: the KV-event scorers must tokenize with the served model's tokenizer (the presets default to
    # the simulator's), so the kv-events preset is redefined here too.
    kv_cfg: dict[str, Any] = {"tokenizer": cfg.model_dir} if cfg.engine == "vllm-cpu" else {}
    slo_cfg = {"latency_model": str(latency_path), "max_num_batched_tokens": cfg.max_num_batched_tokens,
               "kv_events": kv_cfg, "record_path": str(record_path)}  # fmt: skip
    best = _configured(BEST_SPEC, {"slo": {**slo_cfg, "record_path": None}, "kv-events": kv_cfg})
    buckets = {"type": "length-bucket", "config": {"threshold_tokens": 1024}}
    policies: dict[str, Any] = {
        "slo": {"scorers": [{"type": "slo", "config": slo_cfg}]},
        "best": best,
        "best+buckets": {**best, "filters": [buckets, *best["filters"]]},
    }
    if kv_cfg:
        policies["kv-events"] = _configured(KV_EVENTS_POLICIES["kv-events"], {"kv-events": kv_cfg})
    path = out_dir / "policies.json"
    path.write_text(json.dumps({"policies": policies}, indent=2))
    return path


def _start_pods(cfg: BenchConfig, latency_path: Path, logs: Path, roles: list[str]) -> list[Pod]:
    pods = []
    for i, role in enumerate(roles):
        pod = sim_pod_process(
            latency_path, log_path=logs / f"pod{i}-{role}.log", role=role, kv_events=True,
            args=["--block-size", "16", "--max-model-len", str(cfg.max_model_len), "--max-num-seqs", "256",
                  "--num-gpu-blocks", str(cfg.num_gpu_blocks),
                  "--max-num-batched-tokens", str(cfg.max_num_batched_tokens)],
        )  # fmt: skip
        assert pod.process is not None
        pod.process.start()
        pods.append(pod)
    return pods


def _backend_spec(pod: Pod, labels: dict[str, str]) -> str:
    parts = [pod.url, f"model={MODEL}", f"role={pod.role}", f"kv-events={pod.kv_endpoint}"]
    if pod.replay_endpoint:
        parts.append(f"kv-replay={pod.replay_endpoint}")
    parts += [f"{k}={v}" for k, v in labels.items()]
    return ",".join(parts)


def _start_kvscale_router(policy: str, pods: list[Pod], labels: list[dict[str, str]], policy_file: Path,
                          logs: Path) -> tuple[ManagedProcess, str]:  # fmt: skip
    port = free_port()
    spec = {"port": port, "policy": policy, "policy_config": str(policy_file),
            "backends": [_backend_spec(p, lab) for p, lab in zip(pods, labels, strict=True)]}  # fmt: skip
    spec_path = logs / f"router-{policy.replace(':', '_')}.json"
    spec_path.write_text(json.dumps(spec))
    proc = ManagedProcess([sys.executable, "-m", "bench.router_proc", str(spec_path)],
                          log_path=logs / f"router-{policy.replace(':', '_')}.log", name="kvscale-router")  # fmt: skip
    proc.start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_http_ready(url + "/ready", timeout=60)
    return proc, url


def _start_vllm_router(policy: str, pods: list[Pod], logs: Path, *, block_size: int = 16) -> tuple[ManagedProcess, str]:
    if not VLLM_ROUTER_BIN.exists():
        raise ProcessError(f"vllm-router binary not found at {VLLM_ROUTER_BIN}")
    port = free_port()
    cmd = [str(VLLM_ROUTER_BIN), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
           "--worker-urls", *[p.url for p in pods], "--prometheus-port", str(free_port()),
           "--worker-startup-check-interval", "1", "--max-concurrent-requests", "100000", "--queue-size", "100000",
           "--log-level", os.environ.get("KVSCALE_VLLM_ROUTER_LOG", "warning"), "--disable-retries"]  # fmt: skip
    if policy == "kv_aware":  # fed by the same pods' KV events (and replay sockets)
        for p in pods:
            cmd += ["--kv-event-source", f"{p.url}={p.kv_endpoint}"]
            if p.replay_endpoint:
                cmd += ["--kv-event-replay-source", f"{p.url}={p.replay_endpoint}"]
        cmd += ["--kv-event-block-size", str(block_size), "--kv-event-model", MODEL]
    return _start_peer_router(cmd, "vllm-router", policy, port, logs)


def _start_sglang_router(policy: str, pods: list[Pod], logs: Path) -> tuple[ManagedProcess, str]:
    """``sglang-router launch`` in front of the pods; queue and concurrency limits lifted as for vllm-router (the
    benchmark's open-loop load must reach the pods, not the gateway's admission queue), retries off."""
    if not SGLANG_ROUTER_BIN.exists():
        raise ProcessError(f"sglang-router binary not found at {SGLANG_ROUTER_BIN}")
    port = free_port()
    cmd = [str(SGLANG_ROUTER_BIN), "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
           "--worker-urls", *[p.url for p in pods], "--prometheus-port", str(free_port()),
           "--worker-startup-check-interval", "1", "--max-concurrent-requests", "100000", "--queue-size", "100000",
           "--log-level", os.environ.get("KVSCALE_SGLANG_ROUTER_LOG", "warn"), "--disable-retries"]  # fmt: skip
    return _start_peer_router(cmd, "sglang-router", policy, port, logs)


def _start_peer_router(cmd: list[str], kind: str, policy: str, port: int, logs: Path) -> tuple[ManagedProcess, str]:
    proc = ManagedProcess(cmd, log_path=logs / f"{kind}-{policy}.log", name=kind)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_http_ready(url + "/health", timeout=60, interval=0.3)
    return proc, url


async def _one(http: aiohttp.ClientSession, url: str, req: BenchRequest, t0: float, rid: str,
               slo_headers: dict[str, str], timeout_s: float) -> Sample:  # fmt: skip
    delay = req.at_s - (time.perf_counter() - t0)
    if delay > 0:
        await asyncio.sleep(delay)
    got = await stream_completion(http, url, req.body, chat=req.chat, timeout_s=timeout_s,
                                  headers={"x-request-id": rid, **slo_headers, **req.headers})  # fmt: skip
    return Sample(ok=got.ok and not math.isnan(got.ttft_s), status=got.status, kind=req.kind, ttft_s=got.ttft_s,
                  itls_s=got.itls_s, start=got.started_at, end=time.perf_counter(), error=got.error,
                  request_id=rid)  # fmt: skip


async def _prefix_counters(http: aiohttp.ClientSession, pods: list[Pod]) -> tuple[float, float]:
    """Sum of the pods' ``vllm:prefix_cache_hits`` / ``queries`` counters (decode pods excluded: their "hits" are
    the transferred KV, not their own prefix cache)."""
    hits = queries = 0.0
    for p in pods:
        if p.role == "decode":
            continue
        try:
            st = await scrape(http, p.url + "/metrics")
        except ScrapeError:
            continue
        hits += st.prefix_hits_total
        queries += st.prefix_queries_total
    return hits, queries


async def _drive(url: str, requests: list[BenchRequest], cfg: BenchConfig, pods: list[Pod],
                 run_id: str) -> tuple[list[Sample], float | None]:  # fmt: skip
    slo = {"x-kvscale-ttft-slo-ms": str(cfg.ttft_slo_ms), "x-kvscale-itl-slo-ms": str(cfg.itl_slo_ms)}
    timeout = aiohttp.ClientTimeout(total=cfg.duration + cfg.drain_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        hits0, queries0 = await _prefix_counters(http, pods)  # non-zero on shared (vLLM) pods
        t0 = time.perf_counter()
        samples = await asyncio.gather(*(_one(http, url, r, t0, f"{run_id}-{i}", slo, timeout.total or 0)
                                         for i, r in enumerate(requests)))  # fmt: skip
        hits, queries = await _prefix_counters(http, pods)
    hits, queries = hits - hits0, queries - queries0
    return list(samples), (hits / queries if queries else None)


def _pct(values: list[float], q: float) -> float | None:
    v = [x for x in values if not math.isnan(x)]
    return float(np.percentile(v, q)) if v else None


def summarize(samples: list[Sample], hit_rate: float | None) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft_s for s in ok]
    itl = [x for s in ok for x in s.itls_s]
    span = (max(s.end for s in ok) - min(s.start for s in samples)) if ok else 0.0
    out: dict[str, Any] = {
        "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90), "ttft_p99_s": _pct(ttft, 99),
        "itl_p50_s": _pct(itl, 50), "itl_p90_s": _pct(itl, 90),
        "throughput_rps": len(ok) / span if span > 0 else 0.0,
        "prefix_hit_rate": hit_rate,
        "errors": len(samples) - len(ok),
        "requests": len(samples),
    }  # fmt: skip
    kinds = {s.kind for s in samples}
    if {"short", "long"} & kinds:
        for k in ("short", "long"):
            out[f"{k}_ttft_p90_s"] = _pct([s.ttft_s for s in ok if s.kind == k], 90)
    errors = [s.error for s in samples if not s.ok and s.error]
    if errors:
        out["first_error"] = errors[0][:200]
    return out


def _slo_errors(record_path: Path, run_id: str) -> dict[str, Any]:
    rel: list[float] = []
    if record_path.exists():
        for line in record_path.read_text().splitlines():
            rec = json.loads(line)
            if str(rec.get("request_id", "")).startswith(run_id + "-") and rec["observed_ttft_s"] > 0:
                rel.append(abs(rec["observed_ttft_s"] - rec["predicted_ttft_s"]) / rec["observed_ttft_s"])
    return {"slo_ttft_rel_error_p50": _pct(rel, 50), "slo_ttft_rel_error_p90": _pct(rel, 90),
            "slo_predictions": len(rel)}  # fmt: skip


def run_one(name: str, cfg: BenchConfig, requests: list[BenchRequest], work: Path, latency_path: Path,
            policy_file: Path, record_path: Path, shared: list[Pod] | None = None,
            tag: str = "") -> dict[str, Any]:  # fmt: skip
    """Run one router configuration on fresh pods, or on ``shared`` pods (real engines, started once) after
    emptying their prefix caches; returns its summary (or {"skipped": reason})."""
    logs = work / (name.replace(":", "_").replace("+", "_") + tag)
    logs.mkdir(parents=True, exist_ok=True)
    n = cfg.backends
    if shared is not None:
        if name.startswith("pd:"):
            return {"skipped": "P/D needs simulator pods (the vLLM CPU build has no KV connector here)"}
        _reset_prefix_caches(shared)
        return _route_and_drive(name, cfg, requests, logs, policy_file, record_path, shared, [{} for _ in shared], tag)
    if name.startswith("pd:"):
        p, d = (int(x) for x in name[3:].split(":"))
        roles = ["prefill"] * p + ["decode"] * d
    else:
        roles = ["both"] * n
    labels = [{} for _ in roles]
    if cfg.workload == "mixed-length":
        for lab in labels[: max(1, n // 4)]:
            lab["group"] = "long"
    pods = _start_pods(cfg, latency_path, logs, roles)
    try:
        for pod in pods:
            assert pod.process is not None
            pod.process.wait_http_ready(pod.url + "/health", timeout=60, interval=0.2)
        return _route_and_drive(name, cfg, requests, logs, policy_file, record_path, pods, labels, tag)
    except ProcessError as e:
        return {"skipped": str(e).splitlines()[0][:300]}
    finally:
        for pod in pods:
            if pod.process is not None:
                pod.process.stop(timeout=5)


def _route_and_drive(name: str, cfg: BenchConfig, requests: list[BenchRequest], logs: Path, policy_file: Path,
                     record_path: Path, pods: list[Pod], labels: list[dict[str, str]],
                     tag: str) -> dict[str, Any]:  # fmt: skip
    router: ManagedProcess | None = None
    try:
        if name.startswith("vllm-router:"):
            router, url = _start_vllm_router(name.split(":", 1)[1], pods, logs, block_size=_block_size(cfg))
        elif name.startswith("sglang-router:"):
            router, url = _start_sglang_router(name.split(":", 1)[1], pods, logs)
            # sglang-router 0.3.2 takes text prompts only (token ids: 400 "data did not match any variant of
            # untagged enum StringOrArray"); a recorded trace's id prompts go to it as text
            requests = as_text_prompts(requests)
        else:
            policy = "kv-events" if name.startswith("pd:") else name
            router, url = _start_kvscale_router(policy, pods, labels, policy_file, logs)
        time.sleep(0.5)  # subscribers connect, first scrapes land
        run_id = name.replace(":", "_") + tag
        samples, hit = asyncio.run(_drive(url, requests, cfg, pods, run_id))
        out = summarize(samples, hit)
        if name in ("slo", "best", "best+buckets"):
            out.update(_slo_errors(record_path, run_id))
        return out
    except ProcessError as e:
        return {"skipped": str(e).splitlines()[0][:300]}
    finally:
        if router is not None:
            router.stop(timeout=5)


def _block_size(cfg: BenchConfig) -> int:
    if cfg.engine == "vllm-cpu":
        from harness.vllm_server import BLOCK_SIZE

        return BLOCK_SIZE
    return 16


def _reset_prefix_caches(pods: list[Pod]) -> None:
    """Empty real pods' prefix caches between configurations (vLLM's ``POST /reset_prefix_cache``, served with
    ``VLLM_SERVER_DEV_MODE=1``), so each router starts from cold caches as on fresh simulator pods."""

    async def reset() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            for p in pods:
                async with http.post(p.url + "/reset_prefix_cache") as r:
                    if r.status != 200:
                        raise ProcessError(f"{p.url}/reset_prefix_cache answered {r.status}: {(await r.text())[:200]}")

    asyncio.run(reset())


def _start_vllm_pods(cfg: BenchConfig, logs: Path) -> list[Pod]:
    """``cfg.backends`` real vLLM CPU servers (started together, about a minute), serving the model as ``MODEL``."""
    from harness.vllm_server import STARTUP_TIMEOUT_S, start_vllm_cpu

    assert cfg.model_dir is not None
    # Several vLLM CPU servers on one host: each gets its own core for its OpenMP threads, like pods with CPU
    # limits. vLLM's default ("auto") pins every server's threads to the same cores, and a pod's requests then
    # stall for seconds while the other computes (seen: TTFT p90 7.8 s vs 0.05 s alone); "nobind" oversubscribes.
    cores = sorted(os.sched_getaffinity(0))
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    servers = []
    try:
        for i in range(cfg.backends):
            servers.append(start_vllm_cpu(
                Path(cfg.model_dir), log_path=logs / f"vllm{i}.log", served_model_name=MODEL,
                num_gpu_blocks=cfg.num_gpu_blocks, wait=False,
                env={**env, "VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)])},
                extra_args=["--max-num-batched-tokens", str(cfg.max_num_batched_tokens)],
            ))  # fmt: skip
        for s in servers:
            s.process.wait_http_ready(s.url + "/health", timeout=STARTUP_TIMEOUT_S)
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return [Pod(s.url, s.port, int(s.kv_events_endpoint.rsplit(":", 1)[1]), None, process=s.process)
            for s in servers]  # fmt: skip


def run(cfg: BenchConfig) -> dict[str, Any]:
    if cfg.trace is not None:
        requests = from_trace(cfg.trace)
    else:
        requests = build(cfg.workload, backends=cfg.backends, rate=cfg.rate, duration=cfg.duration, seed=cfg.seed,
                         scale=cfg.scale)  # fmt: skip
    names = cfg.policies or default_policies(cfg.workload, cfg.pd)
    work = Path(tempfile.mkdtemp(prefix="kvscale-bench-routing-"))
    shared: list[Pod] | None = None
    try:
        if cfg.engine == "vllm-cpu":
            if cfg.model_dir is None:
                from harness.tinymodel import cached_tiny_model

                cfg.model_dir = str(cached_tiny_model())
            latency_path = work / "latency-model.json"  # real pods: the model as given (a profiled artifact)
            latency_path.write_text(load_latency_model(cfg.latency_model).dumps())
            t = time.perf_counter()
            shared = _start_vllm_pods(cfg, work)
            print(f"  {cfg.backends} vLLM CPU pods ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        elif cfg.engine == "sim":
            latency_path = scaled_latency_model(cfg, work)
        else:
            raise ValueError(f"engine must be sim or vllm-cpu, got {cfg.engine!r}")
        record_path = work / "slo-records.jsonl"
        policy_file = _policy_file(cfg, latency_path, work, record_path)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for r in range(cfg.repeat):
            # Interleaved rounds, each starting one configuration later, so a slow spell of a shared machine does
            # not land on the same configurations every time.
            for name in names[r % len(names):] + names[: r % len(names)]:
                t = time.perf_counter()
                out = run_one(name, cfg, requests, work, latency_path, policy_file, record_path, shared, f"-r{r}")
                out["wall_s"] = round(time.perf_counter() - t, 1)
                rounds[name].append(out)
                print(f"  {name}{f' (round {r + 1})' if cfg.repeat > 1 else ''}: {_brief(out)}", file=sys.stderr,
                      flush=True)  # fmt: skip
        results = {name: _median_of_rounds(rs) for name, rs in rounds.items()}
        return {
            "repeat": cfg.repeat,
            "engine": cfg.engine,
            "policies": results,
            "workload": cfg.workload,
            "rate": cfg.rate,
            "backends": cfg.backends,
            "duration_s": cfg.duration,
            "requests": len(requests),
            "latency_model": f"{cfg.latency_model} x{cfg.slowdown:g}" if cfg.engine == "sim" else cfg.latency_model,
            "num_gpu_blocks": cfg.num_gpu_blocks,
            "cpu_count": os.cpu_count(),
        }
    finally:
        for pod in shared or ():
            if pod.process is not None:
                pod.process.stop(timeout=20)
        if cfg.keep_logs:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _median_of_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's figures over interleaved rounds: the median of each number (a skipped round is left
    out); with several rounds, each round's TTFT p90 too."""
    ran = [r for r in rounds if "skipped" not in r]
    if not ran:
        return rounds[0]
    if len(rounds) == 1:
        return ran[0]
    out: dict[str, Any] = {}
    for k in ran[0]:
        vals = [r.get(k) for r in ran]
        nums = [v for v in vals if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(nums) == len(vals):
            med = float(np.median(nums))
            out[k] = int(med) if all(isinstance(v, int) for v in nums) else med
        else:
            out[k] = vals[0]
    out["rounds_ttft_p90_s"] = [r.get("ttft_p90_s") for r in ran]
    if len(ran) < len(rounds):
        out["rounds_skipped"] = [r["skipped"] for r in rounds if "skipped" in r]
    return out


def _brief(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"skipped ({r['skipped']})"
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"ttft p50 {f(r['ttft_p50_s'])} p90 {f(r['ttft_p90_s'])} s, hit {f(r['prefix_hit_rate'])}, "
            f"errors {r['errors']}")  # fmt: skip


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ["ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "itl_p50_s", "itl_p90_s", "throughput_rps", "prefix_hit_rate",
            "errors"]  # fmt: skip
    extra = sorted({k for r in result["policies"].values() for k in r
                    if k.startswith(("short_", "long_", "slo_ttft"))})  # fmt: skip
    table = Table(title=f"kvscale bench routing: {result['workload']}, {result['backends']} pods, "
                        f"{result['rate']} req/s for {result['duration_s']} s ({result['latency_model']})")  # fmt: skip
    table.add_column("policy")
    for c in cols + extra:
        table.add_column(c.replace("_s", "").replace("_", " "), justify="right")
    for name, r in result["policies"].items():
        if "skipped" in r:
            table.add_row(name, *["-"] * (len(cols) + len(extra)), style="dim")
            continue
        cells = []
        for c in cols + extra:
            v = r.get(c)
            cells.append("-" if v is None else (str(v) if isinstance(v, int) else f"{v:.3f}"))
        table.add_row(name, *cells)
    Console(width=200).print(table)

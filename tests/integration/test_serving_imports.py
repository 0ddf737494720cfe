"""The serving processes ship without the engine simulator: ``kvscale router serve`` and ``kvscale scaler serve``,
started as a user starts them and exercised (completions streamed and not, ``/metrics``; KEDA's RPCs until a
decision), import no module of ``simulator`` (nor the test harness, the benchmarks or the demo).

Python's ``-X importtime`` reports every module a process imports, when it imports it (also later, lazily, and in
the scaler's spawned parse worker, which inherits the flag and stderr), so the check covers the whole run.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import pytest

from harness.procs import free_port
from harness.simpods import SIM_MODEL, sim_pod
from protos import externalscaler_pb2 as pb
from protos import externalscaler_pb2_grpc as pb_grpc

FORBIDDEN = ("simulator", "harness", "bench", "demo", "predictor.capacity_sim", "scaler.evaluate")


def imported_modules(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines: ``import time: self [us] | cumulative | name``."""
    out = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                out.add(name)
    return out


def forbidden(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def test_importtime_parser() -> None:
    text = ("import time: self [us] | cumulative | imported package\n"
            "import time:       120 |        300 |   simulator.engine\n"
            "import time:        80 |         80 | router.app\n")  # fmt: skip
    assert imported_modules(text) == {"simulator.engine", "router.app"}
    assert forbidden({"simulator.engine", "router.app", "demo", "scaler.policy"}) == ["demo", "simulator.engine"]


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-X", "importtime", "-m", "kvscale.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))  # fmt: skip


def _stop(proc: subprocess.Popen[bytes], log: Path) -> set[str]:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return imported_modules(log.read_text(errors="replace"))


async def _wait_http(http: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    pytest.fail(f"{url} not ready: {log.read_text(errors='replace')[-3000:]}")


@pytest.mark.timeout(120)
async def test_router_serve_imports_no_simulator(tmp_path: Path) -> None:
    log = tmp_path / "router.log"
    async with sim_pod() as pod, aiohttp.ClientSession() as http:
        port = free_port()
        proc = _start(["router", "serve", "--host", "127.0.0.1", "--port", str(port), "--backend", pod.url], log)
        try:
            url = f"http://127.0.0.1:{port}"
            await _wait_http(http, url + "/ready", proc, log)
            for stream in (False, True):
                body = {"model": SIM_MODEL, "prompt": "hello there", "max_tokens": 4, "stream": stream}
                async with http.post(url + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
            chat = {"model": SIM_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            async with http.post(url + "/v1/chat/completions", json=chat) as r:
                assert r.status == 200, await r.text()
            async with http.get(url + "/metrics") as r:
                assert "kvscale_router_requests_total" in await r.text()
        finally:
            modules = await asyncio.to_thread(_stop, proc, log)
    assert "router.app" in modules and "router.proxy" in modules  # the flag did report the imports
    assert forbidden(modules) == [], f"kvscale router serve imported {forbidden(modules)}"


@pytest.mark.timeout(120)
async def test_scaler_serve_imports_no_simulator(tmp_path: Path) -> None:
    log = tmp_path / "scaler.log"
    async with sim_pod() as pod, aiohttp.ClientSession() as http:
        port, metrics_port = free_port(), free_port()
        proc = _start(["scaler", "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                       str(metrics_port), "--parse-workers", "1"], log)  # fmt: skip
        try:
            await _wait_http(http, f"http://127.0.0.1:{metrics_port}/healthz", proc, log)
            md = {"pool": "aggregated", "model": SIM_MODEL, "podUrls": pod.metrics_url,
                  "signalIntervalSeconds": "0.5", "latencyWindowSeconds": "2"}  # fmt: skip
            ref = pb.ScaledObjectRef(name="so", namespace="default", scalerMetadata=md)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.ExternalScalerStub(ch)
                spec = await stub.GetMetricSpec(ref, timeout=10)
                value = None
                deadline = time.monotonic() + 30
                while value is None and time.monotonic() < deadline:
                    try:
                        resp = await stub.GetMetrics(pb.GetMetricsRequest(
                            scaledObjectRef=ref, metricName=spec.metricSpecs[0].metricName), timeout=10)  # fmt: skip
                        value = resp.metricValues[0].metricValueFloat
                    except grpc.aio.AioRpcError as e:
                        assert e.code() == grpc.StatusCode.UNAVAILABLE, e  # no signals yet
                        await asyncio.sleep(0.5)
                assert value is not None and value >= 1
                assert (await stub.IsActive(ref, timeout=10)).result in (True, False)
        finally:
            modules = await asyncio.to_thread(_stop, proc, log)
    assert "scaler.policy" in modules and "kvscale.engine_stats" in modules  # the decision loop ran here
    assert forbidden(modules) == [], f"kvscale scaler serve imported {forbidden(modules)}"

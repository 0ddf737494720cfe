"""Real parts for the scaler's tests and benchmarks: in-process simulator pods, load, Prometheus, certificates.

Nothing here is a mock: :class:`SimPod` is the real ``simulator.server`` app on a real socket, :class:`Prometheus`
the real Prometheus binary scraping it, and the certificates are real X.509 (``cryptography``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import random
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from kvscale.latency import LatencyModel, StepCoefficients
from kvscale.testing.procs import ManagedProcess, free_port
from kvscale.tokenizer import FallbackTokenizer
from simulator.engine import EngineConfig
from simulator.scheduler import SchedulerConfig
from simulator.server import ServeConfig, SimServer

MODEL = "sim-model"
PROMETHEUS_BIN = "/usr/bin/prometheus"


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


def write_latency_model(path: Path) -> Path:
    path.write_text(slow_latency_model().dumps())
    return path


@dataclass
class SimPod:
    """One simulated vLLM pod in this process, on a free port."""

    port: int
    sim: SimServer
    runner: web.AppRunner
    url: str = ""
    metrics_url: str = ""

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_pod(latency: LatencyModel | None = None, *, role: str = "both") -> SimPod:
    port = free_port()
    config = ServeConfig(model=MODEL, port=port, max_model_len=2048, role=role)
    engine_config = EngineConfig(
        scheduler=SchedulerConfig(max_model_len=2048, max_num_seqs=256),
        num_gpu_blocks=4096,
        output_token_range=FallbackTokenizer().output_token_range(),
    )
    sim = SimServer(config, engine_config, latency or slow_latency_model(), FallbackTokenizer())
    runner = web.AppRunner(sim.app(), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    return SimPod(port, sim, runner, url, url + "/metrics")


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


async def poisson_load(
    session: aiohttp.ClientSession,
    pods: list[SimPod] | list[str] | callable,  # type: ignore[valid-type]
    rate: float,
    duration_s: float,
    *,
    prompt_words: int = 40,
    max_tokens: int = 8,
    seed: int = 0,
    stats: LoadStats | None = None,
) -> LoadStats:
    """Open-loop Poisson load, round-robin over the pods (pods or base URLs; ``pods`` may be a callable returning
    the current list, for a pool that scales while the load runs). Waits for every request to finish."""
    rng = random.Random(seed)
    stats = stats or LoadStats()
    tasks: list[asyncio.Task] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + duration_s
    i = 0

    async def one(url: str, n: int) -> None:
        prompt = " ".join(f"w{n}x{k}" for k in range(prompt_words))
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
        try:
            async with session.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(60)) as r:
                await r.read()
                if r.status == 200:
                    stats.ok += 1
                else:
                    stats.failed += 1
        except (aiohttp.ClientError, TimeoutError) as e:
            stats.failed += 1
            stats.errors.append(f"{type(e).__name__}: {e}")

    while True:
        await asyncio.sleep(rng.expovariate(rate))
        if loop.time() >= end:
            break
        current = pods() if callable(pods) else pods
        if not current:
            continue
        pod = current[i % len(current)]
        i += 1
        stats.sent += 1
        tasks.append(asyncio.create_task(one(pod if isinstance(pod, str) else pod.url, i)))
    if tasks:
        await asyncio.gather(*tasks)
    return stats


class Prometheus:
    """The real Prometheus server scraping ``targets`` (host:port) every ``scrape_interval_s``."""

    def __init__(self, workdir: Path, targets: list[str], scrape_interval_s: float = 1.0) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        interval = f"{scrape_interval_s:g}s"
        lines = [
            "global:",
            f"  scrape_interval: {interval}",
            f"  evaluation_interval: {interval}",
            "scrape_configs:",
            "  - job_name: vllm",
            f"    scrape_interval: {interval}",
            f"    scrape_timeout: {interval}",
            "    static_configs:",
            f"      - targets: [{', '.join(repr(t) for t in targets)}]",
        ]
        (workdir / "prometheus.yml").write_text("\n".join(lines) + "\n")
        self.proc = ManagedProcess(
            [
                PROMETHEUS_BIN,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            log_path=workdir / "prometheus.log",
            name="prometheus",
        )

    @staticmethod
    def available() -> bool:
        return shutil.which(PROMETHEUS_BIN) is not None

    def start(self, timeout: float = 60.0) -> Prometheus:
        self.proc.start()
        self.proc.wait_http_ready(self.url + "/-/ready", timeout=timeout)
        return self

    def stop(self) -> None:
        self.proc.stop()


def generate_certs(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA.

    Returns paths: ca, server_cert, server_key, client_cert, client_key, other_ca (an unrelated CA, to check
    that a client certificate from elsewhere is refused).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        cert = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(k.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256())
        )  # fmt: skip
        return cert, k

    def leaf(cn: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey, server: bool):
        k = key()
        b = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer.subject).public_key(k.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )  # fmt: skip
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return b.sign(issuer_key, hashes.SHA256()), k

    def write(stem: str, cert: x509.Certificate, k: ec.EllipticCurvePrivateKey | None = None) -> None:
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if k is not None:
            (directory / f"{stem}.key").write_bytes(
                k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
            )

    ca_cert, ca_key = ca("kvscale-test-ca")
    other_cert, other_key = ca("some-other-ca")
    srv, srv_key = leaf("kvscale-scaler", ca_cert, ca_key, True)
    cli, cli_key = leaf("keda-operator", ca_cert, ca_key, False)
    rogue, rogue_key = leaf("rogue", other_cert, other_key, False)
    write("ca", ca_cert)
    write("other-ca", other_cert)
    write("server", srv, srv_key)
    write("client", cli, cli_key)
    write("rogue", rogue, rogue_key)
    return {
        "ca": directory / "ca.crt",
        "server_cert": directory / "server.crt",
        "server_key": directory / "server.key",
        "client_cert": directory / "client.crt",
        "client_key": directory / "client.key",
        "rogue_cert": directory / "rogue.crt",
        "rogue_key": directory / "rogue.key",
    }


@contextlib.asynccontextmanager
async def pods(n: int, latency: LatencyModel | None = None) -> AsyncIterator[list[SimPod]]:
    started = [await start_pod(latency) for _ in range(n)]
    try:
        yield started
    finally:
        for p in started:
            with contextlib.suppress(Exception):
                await p.stop()


def load_main(argv: list[str] | None = None) -> int:
    """``python -m scaler.testing load --urls URL[,URL] --rate R --duration S``: :func:`poisson_load` in a process
    of its own (benchmarks keep the load generator off the scaler's and the pods' event loops)."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m scaler.testing load")
    p.add_argument("--urls", required=True, help="comma-separated base URLs of the pods")
    p.add_argument("--rate", type=float, required=True, help="mean requests per second (Poisson)")
    p.add_argument("--duration", type=float, required=True, help="seconds of load")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    urls = [u.strip() for u in args.urls.split(",") if u.strip()]

    async def main() -> LoadStats:
        async with aiohttp.ClientSession() as session:
            return await poisson_load(session, urls, args.rate, args.duration, seed=args.seed)

    stats = asyncio.run(main())
    print(json.dumps({"sent": stats.sent, "ok": stats.ok, "failed": stats.failed, "errors": stats.errors[:5]}),
          flush=True)  # fmt: skip
    return 0 if stats.failed == 0 else 1


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2 or sys.argv[1] != "load":
        print("usage: python -m scaler.testing load --urls URL[,URL] --rate R --duration S", file=sys.stderr)
        sys.exit(2)
    sys.exit(load_main(sys.argv[2:]))

"""The real Prometheus server (Debian's ``prometheus`` binary) on a free port, scraping the given targets."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.procs import ManagedProcess, free_port

PROMETHEUS_BIN = "/usr/bin/prometheus"


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

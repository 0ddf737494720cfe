"""``kvscale bench routing`` end to end at a toy size (the figures come from ``make bench``): real simulator pods in
their own processes, the kvscale router and the vllm-router and sglang-router binaries in front, the JSON shape the
issue names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

KEYS = {"ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "itl_p90_s", "throughput_rps", "prefix_hit_rate", "errors"}


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvscale.cli", "bench", "routing", *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_bench_routing_writes_every_policy(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = bench("--backends", "2", "--rate", "4", "--duration", "2", "--json", str(out),
                 "--policies", "round-robin,best,vllm-router:round_robin,sglang-router:cache_aware",
                 "--repeat", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["workload"] == "shared-prefix" and result["rate"] == 4.0
    assert set(result["policies"]) == {"round-robin", "best", "vllm-router:round_robin", "sglang-router:cache_aware"}
    for name, r in result["policies"].items():
        assert set(r) >= KEYS, (name, r)
        assert r["requests"] > 0 and r["errors"] == 0, (name, r)
        assert r["ttft_p50_s"] > 0 and 0 <= r["prefix_hit_rate"] <= 1
    assert result["repeat"] == 2
    assert all(len(r["rounds_ttft_p90_s"]) == 2 for r in result["policies"].values())


def test_bench_routing_rejects_bad_arguments() -> None:
    cases = ((["--workload", "nope"], "--workload"), (["--rate", "0"], "positive"), (["--repeat", "0"], "positive"),
             (["--engine", "vllm-cpu", "--workload", "mixed-length"], "shared-prefix workload only"))
    for args, needle in cases:
        proc = bench(*args, timeout=60)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr[-500:])

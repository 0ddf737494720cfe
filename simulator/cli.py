"""``kvscale sim serve``: the real-time HTTP driver's arguments and entry point.

``kvscale sim run`` (the virtual-clock cluster) is registered by ``router.evaluate.sim_run``: the cluster routes
with the router's policy ``Pipeline``, which lives above the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from aiohttp import web

from kvscale.latency import DEFAULT_MODEL, LatencyModelError, builtin_models, load_latency_model
from simulator.engine import EngineConfig
from simulator.kv_publisher import KVEventsConfig
from simulator.scheduler import SchedulerConfig


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"KVSCALE_SIM_{name}", default)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Flags mirror vLLM's where vLLM has them (env: KVSCALE_SIM_<FLAG>)."""
    p.add_argument("--model", default=_env("MODEL", "sim-model"), help="model name (vLLM: --model)")
    p.add_argument("--served-model-name", nargs="+", default=None, help="names the model is served under")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env("PORT", "8000") or 8000))
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-gpu-blocks", "--num-gpu-blocks-override", dest="num_gpu_blocks", type=int, default=None,
                   help="KV cache size in blocks (default: the latency model's estimate, else 32768)")  # fmt: skip
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--kv-events-config", default=None, help="vLLM's KV-events JSON (publisher zmq, endpoint, topic)")
    p.add_argument("--lora-modules", nargs="+", default=[], help="name=path or JSON {name, path}; served as models")
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--role", choices=("both", "prefill", "decode"), default=_env("ROLE", "both"))
    p.add_argument("--latency-model", default=_env("LATENCY_MODEL", DEFAULT_MODEL),
                   help=f"latency-model JSON file or built-in name ({', '.join(builtin_models())})")  # fmt: skip
    p.add_argument("--tokenizer", default=_env("TOKENIZER"), help="local Hugging Face tokenizer directory")
    p.add_argument("--metrics-flavor", choices=("vllm", "sglang"), default="vllm")
    p.add_argument("--engine-id", default=None, help="P/D: engine id returned in kv_transfer_params")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "warning"))


def parse_lora_modules(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                obj = json.loads(item)
                out[str(obj["name"])] = str(obj["path"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"--lora-modules {item!r}: expected JSON with 'name' and 'path'") from e
        elif "=" in item:
            name, path = item.split("=", 1)
            out[name] = path
        else:
            raise ValueError(f"--lora-modules {item!r}: expected name=path")
    return out


def build_server(args: argparse.Namespace):  # -> SimServer (import deferred: keeps `kvscale --help` fast)
    from kvscale.tokenizer import load_tokenizer
    from simulator.server import ServeConfig, SimServer

    latency = load_latency_model(args.latency_model)
    blocks = args.num_gpu_blocks or latency.num_gpu_blocks()
    tokenizer = load_tokenizer(args.tokenizer)
    engine_config = EngineConfig(
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
        ),
        block_size=args.block_size,
        num_gpu_blocks=blocks,
        enable_prefix_caching=args.enable_prefix_caching,
        output_token_range=tokenizer.output_token_range(),
    )
    config = ServeConfig(
        model=args.model,
        served_model_names=args.served_model_name or [],
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        role=args.role,
        lora_modules=parse_lora_modules(args.lora_modules),
        max_loras=args.max_loras,
        metrics_flavor=args.metrics_flavor,
        kv_events=KVEventsConfig.from_json(args.kv_events_config) if args.kv_events_config else KVEventsConfig(),
    )
    if args.engine_id:
        config.engine_id = args.engine_id
    return SimServer(config, engine_config, latency, tokenizer)


def serve_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = build_server(args)
    except (ValueError, LatencyModelError, OSError) as e:
        print(f"kvscale sim serve: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop  # type: ignore[import-not-found]

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    print(f"kvscale sim: serving {server.config.model_names} on http://{args.host}:{args.port} "
          f"(role={args.role}, latency model={server.engine.latency.name})", flush=True)  # fmt: skip
    web.run_app(server.app(), host=args.host, port=args.port, print=None, handler_cancellation=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to ``kvscale sim`` (``sub``: the sim group's subparsers)."""
    add_commands(sub)


def add_commands(sim_sub: argparse._SubParsersAction) -> None:
    """``serve`` (under ``kvscale sim``, or ``python -m simulator``)."""
    serve = sim_sub.add_parser("serve", help="serve vLLM's OpenAI API from the engine model (real time)")
    add_serve_args(serve)
    serve.set_defaults(func=serve_main)

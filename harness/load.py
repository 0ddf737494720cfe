"""Open-loop Poisson load over pods' OpenAI completions endpoint, in this process or one of its own
(``python -m harness.load --urls URL[,URL] --rate R --duration S``: benchmarks keep the load generator off the
scaler's and the pods' event loops)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from harness.simpods import SIM_MODEL, Pod
from simulator.workload import TraceRequest, completion_body, poisson


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


async def poisson_load(
    session: aiohttp.ClientSession,
    pods: Sequence[Pod | str] | Callable[[], Sequence[Pod | str]],
    rate: float,
    duration_s: float,
    *,
    prompt_tokens: int = 40,
    max_tokens: int = 8,
    seed: int = 0,
    stats: LoadStats | None = None,
) -> LoadStats:
    """Open-loop Poisson load (the simulator's arrival generator), round-robin over the pods (pods or base URLs;
    ``pods`` may be a callable returning the current list, for a pool that scales while the load runs). Every
    request is ``prompt_tokens`` unique token ids and ``max_tokens`` output tokens. Waits for every request."""
    stats = stats or LoadStats()
    times = poisson(rate, duration_s, np.random.default_rng(seed))
    tasks: list[asyncio.Task] = []
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(url: str, body: dict) -> None:
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

    sent = 0
    for i, t in enumerate(times.tolist()):
        await asyncio.sleep(max(0.0, start + t - loop.time()))
        current = pods() if callable(pods) else pods
        if not current:
            continue
        pod = current[sent % len(current)]
        sent += 1
        stats.sent += 1
        body = completion_body(TraceRequest(t, None, prompt_tokens, max_tokens), SIM_MODEL, i, seed=seed)
        tasks.append(asyncio.create_task(one(pod if isinstance(pod, str) else pod.url, body)))
    await asyncio.sleep(max(0.0, start + duration_s - loop.time()))
    if tasks:
        await asyncio.gather(*tasks)
    return stats


def load_main(argv: list[str] | None = None) -> int:
    """``python -m harness.load --urls URL[,URL] --rate R --duration S``: :func:`poisson_load` in a process
    of its own (benchmarks keep the load generator off the scaler's and the pods' event loops)."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m harness.load")
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

    sys.exit(load_main(sys.argv[1:]))

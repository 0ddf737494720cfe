"""Open-loop Poisson load over pods' OpenAI completions endpoint, in this process or one of its own
(``python -m harness.load --urls URL[,URL] --rate R --duration S``: benchmarks keep the load generator off the
scaler's and the pods' event loops)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from harness.simpods import SIM_MODEL, Pod


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
        body = {"model": SIM_MODEL, "prompt": prompt, "max_tokens": max_tokens}
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

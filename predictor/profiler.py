"""``kvscale profile run``: drive OpenAI-compatible endpoints through prefill, decode and load sweeps.

Sweeps (after Dynamo's pre-deployment profiling and AIBrix's gpu-optimizer):

* ``prefill``: an ISL grid at concurrency 1 with ``max_tokens=1``, so TTFT ≈ one prefill; every prompt starts
  with fresh random tokens, so no prefix-cache hit pollutes it.
* ``prefix`` (optional): the same ISLs sent twice, the second time sharing a prefix of the first, to *measure*
  TTFT with a cached prefix (and the engine's reported ``cached_tokens``).
* ``decode``: a concurrency x context grid with a fixed OSL, streaming; per-token inter-token latencies.
* ``load``: Poisson arrivals at increasing rates with a workload's ISL/OSL distribution, until saturation.

Prompts are token-id lists (``prompt: [ids]``, accepted by vLLM, SGLang and the simulator), so lengths are exact
without a tokenizer; the recorded ISL is what the server reports in ``usage``. Points are spread over the
endpoints (one point at a time per endpoint) and each is written when complete, so a re-run skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from kvscale import __version__
from kvscale.engine_stats import EngineStats, ScrapeError, scrape
from kvscale.loadgen import Sample, stream_completion
from predictor.dataset import measured_points, read_manifest, request_row, write_manifest, write_point
from simulator.workload import WORKLOADS, poisson

SWEEPS = ("prefill", "prefix", "decode", "load")
DEFAULT_SWEEPS = ("prefill", "decode", "load")


class ProfileError(RuntimeError):
    """The profile cannot go on (endpoint down, not an OpenAI API, too many failures); measured points are kept."""


@dataclass(frozen=True)
class Point:
    sweep: str
    isl: int
    osl: int
    concurrency: int = 1
    rate_rps: float = 0.0
    cached: int = 0
    requests: int = 1  # measured requests (prefill/prefix: sequential repeats; decode: rounds of `concurrency`)

    @property
    def point_id(self) -> str:
        if self.sweep == "prefill":
            return f"prefill-isl{self.isl}"
        if self.sweep == "prefix":
            return f"prefix-isl{self.isl}-cached{self.cached}"
        if self.sweep == "decode":
            return f"decode-c{self.concurrency}-ctx{self.isl}-osl{self.osl}"
        return f"load-r{self.rate_rps:g}"


@dataclass
class ProfileConfig:
    endpoints: list[str]
    model: str
    out: Path
    sweeps: tuple[str, ...] = DEFAULT_SWEEPS
    prefill_isl: tuple[int, ...] = (32, 128, 256, 512, 1024, 2048, 4096, 8192)
    prefill_repeats: int = 8
    prefix_cached_fraction: float = 0.75
    decode_concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_context: tuple[int, ...] = (128, 1024, 4096)
    decode_osl: int = 64
    decode_rounds: int = 1
    interleave_rounds: bool = True  # decode rounds in passes over the grid, not all of a point's rounds in a row
    decode_poll_s: float = 0.02  # engine snapshots while a decode round's streams are prefilled (the window's start)
    load_workload: str = "chat"
    load_rates: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
    load_duration_s: float = 30.0
    saturation_ttft_s: float = 10.0  # stop the load sweep once TTFT p90 exceeds this, or TTFT keeps growing
    saturation_growth: float = 5.0  # (median TTFT of the last quarter of arrivals vs the first quarter)
    warmup_requests: int = 3
    token_range: tuple[int, int] = (100, 2000)  # safe for every real vocabulary (and the tiny test model)
    timeout_s: float = 300.0
    metrics_interval_s: float = 0.5
    hardware: str = ""
    max_model_len: int | None = None  # None: read from /v1/models
    seed: int = 0  # arrival times of the load sweep
    max_failure_fraction: float = 0.5

    def parameters(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("endpoints", "out", "hardware"):
            d.pop(k)
        return d


@dataclass
class EndpointInfo:
    url: str
    max_model_len: int | None
    engine: str
    engine_version: str
    hardware: str
    block_size: int | None = None  # from the engine's vllm:cache_config_info
    num_gpu_blocks: int | None = None

    @property
    def kv_tokens(self) -> int | None:
        return self.block_size * self.num_gpu_blocks if self.block_size and self.num_gpu_blocks else None


@dataclass
class PointResult:
    point: Point
    rows: list[dict[str, Any]]
    engine_rows: list[dict[str, Any]]
    wall_s: float
    failures: int = 0
    saturated: bool = False
    stats: dict[str, Any] | None = None  # engine-side statistics (engine_point_stats plus per-request lists)


@dataclass
class ProfileSummary:
    measured: list[PointResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already on disk
    dropped: list[str] = field(default_factory=list)  # outside max_model_len, or past saturation
    wall_s: float = 0.0


def build_points(
    cfg: ProfileConfig, max_model_len: int | None, kv_tokens: int | None = None
) -> tuple[list[Point], list[str]]:
    """The grid, minus points that cannot fit the model's context or, for decode, the KV cache without
    preemption (returned as readable reasons)."""
    points: list[Point] = []
    dropped: list[str] = []
    limit = max_model_len or math.inf

    def add(p: Point) -> None:
        if p.isl + p.osl > limit:
            dropped.append(f"{p.point_id} (ISL {p.isl} + OSL {p.osl} > max_model_len {max_model_len})")
        elif p.sweep == "decode" and kv_tokens and p.concurrency * (p.isl + p.osl) > 0.9 * kv_tokens:
            dropped.append(f"{p.point_id} ({p.concurrency} x {p.isl + p.osl} tokens > 90% of the KV cache "
                           f"({kv_tokens} tokens): it would measure preemption)")  # fmt: skip
        else:
            points.append(p)

    for sweep in cfg.sweeps:
        if sweep not in SWEEPS:
            raise ValueError(f"unknown sweep {sweep!r}; valid: {', '.join(SWEEPS)}")
        if sweep == "prefill":
            for isl in cfg.prefill_isl:
                add(Point("prefill", isl, 1, requests=cfg.prefill_repeats))
        elif sweep == "prefix":
            for isl in cfg.prefill_isl:
                add(Point("prefix", isl, 1, cached=int(isl * cfg.prefix_cached_fraction), requests=cfg.prefill_repeats))
        elif sweep == "decode":
            for ctx in cfg.decode_context:
                for c in cfg.decode_concurrency:
                    add(Point("decode", ctx, cfg.decode_osl, concurrency=c, requests=cfg.decode_rounds))
        else:
            spec = WORKLOADS[cfg.load_workload]
            for r in cfg.load_rates:
                points.append(Point("load", int(spec.input_median), int(spec.output_median), concurrency=0, rate_rps=r))
    return points, dropped


async def probe_endpoint(session: aiohttp.ClientSession, url: str, model: str, timeout_s: float = 10.0) -> EndpointInfo:
    """Check that ``url`` speaks the OpenAI API and serves ``model``; read max_model_len and the engine version."""
    base = url.rstrip("/")
    try:
        async with session.get(f"{base}/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise ProfileError(f"{url}: GET /v1/models answered HTTP {resp.status}: {text[:200]!r}")
            try:
                data = await resp.json(content_type=None)
                models = {m["id"]: m for m in data["data"]}
            except (ValueError, KeyError, TypeError) as e:
                raise ProfileError(f"{url}: GET /v1/models is not an OpenAI models list: {text[:200]!r}") from e
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise ProfileError(f"{url}: cannot reach the endpoint ({type(e).__name__}: {e})") from e
    if model not in models:
        raise ProfileError(f"{url}: does not serve model {model!r} (it serves {sorted(models)})")
    info = models[model]
    engine, version, hardware = "openai-compatible", "", ""
    try:
        async with session.get(f"{base}/version", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status == 200:
                v = await resp.json(content_type=None)
                version = str(v.get("version", ""))
                engine = str(v.get("engine", "vllm"))
                hardware = str(v.get("hardware", ""))
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, AttributeError):
        pass
    block_size = num_blocks = None
    try:
        st = await scrape(session, f"{base}/metrics", timeout_s=timeout_s, light=True)
        block_size, num_blocks = st.block_size, st.num_gpu_blocks
    except ScrapeError:
        pass  # not every OpenAI-compatible endpoint exports engine metrics
    mml = info.get("max_model_len")
    return EndpointInfo(
        url, int(mml) if isinstance(mml, int) else None, engine, version, hardware, block_size, num_blocks
    )


def engine_point_stats(before: EngineStats, after: EngineStats) -> dict[str, Any]:
    """The engine's own TTFT/ITL over a point (histogram deltas): exact means, free of HTTP and client delays.

    A point runs alone on its endpoint and ``before`` is taken after its warm-up, so the deltas are exactly the
    point's measured requests.
    """
    ttft, itl = after.ttft - before.ttft, after.itl - before.itl
    return {
        "engine_ttft_mean_s": ttft.mean,
        "engine_ttft_count": ttft.count,
        "engine_itl_mean_s": itl.mean,
        "engine_itl_count": itl.count,
        "engine_prompt_tokens": after.prompt_tokens_total - before.prompt_tokens_total,
        "engine_generation_tokens": after.generation_tokens_total - before.generation_tokens_total,
    }


def steady_decode_window(
    start: EngineStats, a: EngineStats, b: EngineStats, batch: int, isl: int
) -> dict[str, float] | None:
    """The engine's mean ITL over a stretch of one decode round in which every step decoded exactly ``batch``
    sequences: from ``a`` (all prefills done) to ``b`` (nobody finished yet). None if the snapshots show otherwise.

    Streams sent together reach the engine over tens of milliseconds on a busy CPU, so the first steps of a round
    carry other requests' prefill chunks, and the last ones a shrinking batch; a per-round mean (histogram delta
    over the whole round) mixes those in. ``context_tokens`` is the mean total context of the window's steps:
    ``batch * isl`` plus the tokens generated so far, averaged over the window (progress is uniform in it).
    """
    itl = b.itl - a.itl
    if not _all_prefilled(start, a, batch, isl) or a.running != batch or b.running != batch or b.waiting:
        return None
    if itl.count < batch:
        return None
    g_a = a.generation_tokens_total - start.generation_tokens_total
    g_b = b.generation_tokens_total - start.generation_tokens_total
    return {"itl_mean_s": itl.mean or 0.0, "itl_count": itl.count, "batch": batch,
            "context_tokens": batch * isl + (g_a + g_b) / 2.0}  # fmt: skip


def _all_prefilled(start: EngineStats, now: EngineStats, batch: int, isl: int) -> bool:
    """Every stream of the round has its first token: ``batch`` more TTFT observations, or (engines that observe
    TTFT only when a request finishes) ``batch * isl`` more prompt tokens, which vLLM counts at prefill completion."""
    return (now.ttft - start.ttft).count >= batch or now.prompt_tokens_total - start.prompt_tokens_total >= batch * isl


class _Prompts:
    """Random token-id prompts; a fresh random start makes every prompt's first block unique.

    Seeded from OS entropy, never from the config: a re-run against the same (warm) pod must not repeat prompts.
    """

    def __init__(self, token_range: tuple[int, int]) -> None:
        self.lo, self.hi = token_range
        self.rng = np.random.default_rng()

    def make(self, n: int) -> list[int]:
        return self.rng.integers(self.lo, self.hi, max(1, n)).tolist()


def _body(model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    # ignore_eos (vLLM/SGLang extension) makes the output length exact; temperature 0 keeps sampling cheap.
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}


def _row(point: Point, sample: Sample, start_s: float, warmup: bool) -> dict[str, Any]:
    return request_row(
        sweep=point.sweep, point_id=point.point_id, endpoint=sample.endpoint, isl_target=point.isl,
        osl_target=point.osl, concurrency=point.concurrency, rate_rps=point.rate_rps, cached_target=point.cached,
        warmup=warmup, start_s=start_s, ok=sample.ok, status=sample.status, error=sample.error[:300],
        ttft_s=sample.ttft_s, e2e_s=sample.e2e_s, itl_s=list(sample.itls_s), prompt_tokens=sample.prompt_tokens,
        completion_tokens=sample.completion_tokens, cached_tokens=sample.cached_tokens,
    )  # fmt: skip


def _merge_rounds(point: Point, parts: list[PointResult]) -> PointResult:
    """One point's rounds measured apart (see ``Profiler._interleaved``) as if measured in a row: rows joined,
    engine means weighted by their counts, token counts summed, steady windows listed."""
    stats: dict[str, Any] = {}
    have = [r.stats for r in parts if r.stats]
    for kind in ("ttft", "itl"):
        n = sum(st.get(f"engine_{kind}_count") or 0.0 for st in have)
        total = sum((st.get(f"engine_{kind}_mean_s") or 0.0) * (st.get(f"engine_{kind}_count") or 0.0) for st in have)
        stats[f"engine_{kind}_mean_s"] = total / n if n > 0 else None
        stats[f"engine_{kind}_count"] = n
    for key in ("engine_prompt_tokens", "engine_generation_tokens"):
        stats[key] = sum(st.get(key) or 0.0 for st in have)
    if windows := [w for st in have for w in st.get("engine_steady_decode", [])]:
        stats["engine_steady_decode"] = windows
    return PointResult(
        point, [row for r in parts for row in r.rows], [row for r in parts for row in r.engine_rows],
        sum(r.wall_s for r in parts), sum(r.failures for r in parts), False, stats if have else None,
    )  # fmt: skip


class Profiler:
    """Runs the sweeps of one :class:`ProfileConfig`. ``on_progress(done, total, point_id)`` drives a progress bar."""

    def __init__(self, cfg: ProfileConfig, on_progress: Callable[[int, int, str], None] | None = None) -> None:
        self.cfg = cfg
        self.on_progress = on_progress or (lambda *_: None)
        self.prompts = _Prompts(cfg.token_range)
        self.max_model_len: int | None = cfg.max_model_len

    async def run(self) -> ProfileSummary:
        cfg = self.cfg
        t0 = time.perf_counter()
        summary = ProfileSummary()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            infos = [await probe_endpoint(session, u, cfg.model) for u in cfg.endpoints]
            mml = cfg.max_model_len or min((i.max_model_len for i in infos if i.max_model_len), default=None)
            self.max_model_len = mml
            self._write_manifest(infos, mml)
            kv = min((i.kv_tokens for i in infos if i.kv_tokens), default=None)
            points, summary.dropped = build_points(cfg, mml, kv)
            done = measured_points(cfg.out)
            todo = [p for p in points if p.point_id not in done]
            summary.skipped = [p.point_id for p in points if p.point_id in done]
            total = len(points)
            progress = [len(summary.skipped)]
            self.on_progress(progress[0], total, "")
            await self._warmup(session, infos)
            # Load points run in rate order on all endpoints at once (they need the whole pool); the other points
            # are spread over the endpoints, one at a time per endpoint.
            passes = [p for p in todo if p.sweep == "decode" and p.requests > 1] if cfg.interleave_rounds else []
            queue: asyncio.Queue[Point] = asyncio.Queue()
            for p in todo:
                if p.sweep != "load" and p not in passes:
                    queue.put_nowait(p)
            failure: list[BaseException] = []

            def finished(res: PointResult) -> None:
                summary.measured.append(res)
                progress[0] += 1
                self.on_progress(progress[0], total, res.point.point_id)

            async def worker(info: EndpointInfo, mine: list[Point]) -> None:
                while not queue.empty() and not failure:
                    p = queue.get_nowait()
                    try:
                        finished(await self._measure(session, p, [info.url]))
                    except ProfileError as e:
                        failure.append(e)
                        return
                if mine and not failure:
                    try:
                        await self._interleaved(session, mine, info.url, finished)
                    except ProfileError as e:
                        failure.append(e)

            await asyncio.gather(*(worker(i, passes[k :: len(infos)]) for k, i in enumerate(infos)))
            if failure:
                raise failure[0]
            saturated = False
            for p in (p for p in todo if p.sweep == "load"):
                if saturated:
                    summary.dropped.append(f"{p.point_id} (past saturation)")
                    progress[0] += 1
                    continue
                res = await self._measure(session, p, cfg.endpoints)
                summary.measured.append(res)
                saturated = res.saturated
                progress[0] += 1
                self.on_progress(progress[0], total, p.point_id)
        summary.wall_s = time.perf_counter() - t0
        return summary

    def _write_manifest(self, infos: list[EndpointInfo], mml: int | None) -> None:
        cfg = self.cfg
        engine = infos[0].engine
        version = infos[0].engine_version
        hardware = cfg.hardware or infos[0].hardware or "unknown (pass --hardware)"
        manifest = {
            "engine": engine,
            "engine_version": version,
            "model": cfg.model,
            "hardware": hardware,
            "endpoints": cfg.endpoints,
            "max_model_len": mml,
            "kv_cache": {"block_size": infos[0].block_size, "num_gpu_blocks": infos[0].num_gpu_blocks},
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "kvscale_version": __version__,
            "client_host": platform.node(),
            "parameters": cfg.parameters(),
        }
        if (cfg.out / "manifest.json").is_file():
            old = read_manifest(cfg.out)
            if old.get("model") != cfg.model:
                raise ProfileError(
                    f"{cfg.out} holds a profile of model {old.get('model')!r}, not {cfg.model!r}: use another --out"
                )
            manifest["created"] = old.get("created", manifest["created"])
            manifest["resumed"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        write_manifest(cfg.out, manifest)

    async def _warmup(self, session: aiohttp.ClientSession, infos: list[EndpointInfo]) -> None:
        """A few requests per endpoint before measuring (first requests pay compilation and allocation)."""
        for info in infos:
            for _ in range(self.cfg.warmup_requests):
                s = await stream_completion(
                    session, info.url, _body(self.cfg.model, self.prompts.make(64), 8), timeout_s=self.cfg.timeout_s
                )
                if not s.ok:
                    raise ProfileError(f"{info.url}: warm-up request failed: HTTP {s.status} {s.error[:300]}")

    async def _engine_snapshot(self, session: aiohttp.ClientSession, url: str) -> EngineStats | None:
        try:
            return await scrape(session, f"{url.rstrip('/')}/metrics")
        except ScrapeError:
            return None

    async def _decode_round(
        self, session: aiohttp.ClientSession, point: Point, url: str, rows: list[dict[str, Any]], t0: float
    ) -> dict[str, float] | None:
        """``concurrency`` streams sent together; the engine's steady window (see :func:`steady_decode_window`) opens
        at snapshot ``a``, one poll (``decode_poll_s``) after every stream has its first token, and closes at
        snapshot ``z``, taken without polling in between while no stream can be within a quarter of its ``osl`` of
        finishing. Scraping vLLM's ``/metrics`` costs its API server milliseconds of CPU, which on a small box slows
        the very steps being measured, so the window itself is left alone.

        The engine's counters decide, checked afterwards; the client's view (a busy box delivers SSE chunks in
        bursts, so it lags) only tightens a bound. After ``a`` every step decodes all ``B`` streams, so the leading
        one gains one token per step from at most ``min(g_a - (B - 1), c_max + g_a - sum(c))`` at ``a`` (``g_a``:
        tokens the engine generated in the round, ``c``: chunks each stream had received just before; every stream
        is at least as far on the engine as on the client). ``z`` is taken after 80% of the steps left to the
        limit, timed with the engine's mean ITL between ``a`` and one probe snapshot a poll later (pure decode steps;
        without a usable probe, the round's mean so far, an overestimate that counts the prefill-carrying steps).
        """
        b = point.concurrency
        done = asyncio.Event()
        seen = [0] * b

        async def one(i: int) -> None:
            start = time.perf_counter() - t0
            body = _body(self.cfg.model, self.prompts.make(point.isl), point.osl)

            def count(i: int = i) -> None:  # content chunks of stream i so far (bound the engine's progress)
                seen[i] += 1

            s = await stream_completion(session, url, body, timeout_s=self.cfg.timeout_s, on_chunk=count)
            rows.append(_row(point, s, start, False))
            done.set()  # the first stream to end closes the window

        start = await self._engine_snapshot(session, url)
        tasks = [asyncio.create_task(one(i)) for i in range(b)]
        window = None
        try:
            a = None
            prefilled = False
            while start is not None and not done.is_set():
                client = list(seen)  # before the scrape: a lower bound of each stream's progress at the snapshot
                snap = await self._engine_snapshot(session, url)
                if snap is None or done.is_set():
                    break
                if prefilled:
                    # one poll after the last prefill: an engine's counters may run a step ahead of its latency
                    # histograms (the simulator's do), never the other way round
                    a = snap
                    break
                prefilled = _all_prefilled(start, snap, b, point.isl)
                await asyncio.sleep(self.cfg.decode_poll_s)
            if a is not None and start is not None:
                g_a = a.generation_tokens_total - start.generation_tokens_total
                lead = min(g_a - (b - 1), max(client) + g_a - sum(client))
                steps_left = point.osl - max(1, point.osl // 4) - lead
                step_s = (a.itl - start.itl).mean or 0.0
                # The round's mean so far counts the prefill-carrying steps (with a 16 x 512-token prefill on a
                # small CPU model, tens of decode steps each): time the window with one pure-decode probe.
                await asyncio.sleep(self.cfg.decode_poll_s)
                probe = None if done.is_set() else await self._engine_snapshot(session, url)
                if probe is not None and (d := probe.itl - a.itl).count >= b and d.mean:
                    step_s = d.mean
                    steps_left -= (probe.generation_tokens_total - a.generation_tokens_total) / b
                if steps_left >= 2 and step_s > 0 and not done.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), 0.8 * steps_left * step_s)
                    if not done.is_set() and (z := await self._engine_snapshot(session, url)) is not None:
                        window = steady_decode_window(start, a, z, b, point.isl)
        finally:
            await asyncio.gather(*tasks)
        return window

    async def _sample_engine(
        self, session: aiohttp.ClientSession, urls: list[str], point: Point, t0: float, rows: list[dict[str, Any]]
    ) -> None:
        while True:
            for u in urls:
                try:
                    st = await scrape(session, f"{u.rstrip('/')}/metrics", light=True)
                except ScrapeError:
                    continue  # engine metrics are context, not the measurement: a miss leaves a gap
                rows.append({"point_id": point.point_id, "endpoint": u, "t_s": time.perf_counter() - t0,
                             "running": st.running, "waiting": st.waiting, "kv_usage": st.kv_usage})  # fmt: skip
            await asyncio.sleep(self.cfg.metrics_interval_s)

    async def _interleaved(
        self, session: aiohttp.ClientSession, points: list[Point], url: str, finished: Callable[[PointResult], None]
    ) -> None:
        """Decode points measured in passes: pass ``k`` runs round ``k`` of every point. A slow drift of the machine
        (another tenant's job, thermal state) then spreads over every point's rounds, where the per-point medians
        absorb it, instead of shifting whole neighbouring points. A point is written when its last round is done."""
        parts: dict[str, list[PointResult]] = {p.point_id: [] for p in points}
        t0 = time.perf_counter()
        for k in range(max(p.requests for p in points)):
            for p in points:
                if k < p.requests:
                    one = dataclasses.replace(p, requests=1)
                    parts[p.point_id].append(await self._measure(session, one, [url], write=False, warm=k == 0, t0=t0))
        for p in points:
            res = _merge_rounds(p, parts[p.point_id])
            write_point(self.cfg.out, p.point_id, res.rows, res.engine_rows, res.stats)
            finished(res)

    async def _measure(
        self,
        session: aiohttp.ClientSession,
        point: Point,
        urls: list[str],
        *,
        write: bool = True,
        warm: bool = True,
        t0: float | None = None,
    ) -> PointResult:
        """Measure one point (``write``: to its files; ``warm``: one unmeasured request of its shape first;
        ``t0``: the origin of its rows' times, default now)."""
        cfg = self.cfg
        rows: list[dict[str, Any]] = []
        engine_rows: list[dict[str, Any]] = []
        started = time.perf_counter()
        t0 = started if t0 is None else t0
        sampler = asyncio.create_task(self._sample_engine(session, urls, point, t0, engine_rows))

        async def send(prompt: list[int], max_tokens: int, url: str, warmup: bool = False) -> Sample:
            start = time.perf_counter() - t0
            s = await stream_completion(session, url, _body(cfg.model, prompt, max_tokens), timeout_s=cfg.timeout_s)
            rows.append(_row(point, s, start, warmup))
            return s

        before: list[EngineStats | None] = [None]
        per_request_ttft: list[float] = []  # the engine's TTFT of each measured request (prefill, prefix)
        windows: list[dict[str, float]] = []  # steady decode windows, one per round where the engine shows one
        last: list[EngineStats | None] = [None]

        async def mark() -> None:  # the engine's counters as the measured phase starts
            before[0] = last[0] = await self._engine_snapshot(session, urls[0])

        async def sequential(prompt: list[int]) -> None:
            """One lone request, then a snapshot: the TTFT histogram's delta is that request's engine TTFT."""
            prev = last[0]
            await send(prompt, 1, urls[0])
            last[0] = now = await self._engine_snapshot(session, urls[0])
            if prev is not None and now is not None and (d := now.ttft - prev.ttft).count == 1 and d.mean:
                per_request_ttft.append(d.mean)

        try:
            if warm and point.sweep in ("prefill", "prefix", "decode"):
                # One unmeasured request of the point's shape first (CPU engines compile per shape).
                await send(self.prompts.make(point.isl), min(point.osl, 4), urls[0], warmup=True)
            if point.sweep == "prefill":
                await mark()
                for _ in range(point.requests):
                    await sequential(self.prompts.make(point.isl))
            elif point.sweep == "prefix":
                firsts = [self.prompts.make(point.isl) for _ in range(point.requests)]
                for first in firsts:
                    await send(first, 1, urls[0], warmup=True)  # fills the cache
                await mark()
                for first in firsts:
                    await sequential(first[: point.cached] + self.prompts.make(point.isl - point.cached))
            elif point.sweep == "decode":
                await mark()
                for _ in range(point.requests):
                    if (w := await self._decode_round(session, point, urls[0], rows, t0)) is not None:
                        windows.append(w)
            else:
                await self._load(point, urls, send)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        stats = None
        if before[0] is not None and (after := await self._engine_snapshot(session, urls[0])) is not None:
            stats = engine_point_stats(before[0], after)
            if per_request_ttft:
                stats["engine_ttft_s"] = per_request_ttft
            if windows:
                stats["engine_steady_decode"] = windows
        measured = [r for r in rows if not r["warmup"]]
        failures = sum(1 for r in measured if not r["ok"])
        if measured and failures / len(measured) > cfg.max_failure_fraction:
            first = next(r for r in measured if not r["ok"])
            raise ProfileError(
                f"{point.point_id}: {failures}/{len(measured)} requests failed (first: HTTP {first['status']} "
                f"{first['error'][:200]}); points measured so far are kept in {cfg.out}"
            )
        saturated = False
        if point.sweep == "load":
            ok = sorted((r for r in measured if r["ok"]), key=lambda r: r["start_s"])
            ttft = [r["ttft_s"] for r in ok]
            p90 = float(np.percentile(ttft, 90)) if ttft else math.inf
            q = max(1, len(ttft) // 4)
            growing = np.median(ttft[-q:]) > cfg.saturation_growth * np.median(ttft[:q]) + 0.1 if ttft else True
            saturated = p90 > cfg.saturation_ttft_s or bool(growing)
        if write:
            write_point(cfg.out, point.point_id, rows, engine_rows, stats)
        return PointResult(point, rows, engine_rows, time.perf_counter() - started, failures, saturated, stats)

    async def _load(self, point: Point, urls: list[str], send: Callable[..., Any]) -> None:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed + int(point.rate_rps * 1000))
        arrivals = poisson(point.rate_rps, cfg.load_duration_s, rng)
        spec = WORKLOADS[cfg.load_workload]
        limit = self.max_model_len or 10**9
        isl, osl = spec.sample(arrivals.size, rng)
        osl = np.minimum(osl, limit // 2)
        t0 = time.perf_counter()
        pick = random.Random(cfg.seed)

        async def one(at: float, n_in: int, n_out: int) -> None:
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            n_in = int(min(n_in, max(1, limit - n_out - 1)))
            await send(self.prompts.make(n_in), int(n_out), pick.choice(urls))

        await asyncio.gather(*(one(a, i, o) for a, i, o in zip(arrivals.tolist(), isl.tolist(), osl.tolist(),
                                                                 strict=True)))  # fmt: skip


def run_profile(cfg: ProfileConfig, on_progress: Callable[[int, int, str], None] | None = None) -> ProfileSummary:
    return asyncio.run(Profiler(cfg, on_progress).run())

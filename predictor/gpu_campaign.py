"""The measurement campaign of ``kvscale profile steps``: time prefill and decode grids into a profile dataset.

:class:`StepsRunner` builds the random-weight decoder of ``predictor.gpu_model`` on the device, times a grid of
points (:func:`build_grid`) and writes each as a point of a profile directory (``predictor.dataset``) that
``kvscale profile fit`` turns into a latency model; a re-run resumes (points on disk are skipped).

* **prefill** point ``(n, c)``: one sequence, ``n`` new tokens at positions ``c..c+n-1`` attending to a KV cache
  pre-filled with ``c`` tokens (causal, bottom-right aligned). A row per repeat: ``ttft_s`` = one prefill step.
* **decode** point ``(B, L)``: ``B`` sequences, each with a KV cache of ``L`` tokens, decoded together for
  ``decode_steps`` steps (one new token per sequence per step, the cache growing). A row per repeat: its first
  step is ``ttft_s``, the others ``itl_s``, so ``kvscale profile fit`` reads the mean step time after the first at
  mean context ``L + steps/2``, exactly as it reads a streamed decode point of ``kvscale profile run``.

Timing: ``warmup`` untimed iterations per point, then the median of ``repeats``; CUDA events around the timed
regions with ``torch.cuda.synchronize()`` before and after (``time.perf_counter`` on CPU). Embedding, layers and
LM head are timed separately, so ``layers=N`` can build only ``N`` layers and scale the layers' time by
``layers / N`` (memory: weights and KV cache of ``N`` layers only); the manifest says so. Points over the memory
budget are skipped with a reason; on a GPU the manifest also estimates vLLM's KV capacity for the full model.

Only the standard library and ``predictor.roofline`` / ``predictor.gpu_model`` are imported here; torch and the
dataset writer (numpy, pandas, pyarrow) are imported when a measurement runs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from kvscale import __version__
from predictor.gpu_model import Decoder, Timer, param_count, sdpa_gqa_native
from predictor.roofline import LLAMA_3_1_8B, LLAMA_3_1_70B, Gpu, ModelShape, kv_capacity

if TYPE_CHECKING:
    import torch

NOTE = (
    "forward-pass step times of a random-weight model with PyTorch SDPA; no paged attention, no CUDA graphs, "
    "no continuous batching scheduler, no sampling"
)
BLOCK_SIZE = 16  # vLLM's default KV block size (for the KV-capacity estimate)
CPU_DEFAULT_MEMORY_GIB = 4.0
MIN_DECODE_STEPS = 8  # `kvscale profile fit` refuses decode streams shorter than 8 tokens

SHAPES: MappingProxyType[str, ModelShape] = MappingProxyType({
    "llama-3.1-8b": LLAMA_3_1_8B,
    "llama-3.1-70b": LLAMA_3_1_70B,
    # Small enough for a CPU test run in seconds, big enough that step time grows visibly with tokens.
    "tiny": ModelShape(name="kvscale/tiny-llama-shape (test)", layers=2, hidden=256, heads=4, kv_heads=2,
                       head_dim=64, intermediate=768, vocab=2048, params=0.0),  # fmt: skip
})


class StepsError(ValueError):
    """Bad arguments, or a measurement that cannot go on; the message says what to change."""


def shape_dims(name: str) -> dict[str, Any]:
    s = SHAPES[name]
    return {"name": name, "reference": s.name, "layers": s.layers, "hidden": s.hidden, "heads": s.heads,
            "kv_heads": s.kv_heads, "head_dim": s.head_dim, "intermediate": s.intermediate, "vocab": s.vocab,
            "params": param_count(s)}  # fmt: skip


# -- configuration and grid --------------------------------------------------------------------------------------

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class StepsConfig:
    """One measurement: a shape on a device over a prefill grid and a decode grid."""

    shape: str
    out: Path
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    layers: int | None = None  # build and time this many layers, scale to the shape's count (None: all)
    prefill_tokens: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192)
    prefill_cached: tuple[int, ...] = (0, 2048)
    decode_batch: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    decode_context: tuple[int, ...] = (128, 1024, 4096, 8192)
    decode_steps: int = 16
    repeats: int = 5
    warmup: int = 2
    max_memory_gib: float | None = None  # KV cache + activations per point; None: 90% of free GPU memory / 4 GiB
    hardware: str = ""  # label; default: the GPU's name
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (CPU runs; None: torch's default)

    def validate(self) -> None:
        problems = []
        if self.shape not in SHAPES:
            problems.append(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            problems.append(f"dtype: expected auto|{'|'.join(_DTYPES)}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"device: expected auto|cpu|cuda|cuda:N, got {self.device!r}")
        grids = {"prefill tokens": self.prefill_tokens, "decode batch": self.decode_batch,
                 "decode context": self.decode_context}  # fmt: skip
        for noun, grid in grids.items():
            if not grid:
                problems.append(f"{noun}: the grid is empty (the fit needs prefill and decode points)")
            elif any(v <= 0 for v in grid):
                problems.append(f"{noun}: sizes must be positive, got {list(grid)}")
        if not self.prefill_cached or any(v < 0 for v in self.prefill_cached):
            problems.append(f"prefill cached: expected cached-prefix lengths >= 0 (0: none), got "
                            f"{list(self.prefill_cached)}")  # fmt: skip
        if self.decode_steps < MIN_DECODE_STEPS:
            problems.append(f"decode steps: need at least {MIN_DECODE_STEPS} (the fit's minimum stream length), "
                            f"got {self.decode_steps}")  # fmt: skip
        if self.repeats < 1:
            problems.append(f"repeats: must be >= 1, got {self.repeats}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads: must be >= 1, got {self.threads}")
        if self.warmup < 0:
            problems.append(f"warmup: must be >= 0, got {self.warmup}")
        if self.max_memory_gib is not None and not self.max_memory_gib > 0:
            problems.append(f"max memory: must be > 0 GiB, got {self.max_memory_gib}")
        if self.shape in SHAPES and self.layers is not None:
            total = SHAPES[self.shape].layers
            if not 1 <= self.layers <= total:
                problems.append(f"layers: expected 1..{total} for {self.shape}, got {self.layers}")
        if problems:
            raise StepsError("; ".join(problems))

    @property
    def model_shape(self) -> ModelShape:
        return SHAPES[self.shape]

    @property
    def layers_measured(self) -> int:
        return self.layers or self.model_shape.layers

    @property
    def layer_scale(self) -> float:
        return self.model_shape.layers / self.layers_measured

    def parameters(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("out")
        d.pop("hardware")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class StepPoint:
    kind: str  # prefill | decode
    new: int  # prefill: new tokens; decode: 1 per sequence
    cached: int  # prefill: cached-prefix tokens; decode: context tokens per sequence at the first step
    batch: int = 1

    @property
    def point_id(self) -> str:  # the names `kvscale profile run` gives the same points
        if self.kind == "decode":
            return f"decode-c{self.batch}-ctx{self.cached}"
        if self.cached == 0:
            return f"prefill-isl{self.new}"
        return f"prefix-isl{self.cached + self.new}-cached{self.cached}"

    @property
    def sweep(self) -> str:
        return self.kind if self.kind == "decode" or self.cached == 0 else "prefix"

    def capacity(self, decode_steps: int) -> int:
        """KV-cache slots per sequence the point needs."""
        return self.cached + (decode_steps + 1 if self.kind == "decode" else self.new)


def build_grid(cfg: StepsConfig) -> list[StepPoint]:
    """Prefill points (cheapest first), then decode points; duplicates removed."""
    new, cached = sorted(set(cfg.prefill_tokens)), sorted(set(cfg.prefill_cached))
    batches, contexts = sorted(set(cfg.decode_batch)), sorted(set(cfg.decode_context))
    prefill = [StepPoint("prefill", n, c) for c in cached for n in new]
    decode = [StepPoint("decode", 1, ctx, b) for ctx in contexts for b in batches]
    return prefill + decode


def memory_estimate(cfg: StepsConfig, p: StepPoint, elsize: int, cpu: bool) -> int:
    """Bytes a point needs beyond the weights: its KV cache (measured layers) and one layer's peak activations."""
    s = cfg.model_shape
    kv = 2 * cfg.layers_measured * p.batch * s.kv_heads * p.capacity(cfg.decode_steps) * s.head_dim * elsize
    tokens = p.batch * p.new
    act = tokens * ((s.heads + 2 * s.kv_heads) * s.head_dim + 4 * s.hidden + 3 * s.intermediate) * elsize
    if p.kind == "prefill" and p.cached:  # KV heads repeated for the cached-prefix attention
        act += 2 * (p.cached + p.new) * s.heads * s.head_dim * elsize
    if cpu:  # CPU SDPA may materialise the scores (and a mask)
        act += s.heads * p.new * (p.cached + p.new) * 5 * p.batch
    act += p.batch * s.vocab * 4  # logits of the last tokens
    return kv + act


# -- measuring ---------------------------------------------------------------------------------------------------


@dataclass
class PointTiming:
    point: StepPoint
    rows: list[dict[str, Any]]
    stats: dict[str, Any]


@dataclass
class StepsSummary:
    measured: list[PointTiming] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already on disk
    dropped: list[str] = field(default_factory=list)  # over the memory budget, or out of memory
    wall_s: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)


class StepsRunner:
    """Builds the decoder on the device and measures the grid into ``cfg.out`` (resumable: points on disk stay)."""

    def __init__(self, cfg: StepsConfig, on_progress: Callable[[int, int, str], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:  # fmt: skip
        cfg.validate()
        self.cfg = cfg
        self.on_progress = on_progress or (lambda *_: None)
        self.clock = clock

    def _device(self) -> tuple[torch.device, torch.dtype]:
        import torch

        want = self.cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise StepsError(f"device {self.cfg.device!r}: CUDA is not available to this torch "
                             f"({torch.__version__}, built for CUDA {torch.version.cuda})")  # fmt: skip
        try:
            device = torch.device(want)
        except RuntimeError as e:
            raise StepsError(f"device {self.cfg.device!r}: {e}") from e
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type == "cuda" and device.index >= torch.cuda.device_count():
            raise StepsError(f"device {self.cfg.device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
        name = self.cfg.dtype if self.cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        return device, getattr(torch, _DTYPES[name])

    def _measurement(self, device: torch.device, dtype: torch.dtype, timer: Timer) -> dict[str, Any]:
        import torch

        cfg = self.cfg
        cuda = device.type == "cuda"
        gpu = torch.cuda.get_device_name(device) if cuda else ""
        return {
            "note": NOTE,
            "device": str(device),
            "gpu_name": gpu,
            "cpu": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version() if cuda else None,
            "dtype": str(dtype).removeprefix("torch."),
            "timer": timer.name,
            "shape": shape_dims(cfg.shape),
            "layers_measured": cfg.layers_measured,
            "layers_total": cfg.model_shape.layers,
            "layer_scale": cfg.layer_scale,
            "layer_scaling": (
                f"built and timed {cfg.layers_measured} of {cfg.model_shape.layers} layers; layer time scaled by "
                f"{cfg.layer_scale:g} (embedding and LM head timed once, unscaled)"
                if cfg.layer_scale != 1 else "all layers built and timed"
            ),
            "attention": "torch.nn.functional.scaled_dot_product_attention: prefill causal "
            + ("(enable_gqa)" if sdpa_gqa_native() else "(KV heads repeated)")
            + "; cached-prefix prefill with KV heads repeated and a bottom-right causal mask; decode with the "
            "query heads of each KV group as query rows over a contiguous per-sequence KV cache",
            "sdpa_backends_enabled": {
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            } if cuda else None,
            "decode_rows": "one row per repeat: ttft_s = first decode step, itl_s = the following steps",
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
        }

    def _kv_cache_estimate(self, device: torch.device, elsize: int) -> dict[str, Any]:
        """vLLM's KV capacity for the full model on this GPU (so the simulator gets a realistic cache size)."""
        import torch

        s = self.cfg.model_shape
        props = torch.cuda.get_device_properties(device)
        shape = dataclasses.replace(s, params=float(param_count(s)), dtype_bytes=elsize)
        try:
            kv = kv_capacity(shape, Gpu(props.name, 0.0, 0.0, float(props.total_memory)), 1)
        except ValueError:
            return {"block_size": BLOCK_SIZE, "num_gpu_blocks": 0, "gpu_memory_bytes": props.total_memory}
        return {**kv, "source": "estimate: predictor.roofline.kv_capacity at this GPU's total memory"}

    def run(self) -> StepsSummary:
        import torch

        from predictor.dataset import measured_points, read_manifest, write_manifest

        cfg = self.cfg
        t0 = self.clock()
        device, dtype = self._device()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # events and synchronize() act on the current device
        timer = Timer(device, self.clock)
        elsize = torch.empty((), dtype=dtype).element_size()
        measurement = self._measurement(device, dtype, timer)
        if device.type == "cuda":
            hardware = cfg.hardware or f"1x {measurement['gpu_name']}"
        else:
            hardware = cfg.hardware or f"CPU {measurement['cpu']} (torch threads: {measurement['cpu_threads']})"
        manifest: dict[str, Any] = {
            "engine": "pytorch-sdpa (random weights)",
            "engine_version": f"torch {torch.__version__}",
            "model": cfg.shape,
            "hardware": hardware,
            "endpoints": [f"torch:{device}"],
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (py3.10 boxes)
            "kvscale_version": __version__,
            "client_host": platform.node(),
            "note": NOTE,
            **{k: measurement[k] for k in ("gpu_name", "torch_version", "cuda_version", "dtype", "shape",
                                           "layers_measured", "layer_scaling")},  # fmt: skip
            "measurement": measurement,
            # `kvscale profile fit` copies `parameters` into the artifact: keep what was measured there too.
            "parameters": {**cfg.parameters(), "measurement": measurement},
        }
        if device.type == "cuda":
            manifest["kv_cache"] = self._kv_cache_estimate(device, elsize)
        if (cfg.out / "manifest.json").is_file():
            old = read_manifest(cfg.out)
            keys = ("model", "gpu_name", "torch_version", "dtype", "layers_measured")
            diff = {k: (old.get(k), manifest[k]) for k in keys if old.get(k) != manifest[k]}
            if diff:
                raise StepsError(f"{cfg.out} holds another measurement ({', '.join(f'{k}: {a!r} here, {b!r} now' for k, (a, b) in diff.items())}); use another --out")  # noqa: E501
            manifest["created"] = old.get("created", manifest["created"])
            manifest["resumed"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017
        write_manifest(cfg.out, manifest)

        summary = StepsSummary(manifest=manifest)
        done = measured_points(cfg.out)
        grid = build_grid(cfg)
        summary.skipped = [p.point_id for p in grid if p.point_id in done]
        todo = [p for p in grid if p.point_id not in done]
        with torch.inference_mode():
            decoder = Decoder.random(cfg.model_shape, cfg.layers_measured, device, dtype, cfg.seed)
            budget = self._budget(device)
            feasible = []
            for p in todo:
                need = memory_estimate(cfg, p, elsize, device.type == "cpu")
                if need > budget:
                    summary.dropped.append(
                        f"{p.point_id}: needs ~{need / 2**30:.1f} GiB (KV cache of {cfg.layers_measured} layers + "
                        f"activations) > budget {budget / 2**30:.1f} GiB (--max-memory-gib, or fewer --layers)"
                    )
                else:
                    feasible.append(p)
            self.on_progress(0, len(feasible), "")
            for i, p in enumerate(feasible):
                try:
                    res = self._measure(decoder, p, device, dtype, timer)
                except (torch.cuda.OutOfMemoryError, MemoryError) as e:
                    summary.dropped.append(f"{p.point_id}: out of memory ({str(e).splitlines()[0][:160]})")
                    _free(device)
                else:
                    self._write(res, device)
                    summary.measured.append(res)
                self.on_progress(i + 1, len(feasible), p.point_id)
        summary.wall_s = self.clock() - t0
        return summary

    def _budget(self, device: torch.device) -> float:
        import torch

        if self.cfg.max_memory_gib is not None:
            return self.cfg.max_memory_gib * 2**30
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return 0.9 * free
        return CPU_DEFAULT_MEMORY_GIB * 2**30

    def _measure(self, dec: Decoder, p: StepPoint, device: torch.device, dtype: torch.dtype,
                 timer: Timer) -> PointTiming:  # fmt: skip
        import torch

        cfg, s = self.cfg, self.cfg.model_shape
        cap = p.capacity(cfg.decode_steps)
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        caches = []
        for _ in dec.layers:
            kv = torch.empty((2, p.batch, s.kv_heads, cap, s.head_dim), device=device, dtype=dtype)
            kv.normal_(0.0, 1.0, generator=gen)
            caches.append((kv[0], kv[1]))
        cos, sin = dec.rope_table(cap, device, dtype)
        ids = torch.randint(0, s.vocab, (p.batch, p.new), device=device, generator=gen)
        scale = cfg.layer_scale
        parts: list[tuple[float, float, float]] = []
        walls: list[float] = []
        rows: list[dict[str, Any]] = []
        t_point = self.clock()

        def one(start: int) -> float:
            w0 = self.clock()
            e, layers, head = dec.step(ids, start, caches, cos, sin, timer)
            walls.append(self.clock() - w0)
            parts.append((e, layers, head))
            return e + layers * scale + head

        from predictor.dataset import request_row

        common = dict(sweep=p.sweep, point_id=p.point_id, endpoint=f"torch:{device}", ok=True, status=200)
        if p.kind == "prefill":
            for _ in range(cfg.warmup):
                one(p.cached)
            parts.clear()
            walls.clear()
            for _ in range(cfg.repeats):
                start_s = self.clock() - t_point
                t = one(p.cached)
                rows.append(request_row(**common, isl_target=p.cached + p.new, osl_target=1, concurrency=1,
                                        cached_target=p.cached, start_s=start_s, ttft_s=t, e2e_s=t,
                                        prompt_tokens=p.cached + p.new, completion_tokens=1,
                                        cached_tokens=p.cached))  # fmt: skip
            steps = [r["ttft_s"] for r in rows]
        else:
            for _ in range(cfg.warmup):
                one(p.cached)
            parts.clear()
            walls.clear()
            steps = []
            for _ in range(cfg.repeats):
                start_s = self.clock() - t_point
                stream = [one(p.cached + k) for k in range(cfg.decode_steps)]
                steps.extend(stream[1:])
                rows.append(request_row(**common, isl_target=p.cached, osl_target=cfg.decode_steps,
                                        concurrency=p.batch, start_s=start_s, ttft_s=stream[0], e2e_s=sum(stream),
                                        itl_s=stream[1:], prompt_tokens=p.cached,
                                        completion_tokens=cfg.decode_steps))  # fmt: skip
        caches.clear()
        _free(device)
        med = statistics.median
        stats = {
            "step_median_s": med(steps),
            "step_min_s": min(steps),
            "step_max_s": max(steps),
            "embed_median_s": med(x[0] for x in parts),
            "layers_measured_median_s": med(x[1] for x in parts),
            "head_median_s": med(x[2] for x in parts),
            "layer_scale": scale,
            "host_wall_median_s": med(walls),
            "timed_steps": len(parts),
            "kv_cache_bytes": 2 * len(dec.layers) * p.batch * s.kv_heads * cap * s.head_dim
            * torch.empty((), dtype=dtype).element_size(),
            "timer": timer.name,
        }
        return PointTiming(p, rows, stats)

    def _write(self, res: PointTiming, device: torch.device) -> None:
        from predictor.dataset import write_point

        write_point(self.cfg.out, res.point.point_id, res.rows, [], res.stats)


def _free(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()

"""Roofline-arithmetic default latency models (``kind: "estimate"``) until measured profiles replace them.

Each coefficient of the ``linear-v1`` step-time form (see ``kvscale.latency``) is derived from the model's
shape, the GPU's datasheet peaks and a few stated efficiency assumptions:

* ``base_s``: every step streams all weights from HBM once, plus a fixed scheduler/launch overhead (and, with
  tensor parallelism, the latency of the per-layer all-reduces);
* ``per_prefill_token_s``: each new token costs ``2 * params`` GEMM FLOPs (plus, with tensor parallelism, its
  share of all-reduce traffic);
* ``per_prefill_attn_s``: each (query token, key token) pair costs ``4 * layers * heads * head_dim`` FLOPs
  (``QK^T`` and ``PV``); the latency model multiplies it by ``sum(n * (c + n / 2))``;
* ``per_decode_seq_s``: the GEMM compute of one decoded token (decode is memory-bound at small batch, where
  ``base_s`` dominates; this term is what grows with the batch);
* ``per_decode_ctx_s``: the KV-cache bytes read per context token per step;
* ``kv_transfer``: KV bytes per token over an assumed inter-node bandwidth, plus a fixed setup cost.

Every input and intermediate number is written into the artifact's ``derivation`` object so that a reader can
check the arithmetic. ``python -m predictor.roofline`` (re)writes ``kvscale/models/<preset>.json``;
``--check`` only verifies that the files on disk match what this module derives now.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kvscale.latency import LatencyModel, StepCoefficients

MODELS_DIR = Path(str(resources.files("kvscale.models")))
GIB = 2**30

NOTES = (
    "Estimate from roofline arithmetic (datasheet peaks x assumed efficiencies), not a measurement. "
    "Every input and intermediate number is in 'derivation'. Replace with a measured/fitted profile "
    "(kind 'measured' or 'fitted') for the real deployment before trusting absolute latencies."
)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The transformer dimensions that the roofline arithmetic needs."""

    name: str  # Hugging Face id
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    params: float
    dtype_bytes: int = 2  # bf16

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V, every layer, every KV head: ``2 * layers * kv_heads * head_dim * dtype_bytes``."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def gemm_flops_per_token(self) -> float:
        """Each token multiplies by every parameter once (a multiply and an add): ``2 * params``."""
        return 2 * self.params

    @property
    def attn_flops_per_pair(self) -> float:
        """FLOPs per (query, key) pair: ``QK^T`` and ``PV`` are ``2 * head_dim`` each, per head per layer."""
        return 4 * self.layers * self.heads * self.head_dim


@dataclass(frozen=True, slots=True)
class Gpu:
    """Datasheet numbers of one accelerator."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: float  # what the runtime reports as total (torch.cuda.mem_get_info), not the marketing size


@dataclass(frozen=True, slots=True)
class Assumptions:
    """Efficiencies and overheads that turn datasheet peaks into estimates. All stated in the artifact."""

    eff_gemm: float = 0.6  # fraction of peak FLOP/s reached by the GEMMs
    eff_attn: float = 0.4  # fraction of peak FLOP/s reached by attention kernels
    eff_hbm: float = 0.8  # fraction of HBM bandwidth reached when streaming weights / KV cache
    step_overhead_s: float = 2e-3  # scheduler, input preparation, kernel launches, sampling, per step
    allreduces_per_layer: int = 2  # tensor parallelism: after attention and after the MLP
    allreduce_latency_s: float = (
        10e-6  # fixed latency of one small all-reduce (NVLink, vLLM custom all-reduce)
    )
    allreduce_bytes_per_s: float = 300e9  # effective per-GPU NVLink bandwidth for the all-reduce traffic
    kv_transfer_bytes_per_s: float = 50e9  # effective inter-node bandwidth for P/D KV transfer (RDMA/NIXL)
    kv_transfer_base_s: float = 1e-3  # fixed per-transfer setup cost
    gpu_memory_utilization: float = 0.9  # vLLM --gpu-memory-utilization
    # vLLM's memory profile of Llama-3-8B on one H100 (vllm-project/vllm#10511, worker.py's log): 1.79 GiB outside
    # PyTorch (CUDA context, NCCL; 3.58 GiB at TP 2) and a 1.26 GiB activation peak. Assumed for other shapes.
    non_torch_bytes: float = 1.79 * GIB
    non_torch_bytes_tp: float = 3.58 * GIB  # tensor parallel > 1 (NCCL buffers)
    activation_peak_bytes: float = 1.26 * GIB
    block_size: int = 16  # tokens per KV-cache block


@dataclass(frozen=True, slots=True)
class Preset:
    """One shipped default model: a model shape on a GPU type with a tensor-parallel degree."""

    name: str  # file stem in kvscale/models
    model: ModelShape
    gpu: Gpu
    tensor_parallel: int
    hardware: str
    assumptions: Assumptions = field(default_factory=Assumptions)
    # The largest end-to-end error against published measurements of this shape on this GPU (vLLM rows of
    # LLM-Inference-Bench, checked by tests/unit/test_public_models.py); None where nothing is published.
    claimed_e2e_error: float | None = None


# total memory: H100 79.22 GiB as vLLM logs it (vllm-project/vllm#10511); the others are the runtime's usual
# report for that board (assumed: the tables we fit from do not print it).
H100_SXM = Gpu(name="NVIDIA H100 SXM 80GB", peak_flops=989e12, hbm_bytes_per_s=3.35e12, memory_bytes=79.22 * GIB)
A100_40GB = Gpu(name="NVIDIA A100 SXM4 40GB", peak_flops=312e12, hbm_bytes_per_s=1.555e12, memory_bytes=39.39 * GIB)
GH200 = Gpu(name="NVIDIA GH200 96GB (H100 96GB HBM3)", peak_flops=989e12, hbm_bytes_per_s=4.0e12,
            memory_bytes=94.5 * GIB)
MI300X = Gpu(name="AMD Instinct MI300X 192GB", peak_flops=1307e12, hbm_bytes_per_s=5.3e12, memory_bytes=191.7 * GIB)
MI250_GCD = Gpu(name="AMD Instinct MI250 (one GCD, 64GB)", peak_flops=181e12, hbm_bytes_per_s=1.6e12,
                memory_bytes=63.98 * GIB)

LLAMA_3_1_8B = ModelShape(
    name="meta-llama/Llama-3.1-8B-Instruct",
    layers=32,
    hidden=4096,
    heads=32,
    kv_heads=8,
    head_dim=128,
    intermediate=14336,
    vocab=128256,
    params=8.03e9,
)
LLAMA_3_1_70B = ModelShape(
    name="meta-llama/Llama-3.1-70B-Instruct",
    layers=80,
    hidden=8192,
    heads=64,
    kv_heads=8,
    head_dim=128,
    intermediate=28672,
    vocab=128256,
    params=70.6e9,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="llama-3.1-8b-h100",
            model=LLAMA_3_1_8B,
            gpu=H100_SXM,
            tensor_parallel=1,
            hardware="1x NVIDIA H100 SXM 80GB (assumed)",
            claimed_e2e_error=0.12,  # measured: -11.0 % .. +3.7 % on the 20 Llama-3-8B rows
        ),
        Preset(
            name="llama-3.1-70b-h100-tp4",
            model=LLAMA_3_1_70B,
            gpu=H100_SXM,
            tensor_parallel=4,
            hardware="4x NVIDIA H100 SXM 80GB, NVLink, tensor-parallel 4 (assumed)",
            # More layers and a broadcast of the scheduler output to 4 workers: a larger fixed step overhead.
            assumptions=Assumptions(step_overhead_s=3e-3),
            claimed_e2e_error=0.20,  # measured: -18.7 % .. -5.9 % on the 20 Llama-3-70B rows (optimistic)
        ),
    )
}


def _r(x: float) -> float:
    """Round to 6 significant digits so the JSON stays readable (and exactly reproducible)."""
    return float(f"{x:.6g}")


class _Steps:
    """Records each intermediate as ``{"formula", "value"}`` in derivation order and returns its value."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, formula: str, value: float) -> float:
        value = _r(value)
        self.items[name] = {"formula": formula, "value": value}
        return value


def derive(preset: Preset) -> LatencyModel:
    """Derive the ``linear-v1`` coefficients of ``preset``, with the arithmetic recorded in ``extra``."""
    m, g, a, tp = preset.model, preset.gpu, preset.assumptions, preset.tensor_parallel
    if tp < 1 or m.heads % tp or m.kv_heads % tp:
        raise ValueError(
            f"tensor_parallel={tp} must be >= 1 and divide heads={m.heads} and kv_heads={m.kv_heads}"
        )
    s = _Steps()

    flops_gemm = s("effective_flops_gemm", "tp * peak_flops * eff_gemm", tp * g.peak_flops * a.eff_gemm)
    flops_attn = s("effective_flops_attn", "tp * peak_flops * eff_attn", tp * g.peak_flops * a.eff_attn)
    hbm = s("effective_hbm_bytes_per_s", "tp * hbm_bytes_per_s * eff_hbm", tp * g.hbm_bytes_per_s * a.eff_hbm)
    weight_bytes = s("weight_bytes", "params * dtype_bytes", m.weight_bytes)
    weight_read_s = s("weight_read_s", "weight_bytes / effective_hbm_bytes_per_s", weight_bytes / hbm)

    # Tensor parallelism: each layer all-reduces its attention and MLP outputs (hidden * dtype_bytes a token).
    n_ar = s(
        "allreduces_per_step",
        "layers * allreduces_per_layer if tp > 1 else 0",
        m.layers * a.allreduces_per_layer if tp > 1 else 0,
    )
    ar_step_s = s(
        "allreduce_latency_per_step_s",
        "allreduces_per_step * allreduce_latency_s",
        n_ar * a.allreduce_latency_s,
    )
    ar_bytes = s(
        "allreduce_bytes_per_token_per_gpu",
        "allreduces_per_step * hidden * dtype_bytes * 2 * (tp - 1) / tp   (ring all-reduce)",
        n_ar * m.hidden * m.dtype_bytes * 2 * (tp - 1) / tp,
    )
    ar_token_s = s(
        "allreduce_s_per_token",
        "allreduce_bytes_per_token_per_gpu / allreduce_bytes_per_s",
        ar_bytes / a.allreduce_bytes_per_s,
    )

    gemm_flops = s("gemm_flops_per_token", "2 * params", m.gemm_flops_per_token)
    gemm_s = s("gemm_s_per_token", "gemm_flops_per_token / effective_flops_gemm", gemm_flops / flops_gemm)
    attn_flops = s("attn_flops_per_pair", "4 * layers * heads * head_dim", m.attn_flops_per_pair)
    kv_bytes = s("kv_bytes_per_token", "2 * layers * kv_heads * head_dim * dtype_bytes", m.kv_bytes_per_token)

    coeffs = StepCoefficients(
        base_s=s(
            "base_s",
            "weight_read_s + step_overhead_s + allreduce_latency_per_step_s",
            weight_read_s + a.step_overhead_s + ar_step_s,
        ),
        per_prefill_token_s=s(
            "per_prefill_token_s", "gemm_s_per_token + allreduce_s_per_token", gemm_s + ar_token_s
        ),
        per_prefill_attn_s=s(
            "per_prefill_attn_s", "attn_flops_per_pair / effective_flops_attn", attn_flops / flops_attn
        ),
        per_decode_seq_s=s(
            "per_decode_seq_s", "gemm_s_per_token + allreduce_s_per_token", gemm_s + ar_token_s
        ),
        per_decode_ctx_s=s(
            "per_decode_ctx_s", "kv_bytes_per_token / effective_hbm_bytes_per_s", kv_bytes / hbm
        ),
    )
    kv_per_token_s = s(
        "kv_transfer_per_token_s",
        "kv_bytes_per_token / kv_transfer_bytes_per_s",
        kv_bytes / a.kv_transfer_bytes_per_s,
    )

    derivation = {
        "method": "roofline",
        "model_shape": asdict(m),
        "gpu": {**asdict(g), "count": tp},
        "tensor_parallel": tp,
        "assumptions": asdict(a),
        "steps": s.items,
        **({"validation": {
            "e2e_max_ape": preset.claimed_e2e_error,
            "against": "LLM-Inference-Bench vLLM offline rows of the same architecture on this GPU "
            "(data/public-gpu; tests/unit/test_public_models.py)",
        }} if preset.claimed_e2e_error is not None else {}),
        "caveats": [
            "The linear form adds memory time and compute time; a true roofline takes their max, so mixed "
            "steps are slightly pessimistic.",
            "2 * params counts the input embedding (a lookup) and the LM head (computed only for the last "
            "prefill token) as GEMM work: prefill per-token cost is overestimated by roughly "
            f"{100 * 2 * m.vocab * m.hidden / m.params:.2g}% (embedding + LM head share of params).",
            "intermediate and vocab are recorded for reference; params already accounts for them.",
        ],
    }
    return LatencyModel(
        name=preset.name,
        coefficients=coeffs,
        kv_transfer_base_s=a.kv_transfer_base_s,
        kv_transfer_per_token_s=kv_per_token_s,
        kind="estimate",
        hardware=preset.hardware,
        model=m.name,
        engine="vllm (roofline estimate)",
        notes=NOTES,
        extra={"derivation": derivation, "kv_cache": kv_cache_estimate(preset)},
    )


def kv_cache_estimate(preset: Preset) -> dict[str, Any]:
    """vLLM's ``num_gpu_blocks`` for ``preset`` (see ``kv_capacity``)."""
    return kv_capacity(preset.model, preset.gpu, preset.tensor_parallel, preset.assumptions)


def kv_capacity(m: ModelShape, g: Gpu, tp: int, a: Assumptions | None = None) -> dict[str, Any]:
    """Estimate vLLM's ``num_gpu_blocks`` as its memory profiler computes it (``worker.py``'s log, vLLM >= 0.6.5):
    ``total memory x gpu_memory_utilization - weights - memory outside PyTorch - activation peak``, over the bytes
    of one block.

    With tensor parallelism every GPU holds ``1/tp`` of the weights and of each block (its KV heads), so the
    per-GPU arithmetic gives the block count of the whole deployment. For Llama-3-8B on one H100 this gives
    vLLM's logged 53.29 GiB of KV cache (the figure a test checks).
    """
    a = a or Assumptions()
    s = _Steps()
    budget = s(
        "usable_bytes_per_gpu",
        "gpu_memory_bytes * gpu_memory_utilization",
        g.memory_bytes * a.gpu_memory_utilization,
    )
    weights = s("weight_bytes_per_gpu", "params * dtype_bytes / tp", m.weight_bytes / tp)
    non_torch = a.non_torch_bytes_tp if tp > 1 else a.non_torch_bytes
    free = s(
        "kv_cache_bytes_per_gpu",
        "usable_bytes_per_gpu - weight_bytes_per_gpu - non_torch_bytes - activation_peak_bytes",
        budget - weights - non_torch - a.activation_peak_bytes,
    )
    per_block = s(
        "kv_bytes_per_block_per_gpu",
        "block_size * kv_bytes_per_token / tp",
        a.block_size * m.kv_bytes_per_token / tp,
    )
    if free <= 0:
        raise ValueError(f"{m.name}: the weights do not fit in {g.memory_bytes:.3g} B x {tp} GPU(s)")
    blocks = int(free // per_block)
    return {
        "block_size": a.block_size,
        "gpu_memory_utilization": a.gpu_memory_utilization,
        "gpu_memory_bytes": g.memory_bytes,
        "non_torch_bytes": non_torch,
        "activation_peak_bytes": a.activation_peak_bytes,
        "assumption": "total memory as the runtime reports it; non-PyTorch memory and activation peak as vLLM "
        "measured them for Llama-3-8B on H100 (vllm-project/vllm#10511), assumed for other shapes and GPUs",
        "steps": s.items,
        "num_gpu_blocks": blocks,
        "num_gpu_blocks_formula": "floor(kv_cache_bytes_per_gpu / kv_bytes_per_block_per_gpu)",
        "max_cached_tokens": blocks * a.block_size,
    }


def render(preset: Preset) -> str:
    """The JSON text of ``preset``'s artifact, exactly as written to ``kvscale/models``."""
    return derive(preset).dumps()


def write_models(out_dir: Path = MODELS_DIR, names: Sequence[str] | None = None) -> list[Path]:
    """(Re)write ``<out_dir>/<name>.json`` for the named presets (all by default); returns the paths."""
    paths = []
    for name in names or sorted(PRESETS):
        path = Path(out_dir) / f"{name}.json"
        path.write_text(render(PRESETS[name]))
        paths.append(path)
    return paths


def stale_models(out_dir: Path = MODELS_DIR) -> list[str]:
    """Names of presets whose file in ``out_dir`` is missing or differs from what ``derive`` gives now."""
    stale = []
    for name, preset in sorted(PRESETS.items()):
        path = Path(out_dir) / f"{name}.json"
        try:
            on_disk = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            stale.append(name)
            continue
        if on_disk != json.loads(render(preset)):
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the roofline models (default) or, with ``--check``, fail if the files on disk are stale."""
    ap = argparse.ArgumentParser(
        prog="python -m predictor.roofline", description=(__doc__ or "").split("\n", 1)[0]
    )
    ap.add_argument("--out-dir", type=Path, default=MODELS_DIR, help="directory of the JSON files")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if a file is missing or stale")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_models(args.out_dir)
        if stale:
            print(
                f"stale roofline models in {args.out_dir}: {stale}; run python -m predictor.roofline",
                file=sys.stderr,
            )
            return 1
        print(f"roofline models in {args.out_dir} are up to date")
        return 0
    for path in write_models(args.out_dir):
        model = derive(PRESETS[path.stem])
        print(
            f"wrote {path}: prefill(1000) = {1e3 * model.prefill_time(1000):.1f} ms, "
            f"decode step (64 x 1000 ctx) = {1e3 * model.decode_step_time(64, 64_000):.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

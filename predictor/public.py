"""``kvscale profile import --format llm-inference-bench``: step-time models fitted to public GPU measurements.

LLM-Inference-Bench (argonne-lcf/LLM-Inference-Bench, BSD-3-Clause; Chitty-Venkata et al., SC'24 workshops)
publishes offline runs: for each (hardware, count, framework, model), input length = output length = ``L`` and
batch ``B``, the end-to-end seconds of the whole batch; a second table gives the time to first token of a few
batches. With the engine's offline schedule written out (``predictor.offline``) each row is one linear equation
in the ``linear-v1`` coefficients, fitted per group by non-negative least squares on relative error, as
``kvscale profile fit`` does.

What the rows can and cannot tell apart, and what the fit does about it:

* ``base_s`` (one per step), the ``B·L`` terms and the ``B·L²`` terms are identified: ``L`` and ``B`` vary.
* ``per_prefill_token_s`` and ``per_decode_seq_s`` both multiply ``≈B·L`` in an end-to-end row: only their sum is
  identified. A TTFT row (prefill only) separates them; a group without one ties them (one GEMM cost per token,
  as the roofline does) and says so in ``fit.pinned``.
* ``per_prefill_attn_s`` is ~1 % of any row here (decode's KV reads dominate the ``B·L²`` term): it is pinned to
  the roofline value of the GPU (attention FLOPs per pair over 40 % of peak) and recorded as pinned.
* Rows whose batch needs more KV cache than the hardware holds (``B·(L_in + L_out)`` tokens against the
  ``predictor.roofline.kv_capacity`` estimate) are excluded: vLLM preempts and recomputes there, which no step
  model describes. Each exclusion is listed with its reason.

Validation is k-fold over whole rows (each row held out from the fit that predicts it). A group whose held-out
MAPE exceeds ``max_mape``, that has too few rows, or whose model or hardware kvscale has no entry for, is refused
with the reason, and nothing is written for it.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import KFold

from kvscale import __version__
from kvscale.latency import COEFFICIENTS, LatencyModel, StepCoefficients
from predictor.fit import fit_relative
from predictor.offline import max_batched_tokens, offline_features
from predictor.roofline import (
    A100_40GB,
    GH200,
    H100_SXM,
    LLAMA_3_1_8B,
    LLAMA_3_1_70B,
    MI250_GCD,
    MI300X,
    Assumptions,
    Gpu,
    ModelShape,
    kv_capacity,
)

SOURCE = "argonne-lcf/LLM-Inference-Bench"
SOURCE_FILES = {"e2e": "Plots/All_results.csv", "ttft": "Plots/Fig_22/all_results_TTFT_ITL.csv"}
SOURCE_COMMIT = "4211f5d"
E2E_COLUMNS = ("Hardware", "Num of Hardware", "Framework", "Model", "Input Output Length", "Batch Size", "Latency",
               "Throughput")  # fmt: skip
TTFT_COLUMNS = ("Hardware", "Num of Hardware", "Framework", "Model", "Input Length", "Output Length", "Batch Size",
                "TTFT Latency", "end_latency")  # fmt: skip
DEFAULT_MAX_MAPE = 0.10
MIN_ROWS = 8
FOLDS = 5
ATTN_EFFICIENCY = Assumptions().eff_attn


@dataclass(frozen=True)
class Architecture:
    shape: ModelShape
    max_model_len: int  # the model config's max_position_embeddings: sets vLLM's default max_num_batched_tokens
    moe: bool = False


def _shape(name: str, layers: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int,
           params: float) -> ModelShape:  # fmt: skip
    return ModelShape(name=name, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                      head_dim=hidden // heads, intermediate=inter, vocab=vocab, params=params)  # fmt: skip


# Hugging Face config.json of each model the tables name (layers, hidden, heads, KV heads, MLP, vocab, params).
ARCHITECTURES: dict[str, Architecture] = {
    # Llama 3 and 3.1 share their shapes; 3.1's longer context does not change these offline runs.
    "meta-llama/Meta-Llama-3-8B": Architecture(replace(LLAMA_3_1_8B, name="meta-llama/Meta-Llama-3-8B"), 8192),
    "meta-llama/Meta-Llama-3-70B": Architecture(replace(LLAMA_3_1_70B, name="meta-llama/Meta-Llama-3-70B"), 8192),
    "meta-llama/Llama-2-7b-hf": Architecture(_shape("meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008, 32000,
                                                    6.74e9), 4096),
    "meta-llama/Llama-2-70b-hf": Architecture(_shape("meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 28672, 32000,
                                                     68.98e9), 4096),
    "mistralai/Mistral-7B-v0.1": Architecture(_shape("mistralai/Mistral-7B-v0.1", 32, 4096, 32, 8, 14336, 32000,
                                                     7.24e9), 32768),
    "Qwen/Qwen2-7B": Architecture(_shape("Qwen/Qwen2-7B", 28, 3584, 28, 4, 18944, 152064, 7.62e9), 32768),
    "Qwen/Qwen2-72B": Architecture(_shape("Qwen/Qwen2-72B", 80, 8192, 64, 8, 29568, 152064, 72.7e9), 32768),
    "mistralai/Mixtral-8x7B-v0.1": Architecture(_shape("mistralai/Mixtral-8x7B-v0.1", 32, 4096, 32, 8, 14336,
                                                       32000, 46.7e9), 32768, moe=True),
}  # fmt: skip
HARDWARE: dict[str, tuple[Gpu, str]] = {
    "Nvidia H100 GPU": (H100_SXM, "h100"),  # the table does not say SXM or PCIe
    "Nvidia A100 GPU": (A100_40GB, "a100-40gb"),  # ALCF Polaris: A100 SXM4 40GB
    "Nvidia GH200 GPU": (GH200, "gh200"),
    "AMD MI300X GPU": (MI300X, "mi300x"),
    "AMD MI250 GPU": (MI250_GCD, "mi250"),
}


class PublicImportError(ValueError):
    """A table cannot be read; the message names file, line and field."""


@dataclass(frozen=True)
class Row:
    file: str
    line: int
    kind: str  # "e2e" | "ttft"
    hardware: str
    count: int
    framework: str
    model: str
    input_len: int
    output_len: int
    batch: int
    latency_s: float  # e2e: the whole batch; ttft: the batch's prefill phase

    @property
    def group(self) -> tuple[str, int, str, str]:
        return self.hardware, self.count, self.framework, self.model

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _field(raw: dict[str, str], name: str, path: Path, line: int, kind: type) -> Any:
    text = (raw.get(name) or "").strip()
    try:
        value = kind(text)
    except ValueError:
        raise PublicImportError(f"{path}:{line}: field {name!r}: expected a {kind.__name__}, got {text!r}") from None
    if (isinstance(value, float) and not math.isfinite(value)) or value <= 0:
        raise PublicImportError(f"{path}:{line}: field {name!r}: expected a positive number, got {text!r}")
    return value


def read_table(path: Path) -> list[Row]:
    """Rows of an LLM-Inference-Bench results table (the end-to-end or the TTFT one, told apart by the header)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise PublicImportError(f"{path}: cannot read: {e.strerror}") from e
    lines = text.splitlines()
    if not lines:
        raise PublicImportError(f"{path}:1: empty file")
    header = [h.strip() for h in next(csv.reader([lines[0]]))]
    if tuple(header) == E2E_COLUMNS:
        kind = "e2e"
    elif tuple(header) == TTFT_COLUMNS:
        kind = "ttft"
    else:
        raise PublicImportError(f"{path}:1: unknown column set {header}; expected {list(E2E_COLUMNS)} (All_results"
                                f".csv) or {list(TTFT_COLUMNS)} (all_results_TTFT_ITL.csv)")  # fmt: skip
    rows = []
    for line, values in enumerate(csv.reader(lines[1:]), start=2):
        if not any(v.strip() for v in values):
            continue  # the TTFT table separates its groups with blank lines
        raw = dict(zip(header, values, strict=False))
        for name in ("Hardware", "Framework", "Model"):
            if not (raw.get(name) or "").strip():
                raise PublicImportError(f"{path}:{line}: field {name!r}: empty")
        if kind == "e2e":
            length = _field(raw, "Input Output Length", path, line, int)
            inp, out, latency = length, length, _field(raw, "Latency", path, line, float)
        else:
            inp = _field(raw, "Input Length", path, line, int)
            out, latency = 1, _field(raw, "TTFT Latency", path, line, float)
        rows.append(Row(file=path.name, line=line, kind=kind, hardware=raw["Hardware"].strip(),
                        count=_field(raw, "Num of Hardware", path, line, int), framework=raw["Framework"].strip(),
                        model=raw["Model"].strip(), input_len=inp, output_len=out,
                        batch=_field(raw, "Batch Size", path, line, int), latency_s=latency))  # fmt: skip
    if not rows:
        raise PublicImportError(f"{path}: no data rows")
    return rows


@dataclass
class GroupResult:
    """One (hardware, count, framework, model) group: its fitted model or why it was refused."""

    hardware: str
    count: int
    framework: str
    model: str
    name: str
    rows: int = 0
    used: int = 0
    ttft_rows: int = 0
    excluded: list[dict[str, Any]] = field(default_factory=list)
    refused: str = ""
    heldout_mape: float = math.nan
    heldout_p90: float = math.nan
    ttft_ape: float = math.nan
    latency_model: LatencyModel | None = None
    worst: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"hardware": self.hardware, "count": self.count, "framework": self.framework, "model": self.model,
                "name": self.name, "rows": self.rows, "used": self.used, "ttft_rows": self.ttft_rows,
                "excluded": self.excluded, "refused": self.refused or None,
                "heldout_e2e_mape": _num(self.heldout_mape), "heldout_e2e_p90_ape": _num(self.heldout_p90),
                "ttft_ape": _num(self.ttft_ape), "worst_rows": self.worst}  # fmt: skip


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 5)


def artifact_name(model: str, hardware_slug: str, count: int, framework: str) -> str:
    base = re.sub(r"[^a-z0-9.]+", "-", model.split("/")[-1].lower()).strip("-").removeprefix("meta-")
    tp = f"-tp{count}" if count > 1 else ""
    return f"{base}-{hardware_slug}{tp}-{re.sub(r'[^a-z0-9]+', '', framework.lower())}-public"


class _Design:
    """Columns of the fit: which coefficients are free, which tied or pinned (see the module docstring)."""

    def __init__(self, separate_prefill: bool, attn_s: float) -> None:
        self.attn_s = attn_s
        # free parameters -> coefficient index lists they multiply
        cols = [[0], [1], [3], [4]] if separate_prefill else [[0], [1, 3], [4]]
        self.t = np.zeros((len(COEFFICIENTS), len(cols)))
        for j, idx in enumerate(cols):
            self.t[idx, j] = 1.0

    def fit(self, f: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Coefficients (``COEFFICIENTS`` order) from feature rows ``f`` and latencies ``y``."""
        theta = fit_relative(f @ self.t, y - f[:, 2] * self.attn_s)
        coef = self.t @ theta
        coef[2] = self.attn_s
        return coef


def _features(row: Row, arch: Architecture) -> np.ndarray:
    f = offline_features(row.batch, row.input_len, row.output_len, max_batched_tokens(arch.max_model_len))
    return f.prefill if row.kind == "ttft" else f.total


def _ape(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(pred - y) / y


def fit_group(rows: list[Row], *, max_mape: float = DEFAULT_MAX_MAPE, folds: int = FOLDS,
              source: dict[str, Any] | None = None) -> GroupResult:  # fmt: skip
    """Fit one group's rows (all of one ``Row.group``); a refusal says why in ``GroupResult.refused``."""
    hardware, count, framework, model = rows[0].group
    hw = HARDWARE.get(hardware)
    name = artifact_name(model, hw[1] if hw else "unknown", count, framework)
    res = GroupResult(hardware, count, framework, model, name=name, rows=len(rows))
    arch = ARCHITECTURES.get(model)
    if framework != "vLLM":
        res.refused = f"framework {framework!r}: only vLLM's offline schedule is written out"
    elif arch is None:
        res.refused = f"no architecture entry for {model!r} (known: {sorted(ARCHITECTURES)})"
    elif arch.moe:
        res.refused = "mixture-of-experts: per-token cost depends on expert routing, not the dense linear-v1 form"
    elif hw is None:
        res.refused = f"no datasheet entry for {hardware!r} (known: {sorted(HARDWARE)})"
    elif arch.shape.heads % count or arch.shape.kv_heads % count:
        res.refused = f"tensor parallel {count} does not divide the heads of {model}"
    if res.refused:
        return res
    assert arch is not None and hw is not None
    gpu = hw[0]
    try:
        kv = kv_capacity(arch.shape, gpu, count)
    except ValueError as e:
        res.refused = f"KV cache: {e}"
        return res
    capacity = kv["max_cached_tokens"]
    keep: list[Row] = []
    for r in rows:
        need = r.batch * (r.input_len + r.output_len)
        if need > capacity:
            res.excluded.append({"row": r.where(), "reason": f"needs {need} KV tokens > ~{capacity} the GPU holds: "
                                 "vLLM preempts and recomputes"})  # fmt: skip
        else:
            keep.append(r)
    e2e = [r for r in keep if r.kind == "e2e"]
    ttft = [r for r in keep if r.kind == "ttft"]
    res.used, res.ttft_rows = len(e2e), len(ttft)
    lengths, batches = {r.input_len for r in e2e}, {r.batch for r in e2e}
    if len(e2e) < MIN_ROWS or len(lengths) < 3 or len(batches) < 2:
        res.refused = (f"{len(e2e)} usable end-to-end rows ({len(lengths)} lengths x {len(batches)} batch sizes); "
                       f"need {MIN_ROWS}+ rows, 3+ lengths, 2+ batch sizes")  # fmt: skip
        return res
    attn_s = arch.shape.attn_flops_per_pair / (count * gpu.peak_flops * ATTN_EFFICIENCY)
    design = _Design(bool(ttft), attn_s)
    fe = np.array([_features(r, arch) for r in e2e])
    ye = np.array([r.latency_s for r in e2e])
    ft = np.array([_features(r, arch) for r in ttft]).reshape(len(ttft), len(COEFFICIENTS))
    yt = np.array([r.latency_s for r in ttft])
    pred = np.full(len(e2e), np.nan)
    kf = KFold(n_splits=min(folds, len(e2e)), shuffle=True, random_state=0)
    for train, test in kf.split(fe):
        coef = design.fit(np.vstack([fe[train], ft]), np.concatenate([ye[train], yt]))
        pred[test] = fe[test] @ coef
    ape = _ape(pred, ye)
    res.heldout_mape, res.heldout_p90 = float(ape.mean()), float(np.percentile(ape, 90))
    order = np.argsort(-ape)[:3]
    res.worst = [{"row": e2e[i].where(), "L": e2e[i].input_len, "B": e2e[i].batch, "measured_s": float(ye[i]),
                  "heldout_predicted_s": round(float(pred[i]), 4), "ape": round(float(ape[i]), 4)}
                 for i in order]  # fmt: skip
    coef = design.fit(np.vstack([fe, ft]), np.concatenate([ye, yt]))
    ttft_info: dict[str, Any] = {"n": len(ttft)}
    if ttft:
        res.ttft_ape = float(_ape(ft @ coef, yt).mean())
        # held out: the same group fitted without its TTFT rows (prefill and decode GEMM cost tied)
        tied = _Design(False, attn_s).fit(fe, ye)
        ttft_info |= {"in_sample_ape": round(res.ttft_ape, 5),
                      "heldout_ape_tied": round(float(_ape(ft @ tied, yt).mean()), 5)}  # fmt: skip
    if res.heldout_mape > max_mape:
        res.refused = (f"held-out end-to-end MAPE {res.heldout_mape:.1%} > {max_mape:.0%}: the step model does not "
                       f"explain these rows (worst: {', '.join(w['row'] for w in res.worst)})")  # fmt: skip
        return res
    c = dict(zip(COEFFICIENTS, (float(f"{x:.6g}") for x in coef), strict=True))
    kv_token_bytes = arch.shape.kv_bytes_per_token
    res.latency_model = LatencyModel(
        name=res.name,
        coefficients=StepCoefficients(**c),
        kv_transfer_base_s=Assumptions().kv_transfer_base_s,
        kv_transfer_per_token_s=float(f"{kv_token_bytes / Assumptions().kv_transfer_bytes_per_s:.6g}"),
        kind="fitted-public",
        hardware=f"{count}x {gpu.name}" + (f", tensor-parallel {count}" if count > 1 else "")
        + f" (the table says {hardware!r})",
        model=model,
        engine="vLLM (version not stated by the source; mid-2024 benchmark_latency runs)",
        notes=(f"Fitted by kvscale {__version__} to {len(e2e)} end-to-end rows"
               + (f" and {len(ttft)} TTFT row(s)" if ttft else "")
               + f" of LLM-Inference-Bench ({SOURCE}@{SOURCE_COMMIT}); held-out end-to-end MAPE "
               f"{res.heldout_mape:.1%}. Offline batches only: no measurement of online serving."),  # fmt: skip
        extra={
            "kv_cache": kv,
            "fit": {
                "date": dt.datetime.now(dt.UTC).date().isoformat(),
                "kvscale_version": __version__,
                "method": "non-negative least squares on relative error over vLLM's offline schedule "
                "(predictor.offline)",
                "source": source or {"repository": SOURCE, "commit": SOURCE_COMMIT, "files": SOURCE_FILES},
                "group": {"hardware": hardware, "count": count, "framework": framework, "model": model},
                "rows_used": [r.where() for r in e2e + ttft],
                "rows_excluded": res.excluded,
                "schedule": {"max_num_batched_tokens": max_batched_tokens(arch.max_model_len),
                             "max_num_seqs": 256, "chunked_prefill": False},  # fmt: skip
                "pinned": {"per_prefill_attn_s": "roofline: attention FLOPs per pair / (tp x peak x "
                           f"{ATTN_EFFICIENCY}); ~1% of any row",
                           **({} if ttft else {"per_prefill_token_s": "tied to per_decode_seq_s: no TTFT row "
                                               "separates them"})},  # fmt: skip
                "kv_transfer": "not measured: roofline estimate (KV bytes per token over 50 GB/s + 1 ms)",
                "range": {"input_len": [min(lengths), max(lengths)], "output_len": [min(lengths), max(lengths)],
                          "batch": [min(batches), max(batches)]},  # fmt: skip
                "validation": {"method": f"{kf.get_n_splits()}-fold over whole rows (shuffled, seed 0)",
                               "e2e": {"mape": round(res.heldout_mape, 5), "p90_ape": round(res.heldout_p90, 5),
                                       "max_ape": round(float(ape.max()), 5), "n": len(e2e)},
                               "ttft": ttft_info, "worst_rows": res.worst},  # fmt: skip
            },
        },
    )
    return res


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fit_tables(paths: list[Path], *, frameworks: set[str] | None = None, models: set[str] | None = None,
               max_mape: float = DEFAULT_MAX_MAPE) -> list[GroupResult]:  # fmt: skip
    """Read every table (all parsed before anything is fitted) and fit each group."""
    rows = [r for p in paths for r in read_table(p)]
    source = {"repository": SOURCE, "commit": SOURCE_COMMIT, "files": SOURCE_FILES,
              "read": {p.name: sha256(p) for p in paths}}  # fmt: skip
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        if (frameworks is None or r.framework in frameworks) and (models is None or r.model in models):
            groups[r.group].append(r)
    # a TTFT row of a group with no end-to-end rows cannot be fitted alone
    return [fit_group(g, max_mape=max_mape, source=source) for _, g in sorted(groups.items())
            if any(r.kind == "e2e" for r in g)]  # fmt: skip

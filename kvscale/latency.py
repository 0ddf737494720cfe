"""Step-time latency model: how long one engine step takes, given what is in the batch.

One engine step (one forward pass of vLLM's continuous-batching loop) processes

* prefill chunks: for chunk i, ``n_i`` new prompt tokens whose attention spans ``c_i`` tokens already in the
  cache plus the chunk itself;
* decode sequences: ``D`` sequences each producing one token, with total context ``C`` tokens.

The model is linear in physics-shaped features (the form the profiler fits, issue "Profiler and predictor")::

    step_s = base_s
           + per_prefill_token_s * sum(n_i)                       # GEMMs: FLOPs ~ 2 * params per token
           + per_prefill_attn_s  * sum(n_i * (c_i + n_i / 2))      # causal attention over the context
           + per_decode_seq_s    * D                              # per-sequence GEMM/sampling cost
           + per_decode_ctx_s    * C                              # reading the KV cache of every sequence

plus, for prefill/decode disaggregation, ``kv_transfer_s(tokens) = kv_transfer_base_s + per_token_s * tokens``.

The artifact is JSON (it is mounted from ConfigMaps; never pickle). ``load_latency_model`` validates every field
and names the one that is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA = "kvscale.latency-model"
SCHEMA_VERSION = 1
STEP_FORM = "linear-v1"
# estimate: roofline arithmetic; measured/fitted: a profile of the deployment (`kvscale profile run/fit`);
# fitted-public: fitted to published measurements of the hardware (`kvscale profile import --format ...`)
KINDS = ("estimate", "measured", "fitted", "fitted-public")
COEFFICIENTS = ("base_s", "per_prefill_token_s", "per_prefill_attn_s", "per_decode_seq_s", "per_decode_ctx_s")


class LatencyModelError(ValueError):
    """A latency-model artifact is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class StepCoefficients:
    base_s: float
    per_prefill_token_s: float
    per_prefill_attn_s: float
    per_decode_seq_s: float
    per_decode_ctx_s: float


@dataclass(frozen=True)
class LatencyModel:
    """A step-time model plus the metadata saying what it describes and how good it is."""

    name: str
    coefficients: StepCoefficients
    kv_transfer_base_s: float = 0.0
    kv_transfer_per_token_s: float = 0.0
    kind: str = "estimate"  # estimate | measured | fitted | fitted-public (see KINDS)
    hardware: str = ""
    model: str = ""
    engine: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # derivation, fit range, validation, dates, ...

    def step_time(self, prefill_tokens: int, prefill_attn: float, decode_seqs: int, decode_ctx: int) -> float:
        """Seconds for one step. ``prefill_attn`` is ``sum(n_i * (c_i + n_i / 2))`` over the prefill chunks."""
        c = self.coefficients
        if prefill_tokens == 0 and decode_seqs == 0:
            return 0.0
        return (
            c.base_s
            + c.per_prefill_token_s * prefill_tokens
            + c.per_prefill_attn_s * prefill_attn
            + c.per_decode_seq_s * decode_seqs
            + c.per_decode_ctx_s * decode_ctx
        )

    def prefill_time(self, tokens: int, cached: int = 0) -> float:
        """One request prefilled alone in one step (``tokens`` new tokens after ``cached`` cached ones)."""
        return self.step_time(tokens, prefill_attn_term(tokens, cached), 0, 0)

    def decode_step_time(self, batch: int, total_ctx: int) -> float:
        return self.step_time(0, 0.0, batch, total_ctx)

    def num_gpu_blocks(self, default: int = 32768) -> int:
        """KV-cache size in blocks that the artifact estimates for its hardware (``kv_cache.num_gpu_blocks``)."""
        kv = self.extra.get("kv_cache")
        return int(kv.get("num_gpu_blocks", default)) if isinstance(kv, dict) else default

    def block_size(self, default: int = 16) -> int:
        """KV-cache block size (tokens) the artifact's ``kv_cache`` section states."""
        kv = self.extra.get("kv_cache")
        return int(kv.get("block_size", default)) if isinstance(kv, dict) else default

    def _fit_number(self, key: str) -> float:
        fit = self.extra.get("fit")
        return float(fit.get(key, 0.0)) if isinstance(fit, dict) else 0.0

    @property
    def ttft_overhead_s(self) -> float:
        """Per-request time that the engine's own TTFT (vLLM's ``time_to_first_token`` histogram, counted from the
        API server's ``arrival_time``) includes outside the engine step: input processing, the hand-over to the
        engine core, output processing. From a fitted artifact's ``fit.ttft_overhead_s``; 0 where there is none."""
        return self._fit_number("ttft_overhead_s")

    @property
    def client_overhead_s(self) -> float:
        """What a client's TTFT adds on top of the engine's TTFT (HTTP, request parsing before ``arrival_time``,
        streaming the first chunk back): ``fit.client_overhead_s``; 0 where there is none."""
        return self._fit_number("client_overhead_s")

    @property
    def request_overhead_s(self) -> float:
        """Everything a client's TTFT includes beyond engine steps and queueing: ``client_overhead_s`` plus
        ``ttft_overhead_s``. Drivers delay each request's admission to the engine by this much, so TTFT includes it
        and the engine keeps stepping other requests meanwhile (``simulator/server.py``, ``simulator/cluster.py``).
        """
        return self.client_overhead_s + self.ttft_overhead_s

    def kv_transfer_time(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        return self.kv_transfer_base_s + self.kv_transfer_per_token_s * tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "name": self.name,
            "kind": self.kind,
            "hardware": self.hardware,
            "model": self.model,
            "engine": self.engine,
            "notes": self.notes,
            "step_time": {"form": STEP_FORM, "coefficients": asdict(self.coefficients)},
            "kv_transfer": {"base_s": self.kv_transfer_base_s, "per_token_s": self.kv_transfer_per_token_s},
            **self.extra,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"


def prefill_attn_term(new_tokens: int, context_before: int) -> float:
    """Attention work of a prefill chunk: each new token attends to the cached context and half the chunk."""
    return new_tokens * (context_before + new_tokens / 2.0)


def _number(d: dict[str, Any], key: str, where: str, *, default: float | None = None) -> float:
    if key not in d:
        if default is not None:
            return default
        raise LatencyModelError(f"{where}.{key}: missing")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise LatencyModelError(f"{where}.{key}: expected a finite number, got {v!r}")
    if v < 0:
        raise LatencyModelError(f"{where}.{key}: must be >= 0, got {v!r}")
    return float(v)


def _str(d: dict[str, Any], key: str) -> str:
    v = d.get(key, "")
    if not isinstance(v, str):
        raise LatencyModelError(f"{key}: expected a string, got {type(v).__name__}")
    return v


def latency_model_from_dict(d: Any) -> LatencyModel:
    if not isinstance(d, dict):
        raise LatencyModelError("latency model: expected a JSON object at the top level")
    if d.get("schema") != SCHEMA:
        raise LatencyModelError(f"schema: expected {SCHEMA!r}, got {d.get('schema')!r}")
    version = d.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise LatencyModelError(f"version: expected an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise LatencyModelError(
            f"version: artifact is version {version}, this kvscale reads up to {SCHEMA_VERSION}; upgrade kvscale"
        )
    st = d.get("step_time")
    if not isinstance(st, dict):
        raise LatencyModelError("step_time: missing or not an object")
    if st.get("form") != STEP_FORM:
        raise LatencyModelError(f"step_time.form: expected {STEP_FORM!r}, got {st.get('form')!r}")
    coeffs = st.get("coefficients")
    if not isinstance(coeffs, dict):
        raise LatencyModelError("step_time.coefficients: missing or not an object")
    unknown = set(coeffs) - set(COEFFICIENTS)
    if unknown:
        raise LatencyModelError(f"step_time.coefficients: unknown field(s) {sorted(unknown)}")
    c = StepCoefficients(**{k: _number(coeffs, k, "step_time.coefficients") for k in COEFFICIENTS})
    kv = d.get("kv_transfer", {})
    if not isinstance(kv, dict):
        raise LatencyModelError("kv_transfer: expected an object")
    kind = _str(d, "kind") or "estimate"
    if kind not in KINDS:
        raise LatencyModelError(f"kind: expected {'|'.join(KINDS)}, got {kind!r}")
    known = {"schema", "version", "name", "kind", "hardware", "model", "engine", "notes", "step_time", "kv_transfer"}
    model = LatencyModel(
        name=_str(d, "name") or "unnamed",
        coefficients=c,
        kv_transfer_base_s=_number(kv, "base_s", "kv_transfer", default=0.0),
        kv_transfer_per_token_s=_number(kv, "per_token_s", "kv_transfer", default=0.0),
        kind=kind,
        hardware=_str(d, "hardware"),
        model=_str(d, "model"),
        engine=_str(d, "engine"),
        notes=_str(d, "notes"),
        extra={k: v for k, v in d.items() if k not in known},
    )
    _validate_fit_section(model)
    return model


def _validate_fit_section(model: LatencyModel) -> None:
    """Check the ``fit`` block of a fitted artifact (field-naming errors), on top of the step-time checks."""
    fit = model.extra.get("fit")
    for key in ("ttft_overhead_s", "client_overhead_s"):
        if isinstance(fit, dict) and key in fit:
            _number(fit, key, "fit")
    if model.kind == "fitted-public":
        _validate_public_fit(fit)
        return
    if model.kind != "fitted":
        return
    if not isinstance(fit, dict):
        raise LatencyModelError("fit: a fitted model needs a 'fit' object")
    for key in ("range", "validation"):
        if not isinstance(fit.get(key), dict):
            raise LatencyModelError(f"fit.{key}: missing or not an object")
    for kind in ("ttft", "itl"):
        v = fit["validation"].get(kind)
        if not isinstance(v, dict):
            raise LatencyModelError(f"fit.validation.{kind}: missing or not an object")
        for k in ("mape", "p90_ape"):
            x = v.get(k)
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0:
                raise LatencyModelError(f"fit.validation.{kind}.{k}: expected a number >= 0, got {x!r}")
    for k, v in fit["range"].items():
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(t, int | float) for t in v) and v[0] <= v[1]):
            raise LatencyModelError(f"fit.range.{k}: expected [low, high], got {v!r}")


def _error_block(v: Any, where: str, keys: tuple[str, ...] = ("mape", "p90_ape")) -> None:
    if not isinstance(v, dict):
        raise LatencyModelError(f"{where}: missing or not an object")
    for k in keys:
        x = v.get(k)
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0:
            raise LatencyModelError(f"{where}.{k}: expected a number >= 0, got {x!r}")


def _validate_public_fit(fit: Any) -> None:
    """A ``fitted-public`` model names its source and the held-out error of its end-to-end rows."""
    if not isinstance(fit, dict):
        raise LatencyModelError("fit: a fitted-public model needs a 'fit' object")
    src = fit.get("source")
    if not isinstance(src, dict) or not src.get("repository") or not src.get("commit"):
        raise LatencyModelError("fit.source: a fitted-public model names its source repository and commit")
    if not isinstance(fit.get("rows_used"), list) or not fit["rows_used"]:
        raise LatencyModelError("fit.rows_used: expected the non-empty list of rows the fit used")
    validation = fit.get("validation")
    _error_block(validation, "fit.validation", ())
    _error_block(validation.get("e2e"), "fit.validation.e2e", ("mape", "p90_ape", "max_ape"))


def builtin_models() -> list[str]:
    """Names of the latency models shipped in ``kvscale/models``."""
    files = resources.files("kvscale.models")
    return sorted(p.name.removesuffix(".json") for p in files.iterdir() if p.name.endswith(".json"))


def load_latency_model(spec: str | Path) -> LatencyModel:
    """Load a latency model from a JSON file path or a built-in name (see ``builtin_models``)."""
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        try:
            text = path.read_text()
        except OSError as e:
            raise LatencyModelError(f"latency model {str(spec)!r}: cannot read file: {e.strerror}") from e
    else:
        res = resources.files("kvscale.models").joinpath(f"{spec}.json")
        if not res.is_file():
            raise LatencyModelError(
                f"latency model {str(spec)!r}: no such file or built-in model (built-ins: {builtin_models()})"
            )
        text = res.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LatencyModelError(f"latency model {str(spec)!r}: invalid JSON: {e}") from e
    return latency_model_from_dict(data)


DEFAULT_MODEL = "llama-3.1-8b-h100"

"""``kvscale profile fit``: physics-shaped step-time models from a profile, with held-out validation.

Observations (one row each):

* **prefill** (prefill and prefix sweeps), one per grid point: the median TTFT of lone requests with
  ``max_tokens=1`` is one prefill step plus the API server's fixed per-request cost (HTTP, tokenization,
  scheduling): ``ttft = overhead + base + a·n + b·n·(c + n/2)`` with ``n`` new and ``c`` cached prompt tokens.
* **decode** (decode sweep), one per grid point: ``B`` streams started together with context ``L`` and the same
  OSL decode as one batch; the median per-token time after the first token, ``(e2e - ttft) / (tokens - 1)``, is
  one decode step at the mean context: ``itl = base + s·B + k·B·(L + OSL/2)``. Per-stream means rather than
  per-chunk gaps, because a busy server may coalesce several tokens into one SSE chunk.

Where the profile has them, engine-side figures replace the client's (HTTP and a busy client add noise, and a
busy box delivers SSE chunks in bursts): the median of the engine's per-request TTFTs for prefill rows, the median
over rounds of the engine's mean ITL in each round's steady window (every stream decoding, none prefilling or done;
see ``predictor.profiler.steady_decode_window``) at the window's measured context for decode rows. Medians per point
make the fit robust to single stalls on a shared machine.

One non-negative least-squares fit (scikit-learn ``LinearRegression(positive=True)``) over both kinds, weighted
by 1/y² so that it minimises *relative* error (what MAPE measures). Validation is grouped k-fold: whole grid
points are held out, so the error is the one you get predicting a point the profile did not measure.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import GroupKFold

from kvscale import __version__
from kvscale.latency import LatencyModel, StepCoefficients, prefill_attn_term
from predictor.dataset import read_engine, read_manifest, read_point_stats, read_requests

FEATURES = ("ttft_overhead_s", "base_s", "per_prefill_token_s", "per_prefill_attn_s", "per_decode_seq_s",
            "per_decode_ctx_s")  # fmt: skip
MIN_PREFILL_ISLS = 3
MIN_DECODE_BATCHES = 2
MIN_DECODE_CONTEXTS = 2


class FitError(ValueError):
    """The profile cannot support a fit; the message says which points are missing."""


@dataclass
class Observations:
    kind: np.ndarray  # "prefill" | "decode"
    x: np.ndarray  # (n, len(FEATURES)) design matrix
    y: np.ndarray  # seconds
    group: np.ndarray  # point ids (for grouped k-fold)
    meta: pd.DataFrame  # isl, cached, batch, context per row (for plots and ranges)


def _prefill_requests(df: pd.DataFrame) -> pd.DataFrame:
    p = df[df.sweep.isin(["prefill", "prefix"]) & df.ok & ~df.warmup & df.ttft_s.notna()].copy()
    p["new"] = (p.prompt_tokens - p.cached_tokens).clip(lower=1)
    return p


def _engine_side(out: pd.DataFrame, stats: pd.DataFrame | None, column: str, target: str) -> pd.DataFrame:
    """Prefer the engine's own per-point mean (histogram delta) over the client's view where it exists."""
    if "source" not in out:
        out["source"] = "client"
    if stats is None or stats.empty or column not in stats:
        return out
    eng = stats.set_index("point_id")[column]
    have = out.point_id.map(eng)
    ok = have.notna() & (have > 0) & (out.source == "client")
    out.loc[ok, target] = have[ok]
    out.loc[ok, "source"] = "engine"
    return out


def _per_point_lists(stats: pd.DataFrame | None, column: str) -> dict[str, list]:
    """``point_id -> list`` for a list-valued point-stats column (absent in profiles from older kvscale)."""
    if stats is None or stats.empty or column not in stats:
        return {}
    return {pid: v for pid, v in zip(stats.point_id, stats[column], strict=True) if isinstance(v, list) and v}


def _prefill_rows(df: pd.DataFrame, stats: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per prefill/prefix point: TTFT (median of the engine's per-request TTFTs, else the engine's mean,
    else the client's median), median new and cached tokens."""
    p = _prefill_requests(df)
    g = p.groupby("point_id")
    out = pd.DataFrame({
        "ttft_s": g.ttft_s.median(), "new": g.new.median(), "cached_tokens": g.cached_tokens.median(),
        "prompt_tokens": g.prompt_tokens.median(), "n": g.size(),
    }).reset_index()  # fmt: skip
    out["client_ttft_s"] = out.ttft_s
    out["source"] = "client"
    per_request = _per_point_lists(stats, "engine_ttft_s")
    for i, pid in enumerate(out.point_id):
        if len(v := per_request.get(pid, [])) * 2 >= out.n.iat[i]:  # most requests have their own engine TTFT
            out.loc[i, ["ttft_s", "source"]] = [float(np.median(v)), "engine-median"]
    return _engine_side(out, stats, "engine_ttft_mean_s", "ttft_s")


def decode_tpot(df: pd.DataFrame) -> pd.Series:
    """Per-request mean time per output token after the first (NaN for streams shorter than 2 tokens)."""
    return (df.e2e_s - df.ttft_s) / (df.completion_tokens - 1).where(df.completion_tokens > 1)


def _decode_rows(df: pd.DataFrame, stats: pd.DataFrame | None = None) -> pd.DataFrame:
    d = df[(df.sweep == "decode") & df.ok & ~df.warmup].copy()
    d["tpot"] = decode_tpot(d)
    d = d[d.tpot.notna()]
    g = d.groupby("point_id")
    out = pd.DataFrame({
        "batch": g.concurrency.first(), "isl": g.prompt_tokens.mean(), "osl": g.completion_tokens.mean(),
        "itl_s": g.tpot.median(), "n": g.size(),
    }).reset_index()  # fmt: skip
    out["context"] = out.batch * (out.isl + out.osl / 2.0)
    out["source"] = "client"
    steady = _per_point_lists(stats, "engine_steady_decode")
    for i, pid in enumerate(out.point_id):
        if ws := [w for w in steady.get(pid, []) if w.get("itl_mean_s", 0) > 0]:
            # median over rounds: one round hit by a scheduling stall of the shared machine does not move it
            out.loc[i, ["itl_s", "context", "source"]] = [float(np.median([w["itl_mean_s"] for w in ws])),
                                                          float(np.mean([w["context_tokens"] for w in ws])),
                                                          "engine-steady"]  # fmt: skip
    return _engine_side(out, stats, "engine_itl_mean_s", "itl_s")


def check_coverage(df: pd.DataFrame) -> None:
    """Refuse a degenerate profile with a message naming what to measure."""
    problems = []
    p = _prefill_requests(df)
    isls = sorted(p.new.round(-1).unique().tolist()) if len(p) else []
    if len(isls) < MIN_PREFILL_ISLS:
        problems.append(
            f"prefill sweep: {len(isls)} distinct prompt lengths measured ({isls}); need at least "
            f"{MIN_PREFILL_ISLS} (run `kvscale profile run --sweeps prefill --prefill-isl 128,512,2048 ...`)"
        )
    d = df[(df.sweep == "decode") & df.ok & ~df.warmup]
    batches = sorted(d.concurrency.unique().tolist())
    contexts = sorted(d.isl_target.unique().tolist())
    if len(batches) < MIN_DECODE_BATCHES or len(contexts) < MIN_DECODE_CONTEXTS:
        problems.append(
            f"decode sweep: batches {batches} x contexts {contexts}; need at least {MIN_DECODE_BATCHES} batch sizes "
            f"and {MIN_DECODE_CONTEXTS} contexts (run `kvscale profile run --sweeps decode --decode-concurrency "
            f"1,8,32 --decode-context 128,2048 ...`)"
        )
    elif (d.completion_tokens < 8).all():
        problems.append("decode sweep: streams are shorter than 8 tokens; use --decode-osl 32 or more")
    failed = df[~df.ok & ~df.warmup]
    if len(df) and len(failed) / len(df) > 0.5:
        problems.append(f"{len(failed)}/{len(df)} requests failed; re-run the profile")
    if problems:
        raise FitError("cannot fit this profile:\n  - " + "\n  - ".join(problems))


def observations(df: pd.DataFrame, stats: pd.DataFrame | None = None) -> Observations:
    """Fit rows from a profile's requests and, where the engine exported them, its per-point histogram means."""
    check_coverage(df)
    p = _prefill_rows(df, stats)
    d = _decode_rows(df, stats)
    xp = np.zeros((len(p), len(FEATURES)))
    xp[:, 0] = 1.0
    xp[:, 1] = 1.0
    xp[:, 2] = p.new.to_numpy(float)
    xp[:, 3] = [prefill_attn_term(float(n), float(c)) for n, c in zip(p.new, p.cached_tokens, strict=True)]
    xd = np.zeros((len(d), len(FEATURES)))
    xd[:, 1] = 1.0
    xd[:, 4] = d.batch.to_numpy(float)
    xd[:, 5] = d.context.to_numpy(float)
    meta = pd.concat(
        [
            pd.DataFrame({"kind": "prefill", "isl": p.prompt_tokens.to_numpy(), "cached": p.cached_tokens.to_numpy(),
                          "batch": 1, "context": p.prompt_tokens.to_numpy(float), "source": p.source,
                          "point_id": p.point_id, "y": p.ttft_s, "client_y": p.client_ttft_s}),  # fmt: skip
            pd.DataFrame({"kind": "decode", "isl": d.isl.to_numpy(), "cached": 0, "batch": d.batch.to_numpy(),
                          "context": d.context.to_numpy(), "source": d.source, "point_id": d.point_id,
                          "y": d.itl_s}),  # fmt: skip
        ],
        ignore_index=True,
    )
    return Observations(
        kind=np.array(["prefill"] * len(p) + ["decode"] * len(d)),
        x=np.vstack([xp, xd]),
        y=np.concatenate([p.ttft_s.to_numpy(float), d.itl_s.to_numpy(float)]),
        group=np.concatenate([p.point_id.to_numpy(str), d.point_id.to_numpy(str)]),
        meta=meta,
    )


def fit_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares minimising relative error (weights 1/y²); the coefficients of ``x``'s columns."""
    # Scale columns to comparable magnitudes (tokens² vs 1), fit with positivity, unscale.
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    reg = LinearRegression(positive=True, fit_intercept=False)
    reg.fit(x / scale, y, sample_weight=1.0 / np.maximum(y, 1e-6) ** 2)
    return reg.coef_ / scale


def _errors(obs: Observations, pred: np.ndarray) -> dict[str, dict[str, float]]:
    """MAPE, p90 absolute percentage error and count, for the TTFT (prefill) and ITL (decode) rows."""
    out = {}
    for kind, name in (("prefill", "ttft"), ("decode", "itl")):
        m = obs.kind == kind
        ape = np.abs(pred[m] - obs.y[m]) / np.maximum(obs.y[m], 1e-9)
        out[name] = {"mape": float(ape.mean()), "p90_ape": float(np.percentile(ape, 90)), "n": int(m.sum())}
    return out


def cross_validate(obs: Observations, folds: int = 5) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """Grouped k-fold: held-out grid points; returns errors for TTFT and ITL rows and the held-out predictions."""
    groups = np.unique(obs.group)
    k = min(folds, len(groups))
    if k < 2:
        raise FitError(f"need at least 2 measured points for validation, have {len(groups)}")
    pred = np.full(obs.y.shape, np.nan)
    for train, test in GroupKFold(n_splits=k).split(obs.x, obs.y, obs.group):
        coef = fit_relative(obs.x[train], obs.y[train])
        pred[test] = obs.x[test] @ coef
    return _errors(obs, pred), pred


def fit_profile(root: Path, *, name: str | None = None, folds: int = 5) -> tuple[LatencyModel, Observations]:
    """Fit the step-time model to the profile in ``root``; the artifact carries range, provenance and CV errors."""
    manifest = read_manifest(root)
    df = read_requests(root)
    if df.empty:
        raise FitError(f"{root}: the profile has no measured points yet (run `kvscale profile run`)")
    obs = observations(df, read_point_stats(root))
    validation, _ = cross_validate(obs, folds)
    coef = fit_relative(obs.x, obs.y)
    full = _errors(obs, obs.x @ coef)
    c = dict(zip(FEATURES, coef.tolist(), strict=True))
    meta = obs.meta
    pm, dm = meta[meta.kind == "prefill"], meta[meta.kind == "decode"]
    engine = read_engine(root)
    # Clients see more than the engine's TTFT (HTTP, parsing before vLLM's arrival_time, sending the first chunk):
    # the median gap between the client's and the engine's per-point TTFT, where both exist.
    eng = pm.source.str.startswith("engine")
    client_overhead = max(0.0, float(np.median((pm.client_y - pm.y)[eng]))) if eng.any() else 0.0
    fit_range = {
        "prefill_new_tokens": [int(pm.isl.sub(pm.cached).min()), int(pm.isl.sub(pm.cached).max())],
        "prefill_cached_tokens": [int(pm.cached.min()), int(pm.cached.max())],
        "decode_batch": [int(dm.batch.min()), int(dm.batch.max())],
        "decode_context_tokens": [float(dm.context.min()), float(dm.context.max())],
    }
    model = LatencyModel(
        name=name or f"{manifest.get('model', 'model')}-fitted",
        coefficients=StepCoefficients(**{k: c[k] for k in FEATURES[1:]}),
        kind="fitted",
        hardware=str(manifest.get("hardware", "")),
        model=str(manifest.get("model", "")),
        engine=f"{manifest.get('engine', '')} {manifest.get('engine_version', '')}".strip(),
        notes=(
            f"Fitted by kvscale {__version__} from {len(df)} requests ({len(np.unique(obs.group))} grid points). "
            "TTFT = ttft_overhead_s + one prefill step (engine side; clients see client_overhead_s more); "
            "ITL = one decode step."
            + (f" Measured: {manifest['note']}." if manifest.get("note") else "")
        ),
        extra={
            **({"kv_cache": kv} if (kv := manifest.get("kv_cache")) and kv.get("num_gpu_blocks") else {}),
            "fit": {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "kvscale_version": __version__,
                "profile": {"path": str(root), "created": manifest.get("created"), "endpoints":
                            manifest.get("endpoints"), "parameters": manifest.get("parameters")},  # fmt: skip
                "features": {
                    "prefill": "ttft = ttft_overhead_s + base_s + per_prefill_token_s*n + per_prefill_attn_s*n*(c+n/2)"
                    " (engine side: vLLM's time_to_first_token; a client's TTFT adds client_overhead_s)",
                    "decode": "itl = base_s + per_decode_seq_s*B + per_decode_ctx_s*sum(context)",
                },
                "ttft_overhead_s": c["ttft_overhead_s"],
                "client_overhead_s": client_overhead,
                "range": fit_range,
                "observations": {"prefill": len(pm), "decode": len(dm),
                                 "engine_side": int((meta.source == "engine").sum())},  # fmt: skip
                "validation": {"method": f"grouped {min(folds, len(np.unique(obs.group)))}-fold (held-out points)",
                               **validation},  # fmt: skip
                "training_error": full,
                "engine_samples": len(engine),
            }
        },
    )
    return model, obs


def out_of_range(model: LatencyModel, **query: float) -> list[str]:
    """Which of ``prefill_new_tokens``, ``decode_batch``, ... lie outside the fitted range (empty: inside)."""
    rng: dict[str, Any] = (model.extra.get("fit") or {}).get("range", {})
    out = []
    for key, v in query.items():
        if key in rng:
            lo, hi = rng[key]
            if not lo <= v <= hi:
                out.append(f"{key}={v:g} outside the fitted range [{lo:g}, {hi:g}]")
    return out

"""Importers: published production traces → kvscale's trace format (:mod:`kvscale.traces.format`).

* ``mooncake``: JSON lines ``{"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}`` (Mooncake's
  FAST'25 release and its conversation / tool-agent traces); ``hash_ids`` become ``prefix_blocks`` of 512 tokens.
* ``azure``: CSV ``TIMESTAMP,ContextTokens,GeneratedTokens`` (Azure LLM inference traces 2023 and 2024), wall-clock
  timestamps such as ``2023-11-16 18:17:03.9799600``.
* ``burstgpt``: CSV ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`` (BurstGPT); rows with
  0 response tokens are failed requests, dropped unless ``keep_failed`` (then kept with 1 output token: their
  prefill was done).
* ``kvscale``: kvscale's own JSON lines (validated and rewritten).

Arrival times become seconds from the first request. Every error names the file, the line and the field; a file
that fails is never half-imported.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from kvscale.traces.format import TraceFormatError, TraceRequest, load_trace

MOONCAKE_BLOCK_TOKENS = 512


def _sorted(times: list[float] | np.ndarray, path: Path, lines: list[int] | np.ndarray, field: str) -> None:
    t = np.asarray(times, dtype=np.float64)
    back = np.flatnonzero(np.diff(t) < 0)
    if back.size:
        i = int(back[0]) + 1
        raise TraceFormatError(f"{path}:{lines[i]}: field {field!r}: goes backwards (before the previous row's); "
                               "traces must be sorted by time")  # fmt: skip


def import_mooncake(path: str | Path) -> list[TraceRequest]:
    path = Path(path)
    rows: list[tuple[float, int, int, list[int]]] = []
    lines: list[int] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TraceFormatError(f"{where}: not a JSON object line ({e})"[:300]) from None
            if not isinstance(obj, dict):
                raise TraceFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in ("timestamp", "input_length", "output_length") if k not in obj]
            if missing:
                raise TraceFormatError(f"{where}: field {missing[0]!r}: missing (a Mooncake line has timestamp, "
                                       f"input_length, output_length, hash_ids; got {sorted(obj)[:8]})")  # fmt: skip
            ts = obj["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts < 0:
                raise TraceFormatError(f"{where}: field 'timestamp': expected milliseconds >= 0, got {ts!r}"[:300])
            n_in, n_out = obj["input_length"], obj["output_length"]
            for field, v in (("input_length", n_in), ("output_length", n_out)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise TraceFormatError(f"{where}: field {field!r}: expected an integer >= 1, got {v!r}"[:300])
            ids = obj.get("hash_ids", [])
            if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0
                                                    for h in ids):  # fmt: skip
                raise TraceFormatError(f"{where}: field 'hash_ids': expected a list of integers >= 0")
            if (len(ids) - 1) * MOONCAKE_BLOCK_TOKENS >= n_in:
                raise TraceFormatError(f"{where}: field 'hash_ids': {len(ids)} blocks of {MOONCAKE_BLOCK_TOKENS} "
                                       f"tokens is more than input_length {n_in} needs")  # fmt: skip
            rows.append((ts / 1000.0, n_in, n_out, ids))
            lines.append(lineno)
    if not rows:
        raise TraceFormatError(f"{path}: no requests")
    _sorted([r[0] for r in rows], path, lines, "timestamp")
    t0 = rows[0][0]
    return [TraceRequest(t - t0, None, i, o, prefix_blocks=ids or None,
                         prefix_block_tokens=MOONCAKE_BLOCK_TOKENS if ids else None)
            for t, i, o, ids in rows]  # fmt: skip


def _read_csv(path: Path, columns: list[str], fmt: str) -> pd.DataFrame:
    """The CSV with exactly ``columns`` (in any order), every cell read as text; errors name file and line."""
    with path.open("rb") as f:
        head = f.readline()
    try:
        header = next(csv.reader([head.decode("utf-8-sig")]), [])
    except UnicodeDecodeError:
        raise TraceFormatError(f"{path}:1: not UTF-8 text") from None
    header = [h.strip() for h in header]
    if sorted(header) != sorted(columns):
        raise TraceFormatError(f"{path}:1: unknown column set {header}; a {fmt} trace has {columns}")
    try:  # header=None: the header row fixes the field count, so any row with more is an error naming its line
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig",
                         header=None, on_bad_lines="error")  # fmt: skip
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise TraceFormatError(f"{path}: malformed CSV: {e}"[:400]) from None
    df = df.iloc[1:].reset_index(drop=True)
    df.columns = header
    if df.empty:
        raise TraceFormatError(f"{path}: no requests")
    return df


def _ints(df: pd.DataFrame, col: str, path: Path, minimum: int) -> np.ndarray:
    v = pd.to_numeric(df[col].str.strip(), errors="coerce")
    bad = v.isna() | (v < minimum) | (v != np.floor(v))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise TraceFormatError(f"{path}:{i + 2}: field {col!r}: expected an integer >= {minimum}, "
                               f"got {df[col].iloc[i]!r}"[:300])  # fmt: skip
    return v.to_numpy(dtype=np.int64)


def import_azure(path: str | Path) -> list[TraceRequest]:
    path = Path(path)
    df = _read_csv(path, ["TIMESTAMP", "ContextTokens", "GeneratedTokens"], "Azure LLM inference")
    ts = pd.to_datetime(df["TIMESTAMP"].str.strip(), format="ISO8601", errors="coerce")
    if ts.isna().any():
        i = int(np.flatnonzero(ts.isna().to_numpy())[0])
        raise TraceFormatError(f"{path}:{i + 2}: field 'TIMESTAMP': expected a time such as "
                               f"'2023-11-16 18:17:03.9799600', got {df['TIMESTAMP'].iloc[i]!r}"[:300])  # fmt: skip
    if ts.dt.tz is not None:
        ts = ts.dt.tz_convert(None)
    seconds = (ts - ts.iloc[0]).dt.total_seconds().to_numpy()
    lines = np.arange(len(df)) + 2
    _sorted(seconds, path, lines, "TIMESTAMP")
    n_in = _ints(df, "ContextTokens", path, 1)
    n_out = _ints(df, "GeneratedTokens", path, 1)
    return [TraceRequest(t, None, i, o) for t, i, o in zip(seconds.tolist(), n_in.tolist(), n_out.tolist(),
                                                             strict=True)]  # fmt: skip


BURSTGPT_COLUMNS = ["Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"]


def import_burstgpt(path: str | Path, *, keep_failed: bool = False) -> list[TraceRequest]:
    path = Path(path)
    df = _read_csv(path, BURSTGPT_COLUMNS, "BurstGPT")
    t = pd.to_numeric(df["Timestamp"].str.strip(), errors="coerce")
    bad = t.isna() | (t < 0) | ~np.isfinite(t.fillna(0))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise TraceFormatError(f"{path}:{i + 2}: field 'Timestamp': expected seconds >= 0, "
                               f"got {df['Timestamp'].iloc[i]!r}"[:300])  # fmt: skip
    seconds = t.to_numpy(dtype=np.float64)
    lines = np.arange(len(df)) + 2
    _sorted(seconds, path, lines, "Timestamp")
    n_in = _ints(df, "Request tokens", path, 0)
    n_out = _ints(df, "Response tokens", path, 0)
    zero_in = np.flatnonzero(n_in < 1)
    if zero_in.size:
        raise TraceFormatError(f"{path}:{int(zero_in[0]) + 2}: field 'Request tokens': expected an integer >= 1, "
                               "got 0")  # fmt: skip
    keep = np.ones(len(df), dtype=bool) if keep_failed else n_out > 0
    if not keep.any():
        raise TraceFormatError(f"{path}: every request failed (0 response tokens); --keep-failed keeps them")
    seconds, n_in, n_out = seconds[keep], n_in[keep], np.maximum(n_out[keep], 1)
    t0 = seconds[0]
    return [TraceRequest(s - t0, None, i, o) for s, i, o in zip(seconds.tolist(), n_in.tolist(), n_out.tolist(),
                                                                  strict=True)]  # fmt: skip


IMPORTERS: dict[str, Callable[..., list[TraceRequest]]] = {
    "mooncake": import_mooncake,
    "azure": import_azure,
    "burstgpt": import_burstgpt,
    "kvscale": load_trace,
}


def import_trace(fmt: str, path: str | Path, **options: bool) -> list[TraceRequest]:
    """Read ``path`` as ``fmt`` (a key of :data:`IMPORTERS`); ``options`` go to the importer (``keep_failed``)."""
    if fmt not in IMPORTERS:
        raise ValueError(f"unknown trace format {fmt!r}; valid: {', '.join(IMPORTERS)}")
    if not Path(path).is_file():
        raise TraceFormatError(f"{path}: no such file")
    return IMPORTERS[fmt](path, **options) if options else IMPORTERS[fmt](path)

"""The profile dataset on disk: one parquet file per measured point, an engine-metrics time series, a manifest.

Layout of a profile directory::

    manifest.json                  engine, version, model, hardware, date, kvscale version, sweep parameters
    points/<point_id>.parquet      one row per request (written atomically when the point is complete)
    engine/<point_id>.parquet      engine metrics sampled while the point ran (running, waiting, KV usage)
    point_stats/<point_id>.json    the engine's own view of the point: its TTFT / ITL histograms' deltas

A point that is on disk is complete, which is what makes ``kvscale profile run`` resumable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_SCHEMA = "kvscale.profile"
MANIFEST_VERSION = 1

REQUEST_SCHEMA = pa.schema(
    [
        ("sweep", pa.string()),  # prefill | prefix | decode | load | import
        ("point_id", pa.string()),
        ("endpoint", pa.string()),
        ("isl_target", pa.int64()),
        ("osl_target", pa.int64()),
        ("concurrency", pa.int64()),  # decode sweep: streams in flight; prefill: 1; load: 0
        ("rate_rps", pa.float64()),  # load sweep: offered Poisson rate; else 0
        ("cached_target", pa.int64()),  # prefix sweep: tokens shared with an earlier request
        ("warmup", pa.bool_()),
        ("start_s", pa.float64()),  # seconds since the point started
        ("ok", pa.bool_()),
        ("status", pa.int64()),
        ("error", pa.string()),
        ("ttft_s", pa.float64()),
        ("e2e_s", pa.float64()),
        ("itl_s", pa.list_(pa.float64())),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
    ]
)

ENGINE_SCHEMA = pa.schema(
    [
        ("point_id", pa.string()),
        ("endpoint", pa.string()),
        ("t_s", pa.float64()),
        ("running", pa.float64()),
        ("waiting", pa.float64()),
        ("kv_usage", pa.float64()),
    ]
)


class DatasetError(ValueError):
    """A profile directory is missing, malformed, or from an incompatible version."""


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_point(
    root: Path,
    point_id: str,
    rows: list[dict[str, Any]],
    engine_rows: list[dict[str, Any]],
    stats: dict[str, Any] | None = None,
) -> None:
    """Write a completed point; the request file goes last, since its presence marks the point as measured."""
    if stats is not None:
        d = root / "point_stats"
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{point_id}.json.tmp"
        tmp.write_text(json.dumps(stats, sort_keys=True) + "\n")
        os.replace(tmp, d / f"{point_id}.json")
    _write_atomic(pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA), root / "points" / f"{point_id}.parquet")
    _write_atomic(pa.Table.from_pylist(engine_rows, schema=ENGINE_SCHEMA), root / "engine" / f"{point_id}.parquet")


def measured_points(root: Path) -> set[str]:
    d = root / "points"
    return {p.stem for p in d.glob("*.parquet")} if d.is_dir() else set()


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    body = {"schema": MANIFEST_SCHEMA, "version": MANIFEST_VERSION, **manifest}
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / "manifest.json")


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.is_file():
        raise DatasetError(f"{root}: no manifest.json: not a profile directory (`kvscale profile run` makes one)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(m, dict) or m.get("schema") != MANIFEST_SCHEMA:
        raise DatasetError(f"{path}: schema: expected {MANIFEST_SCHEMA!r}, got {m.get('schema')!r}")
    if not isinstance(m.get("version"), int) or m["version"] > MANIFEST_VERSION:
        raise DatasetError(f"{path}: version: {m.get('version')!r} is newer than kvscale reads ({MANIFEST_VERSION})")
    return m


def _read_dir(d: Path, schema: pa.Schema) -> pd.DataFrame:
    files = sorted(d.glob("*.parquet")) if d.is_dir() else []
    if not files:
        return schema.empty_table().to_pandas()
    return pa.concat_tables([pq.read_table(f, schema=schema) for f in files]).to_pandas()


def read_requests(root: Path) -> pd.DataFrame:
    read_manifest(root)
    return _read_dir(root / "points", REQUEST_SCHEMA)


def read_engine(root: Path) -> pd.DataFrame:
    return _read_dir(root / "engine", ENGINE_SCHEMA)


def read_point_stats(root: Path) -> pd.DataFrame:
    """One row per point that has engine-side statistics (columns: point_id + the stats' keys)."""
    d = root / "point_stats"
    rows = [{"point_id": f.name.removesuffix(".json"), **json.loads(f.read_text())}
            for f in sorted(d.glob("*.json"))] if d.is_dir() else []  # fmt: skip
    return pd.DataFrame(rows)


def request_row(**kw: Any) -> dict[str, Any]:
    """A row with every column present (defaults for the ones a sweep does not use)."""
    row: dict[str, Any] = {
        "sweep": "", "point_id": "", "endpoint": "", "isl_target": 0, "osl_target": 0, "concurrency": 0,
        "rate_rps": 0.0, "cached_target": 0, "warmup": False, "start_s": 0.0, "ok": False, "status": 0,
        "error": "", "ttft_s": float("nan"), "e2e_s": float("nan"), "itl_s": [], "prompt_tokens": 0,
        "completion_tokens": 0, "cached_tokens": 0,
    }  # fmt: skip
    unknown = set(kw) - set(row)
    if unknown:
        raise KeyError(f"unknown request column(s) {sorted(unknown)}")
    row.update(kw)
    return row


"""``kvscale profile import``: turn ``vllm bench serve --save-result --save-detailed`` files into a profile.

vLLM's result JSON carries per-request ``input_lens``, ``output_lens``, ``ttfts``, ``itls`` (lists of gaps),
``start_times`` and ``errors`` only with ``--save-detailed``; without them there is nothing per request to fit,
and the import says so. Each file becomes one ``load`` point (its request rate and max concurrency recorded).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path
from typing import Any

from kvscale import __version__
from predictor.dataset import measured_points, read_manifest, request_row, write_manifest, write_point

DETAILED = ("input_lens", "output_lens", "ttfts", "itls")


class ImportError_(ValueError):
    """A result file cannot be imported; the message names the file and the field."""


def _rate(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # "inf" included
        except ValueError:
            pass
    return math.nan


def load_vllm_bench_result(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Parse one result file into (metadata, request rows)."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ImportError_(f"{path}: cannot read: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ImportError_(f"{path}: not JSON: {e}") from e
    if not isinstance(data, dict):
        raise ImportError_(f"{path}: expected a JSON object (a `vllm bench serve --save-result` file)")
    missing = [k for k in DETAILED if not isinstance(data.get(k), list)]
    if missing:
        raise ImportError_(
            f"{path}: missing per-request field(s) {missing}; re-run `vllm bench serve` with "
            "--save-result --save-detailed"
        )
    n = len(data["ttfts"])
    for k in DETAILED:
        if len(data[k]) != n:
            raise ImportError_(f"{path}: field {k!r} has {len(data[k])} entries, 'ttfts' has {n}")
    errors = data.get("errors") if isinstance(data.get("errors"), list) else [""] * n
    starts = data.get("start_times") if isinstance(data.get("start_times"), list) else [math.nan] * n
    rate = _rate(data.get("request_rate"))
    conc = data.get("max_concurrency")
    concurrency = int(conc) if isinstance(conc, int) and not isinstance(conc, bool) else 0
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem)[:80]
    point_id = f"import-{slug}"
    t0 = min((s for s in starts if isinstance(s, int | float) and math.isfinite(s)), default=0.0)
    rows = []
    for i in range(n):
        ttft = data["ttfts"][i]
        itl = data["itls"][i] or []
        err = str(errors[i] or "") if i < len(errors) else ""
        ok = not err and isinstance(ttft, int | float) and ttft > 0
        start = starts[i] if i < len(starts) and isinstance(starts[i], int | float) else math.nan
        rows.append(request_row(
            sweep="import", point_id=point_id, endpoint=str(data.get("base_url") or data.get("backend") or ""),
            isl_target=int(data["input_lens"][i] or 0), osl_target=int(data["output_lens"][i] or 0),
            concurrency=concurrency, rate_rps=rate if math.isfinite(rate) else 0.0, start_s=start - t0,
            ok=ok, status=200 if ok else 0, error=err[:300], ttft_s=float(ttft) if ok else math.nan,
            e2e_s=float(ttft) + float(sum(itl)) if ok else math.nan, itl_s=[float(x) for x in itl],
            prompt_tokens=int(data["input_lens"][i] or 0), completion_tokens=int(data["output_lens"][i] or 0),
        ))  # fmt: skip
    meta = {
        "model": str(data.get("model_id") or ""),
        "backend": str(data.get("backend") or ""),
        "date": str(data.get("date") or ""),
        "request_rate": rate,
        "max_concurrency": concurrency,
        "point_id": point_id,
    }
    return meta, rows


def import_results(files: list[Path], out: Path, *, hardware: str = "", model: str | None = None) -> list[str]:
    """Import result files into the profile ``out`` (created if needed); returns the point ids written."""
    parsed = [load_vllm_bench_result(f) for f in files]  # parse all first: a bad file imports nothing
    models = {m["model"] for m, _ in parsed if m["model"]}
    name = model or (models.pop() if len(models) == 1 else "")
    if not name:
        raise ImportError_(f"cannot tell the model from the files ({sorted(models) or 'none given'}); pass --model")
    if (out / "manifest.json").is_file():
        old = read_manifest(out)
        if old.get("model") != name:
            raise ImportError_(f"{out} holds a profile of {old.get('model')!r}, not {name!r}: use another --out")
        manifest = {k: v for k, v in old.items() if k not in ("schema", "version")}
    else:
        manifest = {
            "engine": "vllm",
            "engine_version": "",
            "model": name,
            "hardware": hardware or "unknown (pass --hardware)",
            "endpoints": [],
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "kvscale_version": __version__,
            "parameters": {},
        }
    manifest.setdefault("imports", [])
    done = measured_points(out)
    written = []
    for f, (meta, rows) in zip(files, parsed, strict=True):
        manifest["imports"].append({"file": str(f), **meta})
        if meta["point_id"] in done:
            continue
        write_point(out, meta["point_id"], rows, [])
        written.append(meta["point_id"])
    write_manifest(out, manifest)
    return written

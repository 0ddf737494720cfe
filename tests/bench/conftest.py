"""Benchmarks print a table and write JSON under bench-results/ (``make bench``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

RESULTS = Path(os.environ.get("KVSCALE_BENCH_DIR", Path(__file__).resolve().parents[2] / "bench-results"))


@pytest.fixture
def record_bench():
    def write(name: str, data: dict[str, Any]) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{name}.json"
        path.write_text(json.dumps(data, indent=2, default=float) + "\n")
        return path

    return write

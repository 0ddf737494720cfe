"""Refactors keep the numbers: ``kvscale eval scaling`` and ``kvscale sim run`` print the same JSON as when the
files in ``tests/data/golden/`` were recorded (first on commit 4b8446c, before the "One house" layout change; last
re-recorded when the simulator's own dispatchers were deleted and the router's ``least-request`` became the virtual
cluster's default, which breaks ties at random).

Both commands are deterministic for a seed; only wall-clock fields (``wall_s``) differ between runs and are left
out of the comparison, and so are figures added since the recording (keys the file lacks). Everything else must be
equal to the last bit: a change that moves a float operation
changes the results and must re-record the files *on purpose* (``KVSCALE_RECORD_GOLDEN=1``), saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
# The policies the eval files were recorded with (the peers' autoscalers came later: they would only add time)
RECORDED_POLICIES = ["--policies",
                     "kvscale,kvscale-hpa-default,kvscale-noforecast,static-peak,keda-queue,hpa-kv,oracle"]

# file -> the command's arguments (after `kvscale`); --json OUT is appended.
CASES: dict[str, list[str]] = {
    "eval-step-chat-short.json": ["eval", "scaling", "--trace", "step", "--workload", "chat", "--duration", "180",
                                  "--peak-replicas", "1", "--startup-seconds", "20", *RECORDED_POLICIES],
    "eval-diurnal-rag-short.json": ["eval", "scaling", "--trace", "diurnal", "--workload", "rag", "--duration", "180",
                                    "--peak-replicas", "1", "--startup-seconds", "20", *RECORDED_POLICIES],
    "eval-step-rag-pd-short.json": ["eval", "scaling", "--trace", "step", "--workload", "rag", "--pools", "pd",
                                    "--duration", "150", "--peak-replicas", "1", "--startup-seconds", "20",
                                    *RECORDED_POLICIES],
    "sim-diurnal-chat.json": ["sim", "run", "--trace", "diurnal", "--workload", "chat", "--rate", "20",
                              "--duration", "300", "--replicas", "4"],
    "sim-step-rag-pd.json": ["sim", "run", "--trace", "step", "--workload", "rag", "--rate", "5", "--duration", "300",
                             "--pd", "2:4"],
    "sim-poisson-shared-rr.json": ["sim", "run", "--trace", "poisson", "--workload", "shared-prefix", "--rate", "10",
                                   "--duration", "300", "--replicas", "3", "--dispatcher", "round-robin"],
}  # fmt: skip
# The full-size cases (~15 and ~5 minutes): run with KVSCALE_GOLDEN_LONG=1 after a change to the simulator,
# the policy or the evaluator.
LONG_CASES: dict[str, list[str]] = {
    "eval-step-chat-1200.json": ["eval", "scaling", "--trace", "step", "--workload", "chat", "--duration", "1200",
                                 *RECORDED_POLICIES],
    "eval-diurnal-rag-1200.json": ["eval", "scaling", "--trace", "diurnal", "--workload", "rag", "--duration", "1200",
                                   *RECORDED_POLICIES],
}


def without_wall_time(obj: Any) -> Any:
    """The JSON with every ``wall_s`` key removed (the only field that depends on the machine)."""
    if isinstance(obj, dict):
        return {k: without_wall_time(v) for k, v in obj.items() if k != "wall_s"}
    if isinstance(obj, list):
        return [without_wall_time(v) for v in obj]
    return obj


def only_recorded(got: Any, want: Any) -> Any:
    """``got`` without the keys ``want`` lacks (figures added since the recording), at every depth of dicts."""
    if isinstance(got, dict) and isinstance(want, dict):
        return {k: only_recorded(v, want[k]) for k, v in got.items() if k in want}
    return got


def test_only_recorded_drops_added_keys_only() -> None:
    want = {"a": 1, "p": {"x": {"gpu_hours": 0.5}}, "l": [1]}
    got = {"a": 1, "new": 2, "p": {"x": {"gpu_hours": 0.5, "max_replicas": 3}}, "l": [1]}
    assert only_recorded(got, want) == want
    assert only_recorded({"p": {"x": {}}}, want) != want  # a recorded figure that went missing still fails


def test_without_wall_time_keeps_the_rest() -> None:
    got = without_wall_time({"a": 1, "wall_s": 2.0, "p": {"x": {"wall_s": 3, "gpu_hours": 0.5}}, "l": [{"wall_s": 1}]})
    assert got == {"a": 1, "p": {"x": {"gpu_hours": 0.5}}, "l": [{}]}


@pytest.mark.parametrize("name", sorted(CASES) + sorted(LONG_CASES))
def test_same_json_as_recorded(name: str, tmp_path: Path) -> None:
    if name in LONG_CASES and os.environ.get("KVSCALE_GOLDEN_LONG") != "1":
        pytest.skip("a full-size case: set KVSCALE_GOLDEN_LONG=1 to run it")
    out = tmp_path / name
    cmd = [sys.executable, "-m", "kvscale.cli", *(CASES | LONG_CASES)[name], "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    golden = GOLDEN / name
    if os.environ.get("KVSCALE_RECORD_GOLDEN") == "1":
        golden.write_text(out.read_text())
        pytest.skip(f"recorded {golden}")
    want = json.loads(golden.read_text())
    got, want = only_recorded(without_wall_time(got), without_wall_time(want)), without_wall_time(want)
    if got != want:
        diff = [k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
        detail = {k: (want.get(k), got.get(k)) for k in diff if k not in ("timelines", "load")}
        pytest.fail(f"{name}: results changed in {diff}: {json.dumps(detail, default=str)[:3000]}")

"""``kvscale demo`` end to end: real simulator pods (subprocesses), the real router and the real scaler (gRPC server
on a local port), the demo's KEDA+HPA controller as a real gRPC client, traffic through the router.

There is no Kubernetes API server here: the demo's controller publishes Ready pods in a JSON file that the router
and the scaler read (``demo.stack``) — that file is the only stand-in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.control import KedaHpa, demo_behavior

FAST = ["--polling-interval", "1", "--startup-delay", "1", "--stabilization-window", "4",
        "--scaler-stable-window", "4"]  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _demo(out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "kvscale.cli", "demo", "--out", str(out), "--no-live", *FAST, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_hpa_math_matches_kubernetes() -> None:
    """AverageValue: tolerance 0.1 keeps the count, else ceil(metric/target); scale-down stabilization; bounds.
    The demo's HPA is scaler.hpa.Hpa (the evaluator's) with its policies per polling interval (1 s here)."""
    hpa = KedaHpa("p", min_replicas=1, max_replicas=6, behavior=demo_behavior(scale_down_window_s=10, period_s=1))
    assert hpa.decide(0, current=2, metric=2.1, target=1) == 2  # ratio 1.05: inside the tolerance
    assert hpa.decide(1, current=2, metric=4, target=1) == 4
    assert hpa.decide(2, current=4, metric=1, target=1) == 4  # held: 4 was recommended within 10 s
    assert hpa.decide(13, current=4, metric=1, target=1) == 1  # window passed
    assert hpa.decide(14, current=1, metric=50, target=1) == 5  # scale-up policy: max(2x, +4)
    assert hpa.decide(15, current=5, metric=50, target=1) == 6  # max replicas
    assert hpa.decide(16, current=6, metric=3, target=2) == 6  # held by the window
    idle = KedaHpa("p", 0, 3, demo_behavior(30, 1))
    assert idle.decide(0, current=2, metric=0, target=1, active=False) == 0  # KEDA: idle → zero
    assert idle.decide(1, current=0, metric=2, target=1, active=True) == 2  # KEDA activates, the HPA scales on
    with pytest.raises(ValueError):
        KedaHpa("p", min_replicas=3, max_replicas=2, behavior=demo_behavior(30, 1))


@pytest.mark.timeout(150)
def test_demo_replicas_follow_load(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _demo(out, "--duration", "40")
    stdout, _ = proc.communicate(timeout=140)
    assert proc.returncode == 0, stdout
    summary = json.loads((out / "summary.json").read_text())
    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    pool = summary["pools"]["aggregated"]
    phases = {p["phase"]: p for p in summary["phases"]}
    assert pool["polls"] >= 30 and pool["rpc_errors"] == 0, pool
    assert pool["metric_name"] == "kvscale-desired-replicas-aggregated" and pool["target"] == 1.0
    # replicas went up under the burst, and back down once the load was gone
    assert pool["replicas_start"] == 1, pool
    assert phases["burst"]["aggregated_replicas_max"] >= 3, phases["burst"]
    assert phases["burst"]["aggregated_replicas_max"] > phases["warm"]["aggregated_replicas_mean"], phases
    assert pool["replicas_end"] < pool["replicas_max"], pool
    assert any(e["to"] > e["from"] for e in pool["scale_events"])
    assert any(e["to"] < e["from"] for e in pool["scale_events"] if e["t"] > phases["idle"]["start_s"])
    # every request went through the router and was measured; SLO attainment reported per phase and overall
    assert summary["overall"]["requests"] > 50 and summary["overall"]["errors"] == 0
    assert summary["unfinished_requests"] == 0
    assert 0.0 <= summary["overall"]["slo_attainment"] <= 1.0
    assert all(p["slo_attainment"] is not None for p in summary["phases"] if p["requests"])
    governance = (out / "logs" / "router-requests.jsonl").read_text().splitlines()
    backends = {json.loads(line)["backend"] for line in governance if line.startswith("{")}
    assert len(backends) >= 3  # the router learned about the pods the controller added
    assert "SLO attainment" in stdout and "scale events" in stdout
    # every pod was drained and stopped, and nothing the demo started is left running
    assert all(p["stopped"] is not None for p in summary["pods"])
    procs = json.loads((out / "processes.json").read_text())
    assert {p["name"] for p in procs} >= {"router", "scaler"} and len(procs) >= 5
    assert [p for p in procs if _alive(p["pid"])] == []


@pytest.mark.timeout(90)
def test_demo_ctrl_c_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _demo(out, "--duration", "120", "--pools", "pd")
    deadline = time.monotonic() + 60
    pods = out / "pods.json"
    # wait until both P/D pools have a Ready pod (the stack is up and traffic flows)
    while time.monotonic() < deadline:
        if pods.exists() and {p["pool"] for p in json.loads(pods.read_text())["pods"]} == {"prefill", "decode"}:
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.3)
    else:
        pytest.fail("the P/D stack did not come up")
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=40)
    assert proc.returncode == 130, stdout
    procs = json.loads((out / "processes.json").read_text())
    assert len(procs) >= 4
    assert [p for p in procs if _alive(p["pid"])] == []
    assert os.path.exists(out / "logs" / "router.log")

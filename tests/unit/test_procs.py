"""harness.procs: stopping processes (real child processes, no mocks)."""

from __future__ import annotations

import time
from pathlib import Path

from harness.procs import ManagedProcess, stop_together

IGNORES_TERM = ["bash", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"]  # a graceful shutdown that never ends


def test_stop_together_shares_one_bound_and_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    procs = [ManagedProcess(IGNORES_TERM, log_path=tmp_path / f"p{i}.log", name=f"p{i}").start() for i in range(3)]
    time.sleep(0.3)  # the trap is set
    t0 = time.monotonic()
    stop_together(procs, timeout=1.0)
    took = time.monotonic() - t0
    assert [p.is_running() for p in procs] == [False] * 3
    assert took < 2.5, took  # one shared 1 s bound (then SIGKILL), not 1 s per process


def test_stop_kills_the_group_and_returns_the_status(tmp_path: Path) -> None:
    p = ManagedProcess(IGNORES_TERM, log_path=tmp_path / "p.log", name="p").start()
    time.sleep(0.3)
    assert p.stop(0.5) == -9  # SIGTERM ignored: SIGKILL after the bound
    assert not p.is_running()
    done = ManagedProcess(["true"], log_path=tmp_path / "t.log", name="t").start()
    time.sleep(0.3)
    assert done.stop(0.5) == 0

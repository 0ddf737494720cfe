"""Small process helpers for servers started by tests, benchmarks and the demo.

``ManagedProcess`` starts a command with its output going to a log file (truncated at start), waits for an
HTTP endpoint to answer (failing with the log tail if the process dies or the wait times out) and stops the
process group with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["ManagedProcess", "ProcessError", "error_lines", "free_port", "stop_together", "tail"]


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the parent dies, even if it is SIGKILLed.

    Without it a test run killed from outside would leave the server (in its own session) running.
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


class ProcessError(RuntimeError):
    """A managed process died or did not become ready; the message carries the log tail."""


# Ports this process has handed out: the OS can hand a port out again once the probe socket is closed, and a
# server started later (a pod) would then take the port of one still importing (the scaler). Process-wide, as
# ports are.
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now on ``host`` (the OS picks it) and that this process has not
    returned before."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh free port after 100 tries")


def tail(path: Path, lines: int = 60) -> str:
    """Return the last ``lines`` lines of the text file ``path`` ("" if it does not exist)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def error_lines(path: Path, limit: int = 8) -> list[str]:
    """Distinct lines of ``path`` that look like an exception (``SomethingError: ...``), first ``limit``.

    Servers such as vLLM log the root cause far above the final traceback; this digs it out.
    """
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return []
    found: list[str] = []
    for line in text.splitlines():
        match = None if " WARNING " in line else _ERROR_RE.search(line)
        if match and match.group(0) not in found:
            found.append(match.group(0))
            if len(found) >= limit:
                break
    return found


_ERROR_RE = re.compile(r"\b[A-Za-z_.]*(?:Error|Exception): .+$")


class ManagedProcess:
    """A child process in its own process group, with stdout and stderr written to ``log_path``.

    Use as a context manager (``with ManagedProcess(cmd, log_path=...) as proc:``) or call :meth:`start` and
    :meth:`stop` yourself. ``env`` entries are added to (not replacing) the current environment. With
    ``die_with_parent`` (Linux) the child is sent SIGTERM if this process dies without calling :meth:`stop`;
    the kernel ties this to the *thread* that started the child, so start it from a long-lived thread (or pass
    ``die_with_parent=False``), not from e.g. ``asyncio.to_thread``.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.cmd = [str(c) for c in cmd]
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.cwd = cwd
        self.name = name or Path(self.cmd[0]).name
        self.die_with_parent = die_with_parent
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> ManagedProcess:
        """Start the process (once). Returns ``self``."""
        if self.popen is not None:
            raise ProcessError(f"{self.name}: already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        with open(self.log_path, "wb") as log:
            log.write(f"$ {shlex.join(self.cmd)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.cwd,
                start_new_session=True,  # own process group: stop() reaches the children too
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int | None:
        """The child's pid, or None before :meth:`start`."""
        return None if self.popen is None else self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status if the process has ended, else None."""
        return None if self.popen is None else self.popen.poll()

    def is_running(self) -> bool:
        """True while the process is started and has not exited."""
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log file."""
        return tail(self.log_path, lines)

    def _fail(self, what: str) -> ProcessError:
        errors = error_lines(self.log_path)
        cause = "".join(f"\n  {line}" for line in errors)
        return ProcessError(
            f"{self.name} (pid {self.pid}) {what}\ncommand: {shlex.join(self.cmd)}\n"
            + (f"errors in the log:{cause}\n" if errors else "")
            + f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def wait_http_ready(self, url: str, timeout: float = 120.0, *, interval: float = 0.5) -> float:
        """Poll ``url`` with GET until it answers 200; return the seconds since start.

        Raises :class:`ProcessError` with the log tail if the process exits or ``timeout`` seconds pass.
        """
        if self.popen is None:
            raise ProcessError(f"{self.name}: not started")
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while True:
            code = self.popen.poll()
            if code is not None:
                raise self._fail(f"exited with status {code} before {url} was ready")
            try:
                with urllib.request.urlopen(url, timeout=min(5.0, max(interval, 1.0))) as resp:
                    if resp.status == 200:
                        return time.monotonic() - (self.started_at or deadline - timeout)
                    last_error = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(getattr(exc, "reason", exc))
            if time.monotonic() >= deadline:
                raise self._fail(f"not ready at {url} after {timeout:.0f}s (last error: {last_error})")
            time.sleep(interval)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop the process group: SIGTERM, then SIGKILL after ``timeout`` s. Returns the exit status."""
        if self.popen is None:
            return None
        stop_together([self], timeout)
        if self.popen.poll() is None:
            raise subprocess.TimeoutExpired(self.cmd, timeout)  # outlived SIGKILL by ``timeout`` s
        return self.popen.returncode

    def terminate(self) -> None:
        """Send SIGTERM to the process group and return at once (:func:`stop_together` waits for many)."""
        if self.popen is not None and self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    # -- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> ManagedProcess:
        if self.popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_together(procs: Sequence[ManagedProcess], timeout: float = 5.0) -> None:
    """Stop many processes in one shared time bound: SIGTERM to every group, wait until ``timeout`` s have
    passed in all, then SIGKILL every group (what is left, and children that outlived their leader, e.g.
    engine-core processes) and wait up to ``timeout`` s more in all. :meth:`ManagedProcess.stop` is this for one.

    Stopping one by one costs up to ``timeout`` per process: a stack of ten that each hold a graceful shutdown
    would take minutes to stop on Ctrl-C.
    """
    started = [p.popen for p in procs if p.popen is not None]

    def wait_all() -> None:
        deadline = time.monotonic() + timeout
        for popen in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=max(0.0, deadline - time.monotonic()))

    for p in procs:
        p.terminate()
    wait_all()
    for p in procs:
        if p.popen is not None:
            p._signal_group(signal.SIGKILL)
    wait_all()

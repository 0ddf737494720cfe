"""The demo's local stand-in for the Kubernetes API: a JSON *pods file* that the demo controller writes and the
router and the scaler read, plus the entry points that run the real router and the real scaler on top of it.

In a cluster both discover pods through the Kubernetes API (``KubernetesDiscovery`` / ``KubernetesPods``). There
is no API server here, so the demo controller publishes its Ready pods in a file (written atomically) and:

* the router runs with :class:`FileDiscovery`, passed to ``router.app.create_app(config, discovery=...)`` (the
  router's documented extension point for another discovery source);
* the scaler runs with :class:`FilePods` as the pod discovery of every ScaledObject (``podSelector`` label
  equality requirements are matched against the pods' labels, as the API server would).

Run as ``python -m demo.stack router --pods-file F [router serve flags]`` or
``python -m demo.stack scaler --pods-file F --port P --metrics-port M``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvscale.labels import matches, parse_selector

log = logging.getLogger("kvscale.demo")


@dataclass(frozen=True)
class PodRecord:
    """One Ready pod as the demo's "API server" lists it."""

    name: str
    url: str  # base URL, e.g. http://127.0.0.1:40123
    pool: str  # aggregated | prefill | decode
    role: str  # both | prefill | decode (the router's role)
    model: str
    labels: dict[str, str] = field(default_factory=dict)


def write_pods(path: Path, pods: list[PodRecord]) -> None:
    """Publish the Ready pods atomically (readers never see a half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pods-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"pods": [asdict(p) for p in pods]}, f)
    os.replace(tmp, path)


def read_pods(path: Path) -> list[PodRecord] | None:
    """The pods in the file; None if it does not exist yet."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return [PodRecord(**p) for p in data["pods"]]


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """``selector`` (a Kubernetes label selector string; empty selects everything) against ``labels``."""
    return not selector.strip() or matches(parse_selector(selector), labels)


class _CachedFile:
    """Re-read the pods file only when its mtime/size changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.pods: list[PodRecord] | None = None

    def refresh(self) -> bool:
        """True if the content changed."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        pods = read_pods(self.path)
        changed = pods != self.pods
        self.pods = pods
        return changed


class FileDiscovery:
    """Router discovery over the pods file (polled every ``poll_s``): ``start(on_update)`` / ``stop()``."""

    def __init__(self, path: Path, *, poll_s: float = 0.2) -> None:
        self.file = _CachedFile(path)
        self.poll_s = poll_s
        self._task: asyncio.Task[None] | None = None

    def _specs(self) -> list[Any]:
        from router.backends import BackendSpec

        return [BackendSpec(p.url, frozenset([p.model]), p.role, {**p.labels, "pool": p.pool})
                for p in self.file.pods or []]  # fmt: skip

    async def start(self, on_update: Callable[[list[Any]], None]) -> None:
        self.file.refresh()
        on_update(self._specs())

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.poll_s)
                try:
                    if self.file.refresh():
                        on_update(self._specs())
                except (OSError, ValueError, KeyError, TypeError) as e:  # keep the last good set
                    log.warning("pods file unreadable: %s", e)

        self._task = asyncio.create_task(loop(), name="demo-file-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class FilePods:
    """Scaler pod discovery (``scaler.discovery.PodDiscovery``) over the pods file and a label selector."""

    def __init__(self, path: Path, selector: str, metrics_path: str = "/metrics") -> None:
        self.file = _CachedFile(path)
        self.selector = selector
        self.metrics_path = metrics_path
        self.last_error: str | None = None

    def urls(self) -> list[str] | None:
        try:
            self.file.refresh()
            self.last_error = None
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.last_error = str(e)
        if self.file.pods is None:
            return None
        return sorted(p.url + self.metrics_path for p in self.file.pods
                      if selector_matches(self.selector, {**p.labels, "pool": p.pool}))  # fmt: skip

    def close(self) -> None:
        pass


# -- entry points -------------------------------------------------------------------------------------------------
def _router_main(argv: list[str]) -> int:
    import random

    from router.app import create_app
    from router.cli import add_serve_args, build_config
    from router.runner import serve

    p = argparse.ArgumentParser(prog="demo.stack router")
    add_serve_args(p)
    p.add_argument("--pods-file", required=True, type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = build_config(args)
    app = create_app(config, rng=random.Random(args.seed), discovery=FileDiscovery(args.pods_file))
    print(f"demo router on http://{config.host}:{config.port} (pods from {args.pods_file})", flush=True)
    serve(app, config.host, config.port, header_timeout_s=config.header_timeout_s)
    return 0


def _scaler_main(argv: list[str]) -> int:
    from scaler.app import ScalerApp
    from scaler.service import ScalerService

    p = argparse.ArgumentParser(prog="demo.stack scaler")
    p.add_argument("--pods-file", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The real scaler service; only its pod discovery reads the demo's pods file instead of the API server.
    service = ScalerService(discovery_factory=lambda s: FilePods(args.pods_file, s.pod_selector, s.metrics_path))
    app = ScalerApp(service, host=args.host, grpc_port=args.port, metrics_port=args.metrics_port,
                    grace_s=1.0)  # fmt: skip
    asyncio.run(app.run_forever())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("router", "scaler"):
        print("usage: python -m demo.stack {router|scaler} --pods-file FILE ...", file=sys.stderr)
        return 2
    return (_router_main if argv[0] == "router" else _scaler_main)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""The kvscale scaler app in this process on free ports with a generated gRPC stub connected to it, for the
scaler's integration tests. Test-only: it lives with the tests, not in the scaler package."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from harness.procs import free_port
from protos import externalscaler_pb2_grpc as pb_grpc
from scaler.app import ScalerApp
from scaler.service import ScalerService, ServeOptions


@contextlib.asynccontextmanager
async def scaler(
    *, wall_clock: Callable[[], float] = time.time, **options: Any
) -> AsyncIterator[tuple[ScalerApp, pb_grpc.ExternalScalerStub]]:
    """``options``: :class:`ServeOptions` fields (pages parsed on the loop unless ``parse_workers`` is given);
    ``wall_clock``: the service's Unix clock (``scheduleFloors``)."""
    options.setdefault("parse_workers", 0)
    service = ScalerService(options=ServeOptions(**options), wall_clock=wall_clock)
    app = ScalerApp(service, host="127.0.0.1", grpc_port=free_port(), metrics_port=free_port(), grace_s=0.5)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.bound_grpc_port}") as ch:
            yield app, pb_grpc.ExternalScalerStub(ch)
    finally:
        await app.stop()

"""The scaler process: the gRPC server (ExternalScaler + health + reflection) and the HTTP ``/metrics`` server.

:class:`ScalerApp` binds and serves a :class:`~scaler.service.ScalerService` (optionally over TLS or mTLS,
:class:`TLSFiles`), and stops gracefully: health NOT_SERVING, in-flight RPCs get ``grace_s``, then the loops stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protos import externalscaler_pb2 as pb
from protos import externalscaler_pb2_grpc as pb_grpc
from scaler.service import ScalerService
from scaler.servicer import ExternalScalerServicer

log = logging.getLogger("kvscale.scaler")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalScaler"].full_name


@dataclass
class TLSFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: require and verify client certificates (mTLS)


class ScalerApp:
    """gRPC server (scaler + health + reflection) and the HTTP /metrics server, started and stopped together."""

    def __init__(
        self,
        service: ScalerService,
        *,
        host: str = "0.0.0.0",
        grpc_port: int = 6000,
        metrics_port: int | None = 8080,
        tls: TLSFiles | None = None,
        grace_s: float = 5.0,
    ) -> None:
        self.service = service
        self.host, self.grpc_port, self.metrics_port = host, grpc_port, metrics_port
        self.tls = tls
        self.grace_s = grace_s
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self._runner: web.AppRunner | None = None
        self.bound_grpc_port: int | None = None

    def metrics_app(self) -> web.Application:
        app = web.Application()

        async def metrics(request: web.Request) -> web.Response:
            body = generate_latest(self.service.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok", "scaledobjects": len(self.service.trackers)})

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        return app

    async def start(self) -> None:
        # Exclusive bind: with gRPC's default SO_REUSEPORT a second scaler on the same port would start fine and
        # take half the connections, each process with its own trackers.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ExternalScalerServicer_to_server(ExternalScalerServicer(self.service), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        address = f"{self.host}:{self.grpc_port}"
        if self.tls is not None:
            creds = grpc.ssl_server_credentials(
                [(self.tls.key.read_bytes(), self.tls.cert.read_bytes())],
                root_certificates=self.tls.client_ca.read_bytes() if self.tls.client_ca else None,
                require_client_auth=self.tls.client_ca is not None,
            )
            add = lambda: self.server.add_secure_port(address, creds)  # noqa: E731
        else:
            add = lambda: self.server.add_insecure_port(address)  # noqa: E731
        try:
            self.bound_grpc_port = add()
        except RuntimeError as e:  # grpcio raises on a failed bind (older releases return 0)
            raise OSError(f"cannot bind the gRPC port {address}: {e} (is another scaler running there?)") from e
        if not self.bound_grpc_port:
            raise OSError(f"cannot bind the gRPC port {address} (is another scaler running there?)")
        await self.service.start()  # after the bind: its worker process must not delay taking the port
        await self.server.start()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.metrics_port is not None:
            self._runner = web.AppRunner(self.metrics_app())
            await self._runner.setup()
            await web.TCPSite(self._runner, self.host, self.metrics_port).start()

    async def stop(self) -> None:
        """Graceful: report NOT_SERVING, let in-flight RPCs finish (``grace_s``), then stop the loops."""
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.grace_s)
        await self.service.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    async def run_forever(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"kvscale scaler: gRPC on {self.host}:{self.bound_grpc_port} "
              f"({'mTLS' if self.tls and self.tls.client_ca else 'TLS' if self.tls else 'plaintext'}), "
              f"metrics on {self.host}:{self.metrics_port}", flush=True)  # fmt: skip
        await stop.wait()
        log.info("shutting down")
        await self.stop()

"""KEDA's ``ExternalScaler`` gRPC service: a thin face over :class:`~scaler.service.ScalerService`.

Every RPC looks up (or registers) the ScaledObject's tracker and answers from its last decision; nothing here
scrapes or decides. A bad ``scalerMetadata`` answers ``INVALID_ARGUMENT`` naming the key; ``GetMetrics`` before
anything is known answers ``UNAVAILABLE`` (the HPA holds), never 0.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from protos import externalscaler_pb2 as pb
from protos import externalscaler_pb2_grpc as pb_grpc
from scaler.metadata import MetadataError
from scaler.service import ScalerService, Tracker

log = logging.getLogger("kvscale.scaler")


class ExternalScalerServicer(pb_grpc.ExternalScalerServicer):
    """KEDA's ExternalScaler service over a :class:`ScalerService`."""

    def __init__(self, service: ScalerService) -> None:
        self.service = service
        self._latency: dict[tuple[str, str], Any] = {}  # resolved histogram children: no label lookup per call

    async def _tracker(self, ref: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> Tracker:
        try:
            return self.service.tracker(ref)
        except MetadataError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{ref.namespace}/{ref.name}: {e}")
        except Exception as e:  # never UNKNOWN: a fault registering the ScaledObject is named and logged
            log.exception("%s/%s: cannot register the ScaledObject", ref.namespace, ref.name)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"{ref.namespace}/{ref.name}: {type(e).__name__}: {str(e)[:300]}")  # fmt: skip
        raise AssertionError("unreachable: abort raises")

    def _observe(self, method: str, started: float, code: str) -> None:
        child = self._latency.get((method, code))
        if child is None:
            child = self._latency[(method, code)] = self.service.metrics.rpc_latency.labels(method, code)
        child.observe(time.perf_counter() - started)

    async def IsActive(self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> pb.IsActiveResponse:
        t0 = time.perf_counter()
        tr = await self._tracker(request, context)
        self._observe("IsActive", t0, "OK")
        return pb.IsActiveResponse(result=tr.active)

    async def StreamIsActive(self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext):
        """Push the active state when it changes. The open stream keeps its ScaledObject tracked (it may be its only
        caller, with scale-from-zero by push), and refreshes it every minute for the expiry clock."""
        tr = await self._tracker(request, context)
        last: bool | None = None
        tr.streams += 1
        try:
            while True:
                if tr.active != last:
                    last = tr.active
                    yield pb.IsActiveResponse(result=last)
                await tr.wait_change(60.0)
                tr.last_call = self.service.clock()
        finally:
            tr.streams -= 1

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext
    ) -> pb.GetMetricSpecResponse:
        t0 = time.perf_counter()
        tr = await self._tracker(request, context)
        self._observe("GetMetricSpec", t0, "OK")
        spec = pb.MetricSpec(metricName=tr.settings.metric_name, targetSize=1, targetSizeFloat=1.0)
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMetricsResponse:
        t0 = time.perf_counter()
        tr = await self._tracker(request.scaledObjectRef, context)
        value = tr.desired
        if value is None:  # nothing known yet: an error makes the HPA hold, where a 0 would scale down
            self._observe("GetMetrics", t0, "UNAVAILABLE")
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{tr.key[0]}/{tr.key[1]}: no signals yet ({tr.last_error or 'first read in progress'})",
            )
        name = request.metricName or tr.settings.metric_name
        self._observe("GetMetrics", t0, "OK")
        return pb.GetMetricsResponse(
            metricValues=[pb.MetricValue(metricName=name, metricValue=int(value), metricValueFloat=float(value))]
        )

    async def StreamMetricSpec(self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "StreamMetricSpec is not implemented: use GetMetricSpec")
        yield pb.GetMetricSpecResponse()  # pragma: no cover (makes this an async generator)

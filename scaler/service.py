"""The KEDA external scaler: a gRPC service answering from state computed in the background, plus /metrics.

KEDA calls ``GetMetrics`` then ``IsActive`` every polling interval with no deadline of its own, so nothing on
the request path scrapes, queries or simulates: the first call for a ScaledObject registers a *tracker* (its
validated settings, a signal source, a :class:`~scaler.policy.ScalingPolicy`) whose background task reads the
signals and decides every ``signalIntervalSeconds``; RPCs read the tracker's last decision.

Metric contract (``metricType: AverageValue``, KEDA's default): ``GetMetricSpec`` answers target 1 and
``GetMetrics`` the desired replica count, so the HPA computes ``ceil(desired / 1) = desired``.

A tracker nobody asked about for ``expire_after_s`` is stopped (its ScaledObject was deleted or changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvscale.latency import LatencyModel, load_latency_model
from protos import externalscaler_pb2 as pb
from protos import externalscaler_pb2_grpc as pb_grpc
from scaler.discovery import KubernetesPods, PodDiscovery, StaticPods
from scaler.metadata import MetadataError, ScalerSettings, parse_scaler_metadata
from scaler.policy import REASONS, Decision, ScalingPolicy
from scaler.signals import PageParser, PodScrapeSource, PrometheusSource, SignalError, SignalPending, SignalSource

log = logging.getLogger("kvscale.scaler")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalScaler"].full_name
LABELS = ("namespace", "scaledobject", "pool", "model")


class ScalerMetrics:
    """The scaler's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)

        def g(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"kvscale_scaler_{name}", doc, (*LABELS, *extra), registry=r)

        self.desired = g("desired_replicas", "Replicas the scaler asks for (what GetMetrics returns).")
        self.need = g("need_replicas", "Fractional replicas the forecast demand needs, corrections included.")
        self.ready = g("ready_replicas", "Pods whose metrics were read at the last decision.")
        self.arrival = g("arrival_rate", "Requests per second entering the pool's engines (last interval).")
        self.forecast = g("forecast_arrival_rate", "Arrival rate forecast over the startup horizon.")
        self.isl = g("mean_input_tokens", "Mean prompt length of finished requests (latency window).")
        self.osl = g("mean_output_tokens", "Mean output length of finished requests (latency window).")
        self.prefix = g("prefix_hit_rate", "Fraction of prompt tokens served from the prefix cache.")
        self.waiting = g("queue_requests", "Requests waiting in the pool's engines.")
        self.running = g("running_requests", "Requests running in the pool's engines.")
        self.kv = g("kv_usage_ratio", "Mean KV-cache usage of the pool's engines (0..1).")
        self.capacity = g("capacity_per_replica", "Per-replica capacity under the SLO (pool's demand unit per s).")
        self.correction = g("latency_correction", "Observed/predicted latency correction applied to capacity.")
        self.pred_ttft = g("predicted_ttft_seconds", "Predicted TTFT at the SLO percentile (current load).")
        self.obs_ttft = g("observed_ttft_seconds", "Observed TTFT at the SLO percentile (latency window).")
        self.pred_itl = g("predicted_itl_seconds", "Predicted inter-token latency (current load).")
        self.obs_itl = g("observed_itl_seconds", "Observed inter-token latency at the SLO percentile.")
        self.burst_hold = g("burst_hold_seconds", "How far back a scale-down looks for recurring bursts (0: off).")
        self.reason = g("decision_reason", "1 for the reason of the last decision, 0 for the others.", ("reason",))
        self.active = g("active", "What IsActive answers (1 active, 0 idle).")
        self.errors = Counter(
            "kvscale_scaler_signal_errors", "Failed or stale signal reads (the decision was held).", LABELS,
            registry=r,
        )  # fmt: skip
        self.changes = Counter(
            "kvscale_scaler_scale_changes", "Decisions that changed the desired replica count.", LABELS, registry=r
        )
        self.trackers = Gauge("kvscale_scaler_scaledobjects", "ScaledObjects being tracked.", registry=r)
        self.rpc_latency = Histogram(
            "kvscale_scaler_grpc_request_duration_seconds", "gRPC handling time.", ("method", "code"), registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
        )  # fmt: skip
        self._gauges = [self.desired, self.need, self.ready, self.arrival, self.forecast, self.isl, self.osl,
                        self.prefix, self.waiting, self.running, self.kv, self.capacity, self.correction,
                        self.pred_ttft, self.obs_ttft, self.pred_itl, self.obs_itl, self.burst_hold,
                        self.active]  # fmt: skip

    def publish(self, labels: tuple[str, ...], d: Decision, changed: bool) -> None:
        if d.desired >= 0:
            self.desired.labels(*labels).set(d.desired)
        self.active.labels(*labels).set(1.0 if d.active else 0.0)
        for reason in REASONS:
            self.reason.labels(*labels, reason).set(1.0 if reason == d.reason else 0.0)
        if changed:
            self.changes.labels(*labels).inc()
        inputs = d.inputs
        for gauge, key in ((self.need, "need"), (self.ready, "ready_replicas"), (self.arrival, "arrival_rate"),
                           (self.forecast, "forecast_rate"), (self.isl, "isl"), (self.osl, "osl"),
                           (self.prefix, "prefix_hit_rate"), (self.waiting, "waiting"), (self.running, "running"),
                           (self.kv, "kv_usage"), (self.capacity, "capacity_per_replica"),
                           (self.correction, "correction"), (self.pred_ttft, "predicted_ttft_s"),
                           (self.obs_ttft, "observed_ttft_s"), (self.pred_itl, "predicted_itl_s"),
                           (self.obs_itl, "observed_itl_s"), (self.burst_hold, "burst_hold_s")):  # fmt: skip
            v = inputs.get(key)
            if v is not None and not math.isnan(v):
                gauge.labels(*labels).set(v)

    def remove(self, labels: tuple[str, ...]) -> None:
        for gauge in self._gauges:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        for reason in REASONS:
            with contextlib.suppress(KeyError):
                self.reason.remove(*labels, reason)
        for c in (self.errors, self.changes):
            with contextlib.suppress(KeyError):
                c.remove(*labels)


class Tracker:
    """One ScaledObject: settings, signal source, policy, and its background decision loop."""

    def __init__(
        self,
        key: tuple[str, str],
        settings: ScalerSettings,
        source: SignalSource,
        policy: ScalingPolicy,
        discovery: PodDiscovery | None,
        clock: Callable[[], float],
    ) -> None:
        self.key, self.settings, self.source, self.policy = key, settings, source, policy
        self.discovery = discovery
        self.clock = clock
        self.labels = (key[0], key[1], settings.pool, settings.model)
        self.decision: Decision | None = None
        self.last_error: str | None = None
        self.last_call = clock()
        self.ref_blob = b""  # the ScaledObjectRef last seen, serialized (the RPC fast path)
        # the loop's phase within the signal interval: spreads the scrapes of many ScaledObjects evenly
        self.phase_s = zlib.crc32(f"{key[0]}/{key[1]}".encode()) / 2**32 * settings.signal_interval_s
        self.task: asyncio.Task | None = None
        self._changed = asyncio.Condition()

    @property
    def active(self) -> bool:
        return True if self.decision is None else self.decision.active

    @property
    def desired(self) -> int | None:
        """The metric for GetMetrics: the decision, or the current pod count before any; None if unknown."""
        if self.decision is not None and self.decision.desired >= 0:
            return self.decision.desired
        urls = self.discovery.urls() if self.discovery is not None else None
        return len(urls) if urls else None

    def current(self) -> int:
        urls = self.discovery.urls() if self.discovery is not None else None
        return len(urls) if urls is not None else -1

    async def publish(self, d: Decision) -> None:
        before = self.decision
        self.decision = d
        if before is None or before.active != d.active:
            async with self._changed:
                self._changed.notify_all()

    async def wait_change(self) -> None:
        async with self._changed:
            await self._changed.wait()


@dataclass
class ServeOptions:
    signal_timeout_s: float | None = None
    expire_after_s: float = 900.0
    parse_workers: int = 1  # processes parsing pods' metrics pages (0: on the event loop)


class ScalerService:
    """Trackers by ScaledObject, the decision loops, and the metrics (served by :class:`ScalerApp`)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        kube_api_client: object | None = None,
        options: ServeOptions | None = None,
        discovery_factory: Callable[[ScalerSettings], PodDiscovery] | None = None,
    ) -> None:
        """``clock``: monotonic seconds (decision times, expiry). ``kube_api_client``: the Kubernetes client for pod
        discovery (default: in-cluster config, else kubeconfig). ``options``: signal timeout, expiry,
        metrics-parsing worker processes.

        ``discovery_factory`` is the public hook for another pod-discovery source: called once per ScaledObject in
        pods mode without ``podUrls`` (``podUrls`` always wins) with its validated :class:`ScalerSettings`
        (``pod_selector``, ``pod_namespace``, ``metrics_port``, ``metrics_path``), it returns a
        :class:`~scaler.discovery.PodDiscovery` (``urls() -> list[str] | None``: the metrics URLs of the ready
        pods, None when unknown, which holds the decision; ``close()``). Default: Kubernetes list + watch. For
        tests, the local demo (pods listed in a file) or pods outside Kubernetes."""
        self.clock = clock
        self.kube_api_client = kube_api_client
        self.discovery_factory = discovery_factory
        self.options = options or ServeOptions()
        self.metrics = ScalerMetrics()
        self.trackers: dict[tuple[str, str], Tracker] = {}
        self._settings_cache: dict[tuple, ScalerSettings] = {}
        self._models: dict[tuple[str, float], LatencyModel] = {}
        self.session: aiohttp.ClientSession | None = None
        self.parser = PageParser(self.options.parse_workers)
        self._janitor: asyncio.Task | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        self.parser.start()
        self._janitor = asyncio.create_task(self._expire_loop())

    async def stop(self) -> None:
        if self._janitor:
            self._janitor.cancel()
        for key in list(self.trackers):
            await self._drop(key)
        if self.session:
            await self.session.close()
        self.parser.close()

    # -- registration --------------------------------------------------------------------------------------------
    def settings(self, ref: pb.ScaledObjectRef) -> ScalerSettings:
        """Validated settings for a ScaledObjectRef (cached by content); raises MetadataError."""
        key = (ref.namespace, tuple(sorted(ref.scalerMetadata.items())))
        s = self._settings_cache.get(key)
        if s is None:
            s = parse_scaler_metadata(dict(ref.scalerMetadata), ref.namespace or "default")
            if len(self._settings_cache) > 1024:
                self._settings_cache.clear()
            self._settings_cache[key] = s
        return s

    def _model(self, spec: str) -> LatencyModel:
        p = Path(spec)
        mtime = p.stat().st_mtime if p.is_file() else 0.0
        m = self._models.get((spec, mtime))
        if m is None:
            m = self._models[(spec, mtime)] = load_latency_model(spec)
        return m

    def _discovery(self, s: ScalerSettings) -> PodDiscovery:
        if s.pod_urls:
            return StaticPods(s.pod_urls)
        if self.discovery_factory is not None:
            return self.discovery_factory(s)
        return KubernetesPods(
            s.pod_namespace, s.pod_selector, s.metrics_port, s.metrics_path, api_client=self.kube_api_client
        )

    def tracker(self, ref: pb.ScaledObjectRef) -> Tracker:
        """The tracker of a ScaledObject, registered (and its loop started) on first sight."""
        key = (ref.namespace or "default", ref.name)
        tr = self.trackers.get(key)
        # Fast path (every KEDA poll): the same ref as last time, compared as its deterministic serialization
        # (one C call) instead of re-sorting and re-validating the metadata map.
        blob = ref.SerializeToString(deterministic=True)
        if tr is not None and tr.ref_blob == blob:
            tr.last_call = self.clock()
            return tr
        s = self.settings(ref)
        if tr is not None and tr.settings != s:  # the ScaledObject was edited
            self._schedule_drop(key)
            tr = None
        if tr is None:
            model = self._model(s.latency_model)
            policy = ScalingPolicy(s, model)
            discovery: PodDiscovery | None = None
            if s.metrics_source == "pods":
                assert self.session is not None, "start() the service first"
                discovery = self._discovery(s)
                source: SignalSource = PodScrapeSource(
                    discovery, self.session, s, timeout_s=self.options.signal_timeout_s, clock=self.clock,
                    parser=self.parser,
                )
            else:
                source = PrometheusSource(s, clock=self.clock)
            tr = Tracker(key, s, source, policy, discovery, self.clock)
            self.trackers[key] = tr
            self.metrics.errors.labels(*tr.labels)  # exported as 0 from the start
            self.metrics.changes.labels(*tr.labels)
            tr.task = asyncio.create_task(self._loop(tr), name=f"kvscale-scaler-{key[0]}/{key[1]}")
            self.metrics.trackers.set(len(self.trackers))
            log.info("tracking %s/%s: pool=%s model=%s source=%s", *key, s.pool, s.model, s.metrics_source)
        tr.ref_blob = blob
        tr.last_call = self.clock()
        return tr

    def _schedule_drop(self, key: tuple[str, str]) -> None:
        tr = self.trackers.pop(key, None)
        if tr is not None:
            asyncio.get_running_loop().create_task(self._stop_tracker(tr))

    async def _drop(self, key: tuple[str, str]) -> None:
        tr = self.trackers.pop(key, None)
        if tr is not None:
            await self._stop_tracker(tr)

    async def _stop_tracker(self, tr: Tracker) -> None:
        if tr.task is not None:
            tr.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tr.task
        with contextlib.suppress(Exception):
            await tr.source.close()
        self.metrics.remove(tr.labels)
        self.metrics.trackers.set(len(self.trackers))

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.options.expire_after_s / 4))
            now = self.clock()
            for key, tr in list(self.trackers.items()):
                if now - tr.last_call > self.options.expire_after_s:
                    log.info("dropping %s/%s: no call for %.0fs", *key, now - tr.last_call)
                    await self._drop(key)

    # -- the decision loop ---------------------------------------------------------------------------------------
    async def step(self, tr: Tracker) -> Decision:
        """One read + decision for a tracker (the loop body; tests call it directly)."""
        policy = tr.policy
        try:
            sig = await tr.source.read()
            d = policy.decide(self.clock(), sig)
            tr.last_error = None
        except SignalPending as e:
            d = policy.pending(self.clock(), tr.current())
            tr.last_error = str(e)
        except SignalError as e:
            d = policy.hold(self.clock(), str(e), tr.current())
            tr.last_error = str(e)
            self.metrics.errors.labels(*tr.labels).inc()
            log.warning("%s/%s: signals: %s (holding %s)", *tr.key, e, d.desired)
        changed = tr.decision is not None and tr.decision.desired != d.desired
        self.metrics.publish(tr.labels, d, changed)
        await tr.publish(d)
        return d

    async def _loop(self, tr: Tracker) -> None:
        interval = tr.settings.signal_interval_s
        while True:
            started = self.clock()
            try:
                d = await self.step(tr)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the loop silently: log it and hold
                log.exception("%s/%s: decision failed", *tr.key)
                self.metrics.errors.labels(*tr.labels).inc()
                d = tr.policy.hold(self.clock(), "internal error", tr.current())
                await tr.publish(d)
            now = self.clock()
            if tr.last_error and d.reason == "hold-no-data":
                # a pending read (no rate yet) is retried soon: the first decision comes after ~1 s, not an interval
                wait = min(1.0, interval) - (now - started)
            else:
                wait = _next_tick(now, interval, tr.phase_s) - now
            await asyncio.sleep(max(0.0, wait))


def _next_tick(now: float, interval: float, phase: float) -> float:
    """The next time on the grid ``phase + k x interval`` at least half an interval away.

    Each ScaledObject's loop runs on its own phase (from a hash of its key), so 20 ScaledObjects registered
    together do not scrape and parse all at once every interval: bursts of parsing would delay the gRPC answers
    that share the event loop. After the first decision the gap is between 0.5 and 1.5 intervals, then exact."""
    k = math.floor((now - phase) / interval) + 1
    nxt = phase + k * interval
    return nxt + interval if nxt - now < interval / 2 else nxt


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
            raise  # unreachable: abort raises

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
        tr = await self._tracker(request, context)
        last: bool | None = None
        while True:
            if tr.active != last:
                last = tr.active
                yield pb.IsActiveResponse(result=last)
            await tr.wait_change()
            tr.last_call = self.service.clock()

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
        self.server = grpc.aio.server()
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
            self.bound_grpc_port = self.server.add_secure_port(address, creds)
        else:
            self.bound_grpc_port = self.server.add_insecure_port(address)
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

"""The scaler's core: a tracker per ScaledObject and its background decision loop (no gRPC here).

KEDA calls ``GetMetrics`` then ``IsActive`` every polling interval with no deadline of its own, so nothing on
the request path scrapes, queries or simulates: the first call for a ScaledObject registers a *tracker* (its
validated settings, a signal source, a :class:`~scaler.policy.ScalingPolicy`) whose background task reads the
signals and decides every ``signalIntervalSeconds``; RPCs (:mod:`scaler.servicer`) read the tracker's last
decision. :mod:`scaler.app` serves it all (gRPC, health, reflection, ``/metrics``).

Metric contract (``metricType: AverageValue``, KEDA's default): ``GetMetricSpec`` answers target 1 and
``GetMetrics`` the desired replica count, so the HPA computes ``ceil(desired / 1) = desired``.

A tracker nobody asked about for ``expire_after_s`` is stopped (its ScaledObject was deleted or changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp

from kvscale.engine_stats import EngineStats
from kvscale.latency import LatencyModel, load_latency_model
from protos import externalscaler_pb2 as pb
from scaler.discovery import KubernetesPods, PodDiscovery, StaticPods
from scaler.metadata import ScalerSettings, parse_scaler_metadata
from scaler.metrics import ScalerMetrics
from scaler.policy import Decision, ScalingPolicy
from scaler.signals import PageParser, PodScrapeSource, PrometheusSource, SignalError, SignalPending, SignalSource
from scaler.variants import VariantGroup

log = logging.getLogger("kvscale.scaler")


class LatencyModels:
    """Latency models by spec, each loaded once: metadata validation and the tracker share the load.

    A file is keyed by its modification time and size too, so an edited file is read again."""

    def __init__(self, max_entries: int = 64, load: Callable[[str], LatencyModel] = load_latency_model) -> None:
        self._models: dict[tuple[str, int, int], LatencyModel] = {}
        self._max = max_entries
        self._load = load

    def __call__(self, spec: str) -> LatencyModel:
        try:
            st = Path(spec).stat()
            key = (spec, st.st_mtime_ns, st.st_size)
        except OSError:  # a built-in name (or a file gone: the load says so)
            key = (spec, 0, 0)
        m = self._models.get(key)
        if m is None:
            m = self._load(spec)
            if len(self._models) >= self._max:
                self._models.clear()
            self._models[key] = m
        return m


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
        self.streams = 0  # open StreamIsActive streams: a ScaledObject watched by a stream is alive
        self.annotating: asyncio.Task | None = None  # a pod-deletion-cost update in flight
        self.annotate_error: str | None = None  # the last one's error (logged once per distinct error)
        self.own: Decision | None = None  # in a variant group: this variant's own decision, before the split
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

    async def wait_change(self, timeout_s: float | None = None) -> bool:
        """Until the active state changes (True) or ``timeout_s`` passes (False)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                return False
            return True


@dataclass
class ServeOptions:
    signal_timeout_s: float | None = None
    expire_after_s: float = 900.0
    parse_workers: int = 1  # processes parsing pods' metrics pages (0: on the event loop)


class ScalerService:
    """Trackers by ScaledObject, the decision loops, and the metrics (served by :class:`~scaler.app.ScalerApp`)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        kube_api_client: object | None = None,
        options: ServeOptions | None = None,
        discovery_factory: Callable[[ScalerSettings], PodDiscovery] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: monotonic seconds (decision times, expiry); ``wall_clock``: Unix seconds (``scheduleFloors``'
        cron windows). ``kube_api_client``: the Kubernetes client for pod
        discovery (default: in-cluster config, else kubeconfig). ``options``: signal timeout, expiry,
        metrics-parsing worker processes.

        ``discovery_factory`` is the public hook for another pod-discovery source: called once per ScaledObject in
        pods mode without ``podUrls`` (``podUrls`` always wins) with its validated :class:`ScalerSettings`
        (``pod_selector``, ``pod_namespace``, ``metrics_port``, ``metrics_path``), it returns a
        :class:`~scaler.discovery.PodDiscovery` (``urls() -> list[str] | None``: the metrics URLs of the ready
        pods, None when unknown, which holds the decision; ``close()``). Default: Kubernetes list + watch. For
        tests, the local demo (pods listed in a file) or pods outside Kubernetes."""
        self.clock, self.wall_clock = clock, wall_clock
        self.kube_api_client = kube_api_client
        self.discovery_factory = discovery_factory
        self.options = options or ServeOptions()
        self.metrics = ScalerMetrics()
        self.trackers: dict[tuple[str, str], Tracker] = {}
        self.groups: dict[tuple[str, str, str], VariantGroup] = {}  # (namespace, variantGroup, pool)
        self._settings_cache: dict[tuple, ScalerSettings] = {}
        self.models = LatencyModels()
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
            s = parse_scaler_metadata(dict(ref.scalerMetadata), ref.namespace or "default", load_model=self.models)
            if len(self._settings_cache) > 1024:
                self._settings_cache.clear()
            self._settings_cache[key] = s
        return s

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
            model = self.models(s.latency_model)  # loaded by the validation above: no second read
            policy = ScalingPolicy(s, model, wall_clock=lambda _now: self.wall_clock())
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
            self.metrics.pod_errors.labels(*tr.labels)
            self.metrics.cost_patches.labels(*tr.labels)
            self.metrics.cost_errors.labels(*tr.labels)
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
        gkey = (tr.key[0], tr.settings.variant_group, tr.settings.pool)
        if tr.settings.variant_group and gkey in self.groups:
            self.groups[gkey].forget(tr.key[1])
            if not self.groups[gkey].members:
                del self.groups[gkey]
        if tr.annotating is not None:
            tr.annotating.cancel()
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
                if tr.streams == 0 and now - tr.last_call > self.options.expire_after_s:  # open streams keep it
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
        failed = getattr(tr.source, "last_failed", 0)
        if failed:
            self.metrics.pod_errors.labels(*tr.labels).inc(failed)
            tr.source.last_failed = 0  # type: ignore[attr-defined]
        if tr.settings.variant_group:
            return await self._split_group(tr, d)
        await self._publish(tr, d)
        return d

    async def _publish(self, tr: Tracker, d: Decision) -> None:
        changed = tr.decision is not None and tr.decision.desired != d.desired
        self.metrics.publish(tr.labels, d, changed)
        await tr.publish(d)
        self._mark_deletion_costs(tr, d)

    async def _split_group(self, tr: Tracker, own: Decision) -> Decision:
        """Variant groups (:mod:`scaler.variants`): turn this member's own decision into its share of the group's
        least-cost split, and re-publish every member's share (a change of one member moves the others)."""
        s = tr.settings
        gkey = (tr.key[0], s.variant_group, s.pool)
        group = self.groups.get(gkey)
        if group is None:
            group = self.groups[gkey] = VariantGroup.for_pods(s.startup_s, s.stable_window_s)
        member = group.members.get(tr.key[1])
        if not own.ok or own.desired < 0:  # a hold: keep this member's share, do not re-split on bad data
            d = own if member is None or member.share is None else replace(own, desired=member.share)
            await self._publish(tr, d)
            return d
        tr.own = own
        ready = own.inputs.get("ready_replicas", float(max(tr.current(), 0)))
        now = self.clock()
        unschedulable = getattr(tr.discovery, "unschedulable", None)  # a discovery_factory's object may lack it
        stuck = unschedulable() if callable(unschedulable) else None
        # a scheduled floor of this variant is its minimum while the window is active: the split counts it
        floor = max(s.min_replicas, tr.policy.floor(now))
        split = group.observe(tr.key[1], now, own, ready=int(ready), cost_per_hour=s.cost_per_hour,
                              min_replicas=floor, max_replicas=s.max_replicas, unschedulable=stuck)
        unavailable = set(group.unavailable(now))
        mine = own
        for name in group.members:
            other = self.trackers.get((tr.key[0], name))
            if other is None or other.own is None:
                continue
            base = other.own
            d = replace(base, desired=split.counts[name], reason="variant-split", inputs={
                **base.inputs, "own_desired": float(base.desired), "variant_requirement": split.requirement,
                "variant_group_cost_per_hour": split.cost_per_hour,
                "variant_unavailable": 1.0 if name in unavailable else 0.0,
                "unschedulable_pods": float(group.members[name].unschedulable),
                "variant_split_exact": 1.0 if split.method in ("exact", "kept") else 0.0})  # fmt: skip
            if other is tr:
                mine = d
            await self._publish(other, d)
        log.debug("%s/%s: variant group %s split %s (%s, %.2f/h)", *tr.key, s.variant_group, split.counts,
                  split.method, split.cost_per_hour)  # fmt: skip
        return mine

    def _mark_deletion_costs(self, tr: Tracker, d: Decision) -> None:
        """Drain-safe scale-down: while the decision asks for fewer pods than are ready, keep each pod's
        pod-deletion-cost at its running + waiting requests (from this read), so the ReplicaSet deletes the idlest
        pods first. In the background (API calls block); one update at a time per ScaledObject."""
        if not tr.settings.pod_deletion_cost or not hasattr(tr.discovery, "set_deletion_costs"):
            return
        stats: dict[str, EngineStats] = getattr(tr.source, "last_stats", {})
        if d.desired < 0 or not stats or d.desired >= len(stats) or tr.annotating is not None:
            return
        costs = {url: min(int(st.running + st.waiting), 2**31 - 1) for url, st in stats.items()}

        async def patch() -> None:
            try:
                n = await asyncio.to_thread(tr.discovery.set_deletion_costs, costs)  # type: ignore[union-attr]
                self.metrics.cost_patches.labels(*tr.labels).inc(n)
            except Exception as e:  # RBAC without patch, API server down: the scale-down still happens
                self.metrics.cost_errors.labels(*tr.labels).inc()
                if str(e) != tr.annotate_error:
                    log.warning("%s/%s: could not set pod-deletion-cost: %s", *tr.key, str(e).splitlines()[0])
                tr.annotate_error = str(e)
            finally:
                tr.annotating = None

        tr.annotating = asyncio.create_task(patch(), name=f"kvscale-deletion-cost-{tr.key[0]}/{tr.key[1]}")

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

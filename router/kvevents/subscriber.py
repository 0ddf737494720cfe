"""One ZMQ SUB subscriber per backend feeding the shared :class:`~router.kvevents.index.KVBlockIndex`.

Sequence handling (vLLM numbers batches 0, 1, 2, ... per publisher):

* next expected sequence: apply;
* a gap: ask the backend's replay ROUTER socket (when configured) for everything from the first missing sequence
  and apply it in order; if there is no replay socket, it does not answer in time, or its buffer no longer holds
  the missing batches, the backend's index entries are cleared (an index that misses removals would route to
  blocks that are gone; one that is cleared only costs hits until new events arrive);
* a sequence lower than the last one seen live: the publisher restarted (pod restart) — clear, then start over
  (replaying from 0 when possible);
* a ZMQ disconnect (socket monitor) also clears: the pod went away and its cache state is unknown. ZMQ reconnects
  by itself (reconnect interval 100 ms, backing off to 2 s), so a pod restarted at the same address resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvscale.kv_events import END_SEQ, EventBatch, KVEventDecodeError, decode_message
from router.kvevents.index import KVBlockIndex

log = logging.getLogger("kvscale.router.kvevents")


@dataclass(frozen=True)
class EventSource:
    """Where a backend publishes: ``tcp://host:port`` of its PUB socket, topic, optional replay ROUTER socket."""

    endpoint: str
    topic: str = ""
    replay_endpoint: str | None = None


@dataclass
class SubscriberStats:
    batches: int = 0
    decode_errors: int = 0
    gaps: int = 0
    gaps_replayed: int = 0
    gaps_cleared: int = 0  # gaps we could not fill: the backend's entries were dropped
    restarts: int = 0  # sequence went backwards
    disconnects: int = 0
    last_batch_at: float | None = None


class KVEventSubscriber:
    """Subscribe to one backend's KV events and keep ``index`` up to date for it. Start with :meth:`start`."""

    def __init__(
        self,
        backend: str,
        source: EventSource,
        index: KVBlockIndex,
        ctx: zmq.asyncio.Context,
        *,
        replay_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.source = source
        self.index = index
        self.ctx = ctx
        self.replay_timeout_s = replay_timeout_s
        self.clock = clock
        self.stats = SubscriberStats()
        self.last_applied: int | None = None  # sequence of the last batch applied to the index
        self._last_live: int | None = None  # last sequence received on the SUB socket
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: zmq.asyncio.Socket | None = None
        self.connected = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, self.source.topic.encode())
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.source.endpoint)
        self._sub = sub
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read(sub), name=f"kvevents-{self.backend}"),
            loop.create_task(self._watch(monitor), name=f"kvevents-monitor-{self.backend}"),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disable_monitor()
            self._sub.close(linger=0)
            self._sub = None

    # -- connection state --------------------------------------------------------------------------------------------
    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                msg = parse_monitor_message(await monitor.recv_multipart())
                if msg["event"] == zmq.EVENT_CONNECTED:
                    self.connected.set()
                elif msg["event"] == zmq.EVENT_DISCONNECTED:
                    self.connected.clear()
                    self.stats.disconnects += 1
                    log.info("kv events of %s: publisher disconnected; clearing its index entries", self.backend)
                    self._reset()
        finally:
            monitor.close(linger=0)

    def _reset(self) -> None:
        self.index.clear(self.backend)
        self.last_applied = None
        self._last_live = None

    # -- messages --------------------------------------------------------------------------------------------------
    async def _read(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sub.recv_multipart()
            try:
                _, seq, batch = decode_message(frames)
            except KVEventDecodeError as e:
                self.stats.decode_errors += 1
                log.warning("kv events of %s: undecodable message: %s", self.backend, e)
                continue
            await self.on_message(seq, batch)

    async def on_message(self, seq: int, batch: EventBatch) -> None:
        """Handle one live batch (public so tests can drive sequence logic directly with real decoded batches)."""
        if self._last_live is not None and seq <= self._last_live:
            self.stats.restarts += 1
            log.info("kv events of %s: sequence went back %d -> %d (publisher restarted)", self.backend,
                     self._last_live, seq)  # fmt: skip
            self._reset()
        self._last_live = seq
        if self.last_applied is not None and seq <= self.last_applied:
            return  # already applied from a replay
        expected = 0 if self.last_applied is None else self.last_applied + 1
        had_history = self.last_applied is not None
        if seq > expected and (had_history or self.source.replay_endpoint):
            # A gap (or, on the first batch we see, the history before it when a replay socket can fill it).
            self.stats.gaps += had_history
            filled = await self._replay(expected, seq)
            if filled:
                self.stats.gaps_replayed += had_history
            elif had_history:
                self.stats.gaps_cleared += 1
                log.info("kv events of %s: gap %d..%d not recoverable; clearing", self.backend, expected, seq - 1)
                self.index.clear(self.backend)
            if self.last_applied is not None and seq <= self.last_applied:
                return
        self._apply(seq, batch)

    def _apply(self, seq: int, batch: EventBatch) -> None:
        for ev in batch.events:
            self.index.apply(self.backend, ev)
        self.last_applied = seq
        self.stats.batches += 1
        self.stats.last_batch_at = self.clock()

    async def _replay(self, start: int, until: int) -> bool:
        """Apply batches ``start .. until-1`` from the replay socket; True when all of them were applied."""
        endpoint = self.source.replay_endpoint
        if not endpoint:
            return False
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        got: list[tuple[int, EventBatch]] = []
        try:
            dealer.connect(endpoint)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            deadline = self.clock() + self.replay_timeout_s
            while True:
                left = deadline - self.clock()
                if left <= 0 or not await dealer.poll(int(left * 1000)):
                    log.info("kv events of %s: replay from %d timed out", self.backend, start)
                    return False
                frames = await dealer.recv_multipart()
                if len(frames) == 4 and frames[2] == END_SEQ:
                    break
                try:
                    _, seq, batch = decode_message(frames[1:])
                except KVEventDecodeError:
                    self.stats.decode_errors += 1
                    return False
                if seq < until:
                    got.append((seq, batch))
        finally:
            dealer.close(linger=0)
        got.sort(key=lambda x: x[0])
        # If the publisher's buffer starts after `start`, apply what we have only when nothing was applied before
        # (a fresh subscriber learns what it can); otherwise the history is broken.
        if not got or (got[0][0] != start and self.last_applied is not None):
            return False
        for seq, batch in got:
            if self.last_applied is not None and seq != self.last_applied + 1:
                return False
            self._apply(seq, batch)
        return bool(got) and got[-1][0] == until - 1

"""KV-event publisher with vLLM's ZMQ wire format and replay socket (see ``kvscale.kv_events``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from kvscale.kv_events import END_SEQ, EventBatch, KVEvent, encode_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's ``--kv-events-config`` JSON (the fields the simulator honours; others are accepted and ignored)."""

    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    topic: str = ""

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--kv-events-config: invalid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError("--kv-events-config: expected a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in raw.items() if k in known}
        cfg = cls(**kw)
        if cfg.publisher not in ("null", "zmq"):
            raise ValueError(f"--kv-events-config: publisher must be 'zmq' or 'null', got {cfg.publisher!r}")
        if cfg.enable_kv_cache_events and cfg.publisher == "null":
            cfg = cls(**{**kw, "publisher": "zmq"})  # vLLM defaults the publisher to zmq when events are enabled
        return cfg

    @property
    def active(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"


class ZmqKVEventPublisher:
    """PUB socket (three-frame messages) plus an optional ROUTER replay socket served by an asyncio task."""

    def __init__(self, config: KVEventsConfig, data_parallel_rank: int = 0) -> None:
        self.config = config
        self.dp_rank = data_parallel_rank
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._bind_or_connect(self._pub, config.endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        if config.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.bind(config.replay_endpoint)
        self._topic = config.topic.encode()
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._task: asyncio.Task[None] | None = None
        self.published = 0

    @staticmethod
    def _bind_or_connect(sock: zmq.Socket, endpoint: str) -> None:
        if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)

    def start(self) -> None:
        if self._replay is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: list[KVEvent]) -> None:
        if not events:
            return
        payload = encode_batch(EventBatch(time.time(), events, self.dp_rank))
        seq = self._seq
        self._seq += 1
        with contextlib.suppress(zmq.Again):  # PUB drops at the high-water mark, as vLLM's does
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        self._buffer.append((seq, payload))
        self.published += 1

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                log.warning("invalid KV-event replay request (%d frames)", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, buf in list(self._buffer):
                if seq >= start_seq:
                    await self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), buf))
            await self._replay.send_multipart((client, b"", b"", END_SEQ, b""))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()

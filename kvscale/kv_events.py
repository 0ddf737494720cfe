"""vLLM KV-cache events: types, msgpack wire encoding and decoding (shared by simulator and router).

Wire format of vLLM 0.32 (``vllm/distributed/kv_events.py``, ZMQ publisher):

* ZMQ PUB, one message per batch, three frames: ``topic`` (utf-8), ``seq`` (8-byte big-endian), ``payload``.
* ``payload`` = msgpack array ``[ts, [event, ...], data_parallel_rank]`` (msgspec ``array_like`` struct).
* each event = msgpack map tagged by ``"type"``: ``BlockStored`` (block_hashes, parent_block_hash, token_ids,
  block_size, lora_id, medium, lora_name; optional fields omitted when unset), ``BlockRemoved`` (block_hashes,
  medium), ``AllBlocksCleared``. Block hashes are 64-bit ints by default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``)
  or bytes.
* Replay: a ROUTER socket; a client sends an 8-byte big-endian start sequence and receives
  ``[topic, seq, payload]`` messages, then an end marker whose seq is -1 (signed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

BlockHash = int | bytes
END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # optional fields we carry but do not interpret


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[BlockHash]
    medium: str | None = "GPU"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class EventBatch:
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


class KVEventDecodeError(ValueError):
    """A KV-event message does not follow vLLM's format."""


def _event_to_wire(ev: KVEvent) -> dict[str, Any]:
    if isinstance(ev, BlockStored):
        return {
            "type": "BlockStored",
            "block_hashes": ev.block_hashes,
            "parent_block_hash": ev.parent_block_hash,
            "token_ids": ev.token_ids,
            "block_size": ev.block_size,
            "lora_id": ev.lora_id,
            "medium": ev.medium,
            "lora_name": ev.lora_name,
            **ev.extra,
        }
    if isinstance(ev, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": ev.block_hashes, "medium": ev.medium, **ev.extra}
    return {"type": "AllBlocksCleared"}


def encode_batch(batch: EventBatch) -> bytes:
    wire: list[Any] = [batch.ts, [_event_to_wire(e) for e in batch.events]]
    if batch.data_parallel_rank is not None:
        wire.append(batch.data_parallel_rank)
    return msgpack.packb(wire, use_bin_type=True)


_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name")


def _event_from_wire(obj: Any) -> KVEvent:
    # vLLM <= 0.11 encoded events as tagged arrays; 0.32 as tagged maps. Accept both.
    if isinstance(obj, list | tuple) and obj and isinstance(obj[0], str):
        tag, rest = obj[0], list(obj[1:])
        if tag == "BlockStored":
            obj = dict(zip(("type", *_STORED_FIELDS), [tag, *rest], strict=False))
        elif tag == "BlockRemoved":
            obj = dict(zip(("type", "block_hashes", "medium"), [tag, *rest], strict=False))
        else:
            obj = {"type": tag}
    if not isinstance(obj, dict):
        raise KVEventDecodeError(f"event must be a map or tagged array, got {type(obj).__name__}")
    kind = obj.get("type")
    try:
        if kind == "BlockStored":
            extra = {k: v for k, v in obj.items() if k != "type" and k not in _STORED_FIELDS}
            return BlockStored(
                block_hashes=list(obj["block_hashes"]),
                parent_block_hash=obj.get("parent_block_hash"),
                token_ids=list(obj["token_ids"]),
                block_size=int(obj["block_size"]),
                lora_id=obj.get("lora_id"),
                medium=obj.get("medium"),
                lora_name=obj.get("lora_name"),
                extra=extra,
            )
        if kind == "BlockRemoved":
            extra = {k: v for k, v in obj.items() if k not in ("type", "block_hashes", "medium")}
            return BlockRemoved(block_hashes=list(obj["block_hashes"]), medium=obj.get("medium"), extra=extra)
    except (KeyError, TypeError, ValueError) as e:
        raise KVEventDecodeError(f"malformed {kind} event: {e!r}") from e
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    raise KVEventDecodeError(f"unknown event type {kind!r}")


def decode_batch(payload: bytes) -> EventBatch:
    try:
        wire = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise KVEventDecodeError(f"payload is not msgpack: {e}") from e
    if not isinstance(wire, list) or len(wire) < 2 or not isinstance(wire[1], list):
        raise KVEventDecodeError("batch must be [ts, [events], data_parallel_rank?]")
    dp = wire[2] if len(wire) > 2 else None
    ts = wire[0]
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise KVEventDecodeError(f"batch timestamp must be a number, got {type(ts).__name__}")
    return EventBatch(ts=float(ts), events=[_event_from_wire(e) for e in wire[1]], data_parallel_rank=dp)


def decode_message(frames: list[bytes]) -> tuple[str, int, EventBatch]:
    """Decode one ZMQ message ``[topic, seq, payload]`` into (topic, seq, batch)."""
    if len(frames) != 3:
        raise KVEventDecodeError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != 8:
        raise KVEventDecodeError(f"sequence frame must be 8 bytes, got {len(seq)}")
    return topic.decode("utf-8", "replace"), int.from_bytes(seq, "big", signed=True), decode_batch(payload)


def encode_message(topic: str, seq: int, batch: EventBatch) -> list[bytes]:
    return [topic.encode(), seq.to_bytes(8, "big"), encode_batch(batch)]

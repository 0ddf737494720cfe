"""LogHistogram quantiles, chained block hashes and the vLLM KV-event wire format."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from kvscale.hashing import ROOT_HASH, block_hashes
from kvscale.histogram import LogHistogram
from kvscale.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEventDecodeError,
    decode_batch,
    decode_message,
    encode_batch,
    encode_message,
)

# -- LogHistogram -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantiles_match_numpy_within_3_percent(seed: int) -> None:
    data = np.random.default_rng(seed).lognormal(mean=math.log(0.03), sigma=1.2, size=20_000)
    h = LogHistogram()
    h.add_many(data)
    assert h.total == 20_000
    assert h.mean == pytest.approx(data.mean(), rel=1e-9)
    for q in (0.01, 0.1, 0.5, 0.9, 0.99, 0.999):
        assert h.quantile(q) == pytest.approx(np.percentile(data, 100 * q), rel=0.03), q


def test_add_and_add_many_fill_the_same_buckets() -> None:
    data = np.random.default_rng(5).lognormal(-3, 2, 5000)  # wide: some values underflow
    one, many = LogHistogram(), LogHistogram()
    for v in data:
        one.add(float(v))
    many.add_many(data)
    np.testing.assert_array_equal(one.counts, many.counts)
    assert one.total == many.total and one.sum == pytest.approx(many.sum)


def test_weighted_adds_equal_repeated_adds() -> None:
    weighted, repeated = LogHistogram(), LogHistogram()
    for v, w in [(0.01, 3), (0.2, 1), (0.05, 6)]:
        weighted.add(v, w)
        for _ in range(w):
            repeated.add(v)
    np.testing.assert_array_equal(weighted.counts, repeated.counts)
    assert weighted.total == repeated.total == 10
    assert weighted.mean == pytest.approx((0.03 + 0.2 + 0.3) / 10)
    for q in (0.1, 0.3, 0.5, 0.95):
        assert weighted.quantile(q) == repeated.quantile(q)
    # the median sits in the 0.05 bucket because of its weight
    assert weighted.quantile(0.5) == pytest.approx(0.05, rel=0.03)

    batch = LogHistogram()
    batch.add_many([0.01, 0.2], weight=2.5)
    assert batch.total == 5.0 and batch.sum == pytest.approx(2.5 * 0.21)
    weighted.add(1.0, 0)  # non-positive weights are ignored
    weighted.add_many([1.0], weight=-1)
    assert weighted.total == 10


def test_merge_equals_adding_everything_to_one_histogram() -> None:
    rng = np.random.default_rng(9)
    a, b = rng.lognormal(-4, 1, 3000), rng.lognormal(-2, 0.5, 2000)
    ha, hb, hall = LogHistogram(), LogHistogram(), LogHistogram()
    ha.add_many(a)
    hb.add_many(b)
    hall.add_many(np.concatenate([a, b]))
    ha.merge(hb)
    np.testing.assert_array_equal(ha.counts, hall.counts)
    assert ha.total == hall.total and ha.sum == pytest.approx(hall.sum)
    assert ha.quantile(0.5) == hall.quantile(0.5)
    with pytest.raises(ValueError, match="different buckets"):
        ha.merge(LogHistogram(per_decade=50))


def test_empty_histogram_and_out_of_range_values() -> None:
    h = LogHistogram(lo=1e-3, hi=1e2)
    assert math.isnan(h.quantile(0.5)) and math.isnan(h.mean)
    with pytest.raises(ValueError):
        h.quantile(1.5)
    h.add(1e-6)
    h.add(1e6)
    assert h.quantile(0.25) == 1e-3  # underflow reads as lo
    assert h.quantile(0.99) == 1e2  # overflow reads as hi


# -- block hashes -------------------------------------------------------------------------------------------------

TOKENS: list[int] = np.random.default_rng(3).integers(100, 30000, 100).tolist()


def test_only_full_blocks_are_hashed() -> None:
    assert len(block_hashes(TOKENS, 16)) == 6
    assert block_hashes(TOKENS[:96], 16) == block_hashes(TOKENS, 16)
    assert block_hashes(TOKENS[:15], 16) == []
    with pytest.raises(ValueError):
        block_hashes(TOKENS, 0)


@pytest.mark.parametrize("cut", [0, 16, 32, 48, 64, 80, 96])
def test_incremental_extension_equals_hashing_everything_at_once(cut: int) -> None:
    full = block_hashes(TOKENS, 16)
    head = block_hashes(TOKENS[:cut], 16)
    parent = head[-1] if head else ROOT_HASH
    # either slicing the tail ...
    assert head + block_hashes(TOKENS[cut:], 16, parent=parent) == full
    # ... or pointing start_block into the whole list
    assert head + block_hashes(TOKENS, 16, parent=parent, start_block=cut // 16) == full
    # numpy input hashes the same as a list
    assert block_hashes(np.array(TOKENS), 16) == full


def test_equal_prefixes_give_equal_hashes_and_a_changed_token_changes_that_block_and_all_later() -> None:
    other = TOKENS[:40] + [t + 1 for t in TOKENS[40:]]  # same first 40 tokens
    a, b = block_hashes(TOKENS, 16), block_hashes(other, 16)
    assert a[:2] == b[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))

    changed = list(TOKENS)
    changed[50] += 1  # block 3
    c = block_hashes(changed, 16)
    assert c[:3] == a[:3]
    assert all(x != y for x, y in zip(a[3:], c[3:], strict=True))


def test_hashes_are_chained_not_per_block() -> None:
    # the same block content after different prefixes hashes differently
    block = TOKENS[:16]
    assert block_hashes(TOKENS[16:32] + block, 16)[1] != block_hashes(TOKENS[32:48] + block, 16)[1]
    assert block_hashes(block, 16, parent=1) != block_hashes(block, 16, parent=2)


def test_extra_key_changes_every_hash() -> None:
    plain = block_hashes(TOKENS, 16)
    lora = block_hashes(TOKENS, 16, extra=b"adapter-a")
    assert all(x != y for x, y in zip(plain, lora, strict=True))
    assert block_hashes(TOKENS, 16, extra=b"adapter-a") == lora  # deterministic
    assert block_hashes(TOKENS, 16, extra=b"adapter-b") != lora
    assert all(0 <= h < 2**64 for h in plain)


# -- KV events ----------------------------------------------------------------------------------------------------

EVENTS = [
    BlockStored([11, 22], None, list(range(32)), 16, lora_id=None, medium="GPU", lora_name=None),
    BlockStored([b"\x01" * 32], b"\x02" * 32, list(range(16)), 16, lora_id=3, medium="CPU", lora_name="sql"),
    BlockStored([33], 22, list(range(16)), 16, extra={"group_idx": 1}),
    BlockRemoved([11, 22], "GPU"),
    BlockRemoved([b"\x03" * 32], None, extra={"why": "evict"}),
    AllBlocksCleared(),
]


@pytest.mark.parametrize("dp_rank", [None, 0, 3])
def test_encode_decode_round_trip_of_every_event_type(dp_rank: int | None) -> None:
    batch = EventBatch(1234.5, list(EVENTS), dp_rank)
    frames = encode_message("kv@pod-1", 42, batch)
    assert len(frames) == 3 and frames[1] == (42).to_bytes(8, "big")
    topic, seq, decoded = decode_message(frames)
    assert (topic, seq) == ("kv@pod-1", 42)
    assert decoded == batch
    assert decode_batch(encode_batch(batch)) == batch


def test_wire_format_is_vllm_tagged_maps_in_an_array() -> None:
    wire = msgpack.unpackb(encode_batch(EventBatch(1.0, [EVENTS[0], EVENTS[3], EVENTS[5]], 0)))
    assert wire[0] == 1.0 and wire[2] == 0
    stored, removed, cleared = wire[1]
    assert stored == {
        "type": "BlockStored",
        "block_hashes": [11, 22],
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    assert removed == {"type": "BlockRemoved", "block_hashes": [11, 22], "medium": "GPU"}
    assert cleared == {"type": "AllBlocksCleared"}


def test_decodes_vllm_0_11_tagged_arrays() -> None:
    payload = msgpack.packb(
        [
            7.5,
            [
                ["BlockStored", [5, 6], 4, list(range(32)), 16, None, "GPU"],
                ["BlockStored", [7], None, list(range(16)), 16],  # older: no lora_id/medium
                ["BlockRemoved", [5], "GPU"],
                ["AllBlocksCleared"],
            ],
        ]
    )
    batch = decode_batch(payload)
    assert batch.ts == 7.5 and batch.data_parallel_rank is None
    assert batch.events == [
        BlockStored([5, 6], 4, list(range(32)), 16, lora_id=None, medium="GPU", lora_name=None),
        BlockStored([7], None, list(range(16)), 16, lora_id=None, medium=None, lora_name=None),
        BlockRemoved([5], "GPU"),
        AllBlocksCleared(),
    ]


def test_negative_sequence_numbers_decode_signed() -> None:
    frames = [b"t", (-1).to_bytes(8, "big", signed=True), encode_batch(EventBatch(0.0, []))]
    assert decode_message(frames)[1] == -1


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x93\x01",  # truncated array
        b"not msgpack at all \xff\xfe",
        msgpack.packb({"ts": 1.0, "events": []}),  # not an array
        msgpack.packb([1.0]),  # no event list
        msgpack.packb([1.0, "events"]),
        msgpack.packb([1.0, [{"type": "BlockEvicted", "block_hashes": [1]}]]),  # unknown type
        msgpack.packb([1.0, [["BlockEvicted", [1]]]]),  # unknown tagged type
        msgpack.packb([1.0, [{"block_hashes": [1]}]]),  # no type
        msgpack.packb([1.0, [42]]),  # an event that is neither map nor tagged array
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "block_size": 16}]]),  # no token_ids
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": 1, "token_ids": [], "block_size": 16}]]),
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [], "block_size": "x"}]]),
        msgpack.packb([1.0, [{"type": "BlockRemoved"}]]),
    ],
)
def test_garbage_payloads_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(payload)


# Regression: a non-numeric timestamp is a KVEventDecodeError, not a stray TypeError/ValueError.
@pytest.mark.parametrize("ts", [None, "soon", [1]])
def test_a_non_numeric_timestamp_raises_decode_error(ts: object) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(msgpack.packb([ts, []]))


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"topic", (1).to_bytes(8, "big")],
        [b"topic", (1).to_bytes(8, "big"), encode_batch(EventBatch(0.0, [])), b"extra"],
        [b"topic", b"\x01", encode_batch(EventBatch(0.0, []))],  # seq must be 8 bytes
        [b"topic", (1).to_bytes(8, "big"), b"\xc1"],
    ],
)
def test_malformed_messages_raise_decode_error(frames: list[bytes]) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_message(frames)

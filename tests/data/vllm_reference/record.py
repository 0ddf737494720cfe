"""Record vLLM's wire behaviour into this directory (the reference the simulator is checked against).

Usage, from the repository root::

    .venv/bin/python tests/data/vllm_reference/record.py                 # starts vLLM CPU on the tiny model
    .venv/bin/python tests/data/vllm_reference/record.py --url http://127.0.0.1:8000 \\
        --kv-events tcp://127.0.0.1:5557                                  # records from a running server

It writes ``models.json``, ``completion.json``, ``chat.json``, ``completion_stream.txt`` and
``chat_stream.txt`` (raw SSE bytes), ``errors.json``, ``kv_events.json`` and ``metrics.txt``. Requests use
``temperature=0`` so the generated text is reproducible for the same model; ids, ``created`` and timestamps
differ on every run. The server this script starts itself is the one the integration tests use:
``--block-size 32 --num-gpu-blocks-override 256 --max-model-len 1024 --enable-prefix-caching
--enable-prompt-tokens-details`` and ZMQ KV events.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import os
import pickle
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
MODEL = "tiny-llama"
NUM_GPU_BLOCKS = 256  # as in tests/integration/conftest.py


# --------------------------------------------------------------------------------------------------- HTTP
class Http:
    """A tiny HTTP client over http.client that returns exact bytes, status and headers."""

    def __init__(self, base_url: str) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict[str, Any] | None = None,
        content_type: str | None = "application/json",
        timeout: float = 120.0,
    ) -> tuple[int, dict[str, str], bytes]:
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        headers = {"Content-Type": content_type} if (content_type and body is not None) else {}
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, _, data = self.request("POST", path, body)
        if status != 200:
            raise RuntimeError(f"POST {path} -> {status}: {data[:500]!r}")
        return json.loads(data)

    def abort_stream(self, path: str, body: dict[str, Any], read_bytes: int = 200) -> bytes:
        """Start a streaming request, read a little, then drop the connection (vLLM aborts the request)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        conn.request(
            "POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        data = resp.read1(read_bytes) if hasattr(resp, "read1") else resp.read(read_bytes)
        conn.close()  # closes the socket: the server sees the client go away
        return data


def _exchange(http: Http, method: str, path: str, body: Any, **kw: Any) -> dict[str, Any]:
    status, headers, data = http.request(method, path, body, **kw)
    record: dict[str, Any] = {"method": method, "path": path}
    if body is not None:
        record["request"] = body
    record["status"] = status
    record["content_type"] = headers.get("content-type")
    try:
        record["body"] = json.loads(data)
    except ValueError:
        record["body"] = data.decode("utf-8", errors="replace")
    return record


# --------------------------------------------------------------------------------------------- msgpack shape
def describe_msgpack(buf: bytes) -> Any:
    """Describe the msgpack *wire types* in ``buf`` (which marker bytes encode what), for the report.

    Maps become ``{"map(N)": [[key, type], ...]}`` in wire order; arrays of one repeated type are collapsed.
    """
    value, end = _describe(buf, 0)
    assert end == len(buf), (end, len(buf))
    return value


def _describe(b: bytes, i: int) -> tuple[Any, int]:
    m = b[i]
    if m <= 0x7F:
        return "positive_fixint", i + 1
    if 0x80 <= m <= 0x8F:
        return _describe_map(b, i + 1, m & 0x0F, "fixmap")
    if 0x90 <= m <= 0x9F:
        return _describe_array(b, i + 1, m & 0x0F, "fixarray")
    if 0xA0 <= m <= 0xBF:
        n = m & 0x1F
        return f"fixstr({b[i + 1 : i + 1 + n].decode()!r})", i + 1 + n
    if m >= 0xE0:
        return "negative_fixint", i + 1
    simple = {0xC0: ("nil", 0), 0xC2: ("false", 0), 0xC3: ("true", 0), 0xCA: ("float32", 4)}
    simple |= {0xCB: ("float64", 8), 0xCC: ("uint8", 1), 0xCD: ("uint16", 2), 0xCE: ("uint32", 4)}
    simple |= {0xCF: ("uint64", 8), 0xD0: ("int8", 1), 0xD1: ("int16", 2), 0xD2: ("int32", 4)}
    simple |= {0xD3: ("int64", 8)}
    if m in simple:
        name, size = simple[m]
        return name, i + 1 + size
    sized = {0xC4: ("bin8", 1), 0xC5: ("bin16", 2), 0xC6: ("bin32", 4), 0xD9: ("str8", 1)}
    sized |= {0xDA: ("str16", 2), 0xDB: ("str32", 4)}
    if m in sized:
        name, size = sized[m]
        n = int.from_bytes(b[i + 1 : i + 1 + size], "big")
        return f"{name}(len={n})", i + 1 + size + n
    if m in (0xDC, 0xDD):
        size = 2 if m == 0xDC else 4
        n = int.from_bytes(b[i + 1 : i + 1 + size], "big")
        return _describe_array(b, i + 1 + size, n, "array16" if m == 0xDC else "array32")
    if m in (0xDE, 0xDF):
        size = 2 if m == 0xDE else 4
        n = int.from_bytes(b[i + 1 : i + 1 + size], "big")
        return _describe_map(b, i + 1 + size, n, "map16" if m == 0xDE else "map32")
    raise ValueError(f"msgpack marker 0x{m:02x} at {i} not handled")


def _describe_array(b: bytes, i: int, n: int, kind: str) -> tuple[Any, int]:
    items = []
    for _ in range(n):
        item, i = _describe(b, i)
        items.append(item)
    if n > 3 and all(isinstance(x, str) for x in items):
        counts = Counter(items)
        items = [f"{t} x{c}" for t, c in counts.items()]
    return {f"{kind}({n})": items}, i


def _describe_map(b: bytes, i: int, n: int, kind: str) -> tuple[Any, int]:
    pairs = []
    for _ in range(n):
        key, i = _describe(b, i)
        value, i = _describe(b, i)
        pairs.append([key, value])
    return {f"{kind}({n})": pairs}, i


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"__bytes_hex__": obj.hex()}
    if isinstance(obj, list | tuple):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------------ KV events
class KvEventCollector:
    """Subscribes to vLLM's ZMQ KV-event publisher in a thread; ``take()`` returns what arrived since."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(endpoint)
        self._frames: list[tuple[float, list[bytes]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.5)  # slow joiner

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sub.poll(100):
                frames = self._sub.recv_multipart()
                with self._lock:
                    self._frames.append((time.time(), frames))

    def take(self, settle: float = 0.6) -> list[list[bytes]]:
        time.sleep(settle)
        with self._lock:
            frames, self._frames = self._frames, []
        return [f for _, f in frames]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sub.close()
        self._ctx.term()


class HashChecker:
    """Recomputes vLLM's default block hashes (sha256 over pickle, chained from NONE_HASH).

    ``lora_paths`` maps a LoRA name to the adapter path vLLM loaded it from: the path is part of the hashed
    extra keys but not of the published event, so LoRA blocks cannot be checked without it.
    """

    def __init__(self, seed: str | None = None, lora_paths: dict[str, str] | None = None) -> None:
        self.seed = seed if seed is not None else os.environ.get("PYTHONHASHSEED", "vllm-none-hash")
        self.none_hash = self.sha256_pickle(self.seed)
        self.lora_paths = lora_paths or {}
        self.full: dict[int, bytes] = {}  # published 64-bit value -> full 32-byte digest

    @staticmethod
    def sha256_pickle(obj: Any) -> bytes:
        return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()

    @staticmethod
    def external(digest: bytes) -> int:
        return int.from_bytes(digest, "big") & ((1 << 64) - 1)

    def tagged_extra_keys(self, keys: list[Any] | None, lora_name: str | None) -> tuple[Any, ...] | None:
        """Rebuild the hashed (tagged) extra keys from the published (untagged) ones.

        Hashed order: ``("lora", name, path)``, then ``("mm", identifier, offset)`` pairs, then
        ``("cache_salt", salt)`` (first block only), then ``("prompt_embeds", digest)``.
        """
        if keys is None:
            return None
        rest = list(keys)
        tagged: list[tuple[Any, ...]] = []
        if lora_name is not None:
            rest.pop(0)
            tagged.append(("lora", lora_name, self.lora_paths[lora_name]))
        for key in rest:
            if isinstance(key, list | tuple):
                tagged.append(("mm", *key))
            elif isinstance(key, str):
                tagged.append(("cache_salt", key))
            else:
                tagged.append(("prompt_embeds", key))
        return tuple(tagged)

    def check(self, event: dict[str, Any]) -> str:
        parent_pub = event["parent_block_hash"]
        if parent_pub is None:
            parent = self.none_hash
        elif parent_pub in self.full:
            parent = self.full[parent_pub]
        else:
            return "parent not seen: cannot recompute"
        lora_name = event.get("lora_name")
        if lora_name is not None and lora_name not in self.lora_paths:
            return "LoRA block: the adapter path is hashed but not published, cannot recompute"
        size, tokens = event["block_size"], event["token_ids"]
        extra_keys = event.get("extra_keys") or [None] * len(event["block_hashes"])
        for k, published in enumerate(event["block_hashes"]):
            keys = self.tagged_extra_keys(extra_keys[k], lora_name)
            digest = self.sha256_pickle((parent, tuple(tokens[k * size : (k + 1) * size]), keys))
            if self.external(digest) != published:
                return f"mismatch at block {k}"
            self.full[published] = digest
            parent = digest
        return "ok: sha256(pickle((parent, tuple(token_ids), extra_keys))), low 64 bits"


def decode_frames(frames: list[list[bytes]], checker: HashChecker, keep_hex: bool = True) -> list[dict]:
    import msgpack

    out = []
    for parts in frames:
        entry: dict[str, Any] = {"n_frames": len(parts)}
        if len(parts) == 3:
            topic, seq, payload = parts
            entry["topic"] = topic.decode(errors="replace")
            entry["seq_hex"] = seq.hex()
            entry["seq"] = int.from_bytes(seq, "big", signed=True)
            entry["payload_len"] = len(payload)
            if keep_hex:
                entry["payload_hex"] = payload.hex()
            entry["payload_wire_types"] = describe_msgpack(payload)
            batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            entry["decoded"] = _jsonable(batch)
            checks = []
            for event in batch[1]:
                if isinstance(event, dict) and event.get("type") == "BlockStored":
                    checks.append(checker.check(event))
            if checks:
                entry["hash_check"] = checks
        out.append(entry)
    return out


def offline_encodings() -> dict[str, Any]:
    """Encode sample events with vLLM's own msgspec classes (for event types hard to trigger over HTTP)."""
    try:
        import msgspec
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
    except Exception as exc:  # vLLM missing: leave it out
        return {"skipped": f"vllm not importable: {exc}"}
    enc = msgspec.msgpack.Encoder()
    samples = {
        "AllBlocksCleared": KVEventBatch(ts=1.5, events=[AllBlocksCleared()], data_parallel_rank=0),
        "BlockRemoved": KVEventBatch(
            ts=1.5,
            events=[BlockRemoved(block_hashes=[2**63 + 5, 7], medium="GPU", group_idx=0)],
            data_parallel_rank=0,
        ),
        "BlockStored_minimal_fields_dp_rank_none": KVEventBatch(
            ts=1.5,
            events=[
                BlockStored(
                    block_hashes=[11],
                    parent_block_hash=None,
                    token_ids=[1, 2],
                    block_size=2,
                    lora_id=None,
                    medium=None,
                    lora_name=None,
                )
            ],
        ),
    }
    out: dict[str, Any] = {}
    for name, batch in samples.items():
        payload = enc.encode(batch)
        out[name] = {
            "payload_hex": payload.hex(),
            "payload_wire_types": describe_msgpack(payload),
            "decoded": _jsonable(msgspec.msgpack.decode(payload)),
        }
    return out


# --------------------------------------------------------------------------------------------- the recording
def words(n: int, tag: str) -> str:
    return f"{tag} " + " ".join(f"the cache block {i} is here" for i in range(n // 5))


def record_models(http: Http, out: Path) -> None:
    write_json(out / "models.json", _exchange(http, "GET", "/v1/models", None))


def record_completions(http: Http, out: Path) -> None:
    base = {"model": MODEL, "prompt": "Hello world", "max_tokens": 5, "temperature": 0}
    cases: dict[str, Any] = {
        "basic": _exchange(http, "POST", "/v1/completions", base),
        "n_2": _exchange(http, "POST", "/v1/completions", {**base, "n": 2, "temperature": 1.0, "seed": 1}),
        "stop_string": _exchange(http, "POST", "/v1/completions", {**base, "max_tokens": 50, "stop": ["e"]}),
        "prompt_token_ids": _exchange(
            http, "POST", "/v1/completions", {**base, "prompt": [0, 44, 415, 83, 474], "max_tokens": 2}
        ),
        "kv_transfer_params_without_connector": _exchange(
            http,
            "POST",
            "/v1/completions",
            {
                **base,
                "max_tokens": 2,
                "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False},
            },
        ),
    }
    long_prompt = {**base, "prompt": words(150, "prefix-cache-demo"), "max_tokens": 2}
    cases["prefix_cache_first"] = _exchange(http, "POST", "/v1/completions", long_prompt)
    cases["prefix_cache_repeat"] = _exchange(http, "POST", "/v1/completions", long_prompt)
    cases["stream"] = _record_stream(http, out, "/v1/completions", base, "completion_stream.txt")
    write_json(out / "completion.json", cases)


def _record_stream(http: Http, out: Path, path: str, base: dict[str, Any], body_file: str) -> dict[str, Any]:
    """Stream ``base`` with usage, keep the raw SSE bytes in ``body_file`` and describe the exchange."""
    stream_req = {**base, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, data = http.request("POST", path, stream_req)
    (out / body_file).write_bytes(data)
    return {
        "method": "POST",
        "path": path,
        "request": stream_req,
        "status": status,
        "content_type": headers.get("content-type"),
        "body_file": body_file,
    }


def record_chat(http: Http, out: Path) -> None:
    base = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi there, how are you?"}],
        "max_tokens": 5,
        "temperature": 0,
    }
    cases: dict[str, Any] = {
        "basic": _exchange(http, "POST", "/v1/chat/completions", base),
        "system_and_user": _exchange(
            http,
            "POST",
            "/v1/chat/completions",
            {**base, "messages": [{"role": "system", "content": "Be brief."}, *base["messages"]]},
        ),
        "kv_transfer_params_without_connector": _exchange(
            http, "POST", "/v1/chat/completions", {**base, "kv_transfer_params": {"do_remote_decode": True}}
        ),
    }
    cases["stream"] = _record_stream(http, out, "/v1/chat/completions", base, "chat_stream.txt")
    write_json(out / "chat.json", cases)


def record_errors(http: Http, out: Path) -> None:
    ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    too_long = " ".join(["word"] * 1500)
    cases: list[tuple[str, str, str, Any, str | None]] = [
        (
            "malformed_json",
            "POST",
            "/v1/completions",
            '{"model": "tiny-llama", "prompt": ',
            "application/json",
        ),
        ("empty_body", "POST", "/v1/completions", "", "application/json"),
        ("body_not_object", "POST", "/v1/completions", "[1, 2]", "application/json"),
        ("unknown_model", "POST", "/v1/completions", {**ok, "model": "no-such-model"}, "application/json"),
        ("missing_model_uses_default", "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}, None),
        ("max_tokens_beyond_max_model_len", "POST", "/v1/completions", {**ok, "max_tokens": 5000}, None),
        (
            "prompt_plus_max_tokens_beyond_max_model_len",
            "POST",
            "/v1/completions",
            {**ok, "prompt": words(500, "budget"), "max_tokens": 500},
            None,
        ),
        ("prompt_longer_than_max_model_len", "POST", "/v1/completions", {**ok, "prompt": too_long}, None),
        ("missing_prompt", "POST", "/v1/completions", {"model": MODEL, "max_tokens": 2}, None),
        ("empty_prompt", "POST", "/v1/completions", {**ok, "prompt": ""}, None),
        ("max_tokens_wrong_type", "POST", "/v1/completions", {**ok, "max_tokens": "x"}, None),
        ("max_tokens_negative", "POST", "/v1/completions", {**ok, "max_tokens": -1}, None),
        ("max_tokens_zero", "POST", "/v1/completions", {**ok, "max_tokens": 0}, None),
        ("temperature_negative", "POST", "/v1/completions", {**ok, "temperature": -1}, None),
        ("n_3_greedy", "POST", "/v1/completions", {**ok, "n": 3, "temperature": 0}, None),
        ("n_zero", "POST", "/v1/completions", {**ok, "n": 0}, None),
        ("stream_wrong_type", "POST", "/v1/completions", {**ok, "stream": "yes"}, None),
        (
            "stream_max_tokens_beyond_max_model_len",
            "POST",
            "/v1/completions",
            {**ok, "max_tokens": 5000, "stream": True},
            None,
        ),
        ("unknown_field_ignored", "POST", "/v1/completions", {**ok, "no_such_field": 1}, None),
        ("chat_missing_messages", "POST", "/v1/chat/completions", {"model": MODEL}, None),
        ("chat_empty_messages", "POST", "/v1/chat/completions", {**chat, "messages": []}, None),
        (
            "chat_bad_role",
            "POST",
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "wizard", "content": "hi"}]},
            None,
        ),
        ("chat_unknown_model", "POST", "/v1/chat/completions", {**chat, "model": "no-such-model"}, None),
        (
            "chat_max_tokens_beyond_max_model_len",
            "POST",
            "/v1/chat/completions",
            {**chat, "max_tokens": 5000},
            None,
        ),
        (
            "prompt_plus_max_tokens_beyond_max_model_len_ignore_eos",
            "POST",
            "/v1/completions",
            {**ok, "prompt": words(500, "budget"), "max_tokens": 500, "ignore_eos": True},
            None,
        ),
        (
            "prompt_ids_1023_max_tokens_1",
            "POST",
            "/v1/completions",
            {**ok, "prompt": [5] * 1023, "max_tokens": 1},
            None,
        ),
        (
            "prompt_ids_1023_max_tokens_2",
            "POST",
            "/v1/completions",
            {**ok, "prompt": [5] * 1023, "max_tokens": 2},
            None,
        ),
        ("prompt_ids_1024", "POST", "/v1/completions", {**ok, "prompt": [5] * 1024, "max_tokens": 1}, None),
        ("prompt_ids_1025", "POST", "/v1/completions", {**ok, "prompt": [5] * 1025, "max_tokens": 1}, None),
        ("prompt_token_id_out_of_vocab", "POST", "/v1/completions", {**ok, "prompt": [1, 2, 10**9]}, None),
        ("prompt_token_id_negative", "POST", "/v1/completions", {**ok, "prompt": [1, -2]}, None),
        ("prompt_is_object", "POST", "/v1/completions", {**ok, "prompt": {"a": 1}}, None),
        ("prompt_list_of_strings", "POST", "/v1/completions", {**ok, "prompt": ["a b", "c d"]}, None),
        ("body_is_string", "POST", "/v1/completions", '"hello"', "application/json"),
        ("body_is_null", "POST", "/v1/completions", "null", "application/json"),
        (
            "max_tokens_null",
            "POST",
            "/v1/completions",
            {**ok, "max_tokens": None, "prompt": [5] * 1020},
            None,
        ),
        ("temperature_string", "POST", "/v1/completions", {**ok, "temperature": "hot"}, None),
        ("n_2_sampling", "POST", "/v1/completions", {**ok, "n": 2, "temperature": 1.0}, None),
        (
            "stream_options_without_stream",
            "POST",
            "/v1/completions",
            {**ok, "stream_options": {"include_usage": True}},
            None,
        ),
        (
            "stream_options_not_object",
            "POST",
            "/v1/completions",
            {**ok, "stream": True, "stream_options": 1},
            None,
        ),
        ("kv_transfer_params_list", "POST", "/v1/completions", {**ok, "kv_transfer_params": [1]}, None),
        ("chat_messages_not_list", "POST", "/v1/chat/completions", {**chat, "messages": "hello"}, None),
        (
            "chat_message_without_role",
            "POST",
            "/v1/chat/completions",
            {**chat, "messages": [{"content": "x"}]},
            None,
        ),
        (
            "chat_max_completion_tokens_too_large",
            "POST",
            "/v1/chat/completions",
            {"model": MODEL, "messages": chat["messages"], "max_completion_tokens": 99999},
            None,
        ),
        (
            "chat_prompt_longer_than_max_model_len",
            "POST",
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "user", "content": too_long}]},
            None,
        ),
        ("wrong_content_type", "POST", "/v1/completions", json.dumps(ok), "text/plain"),
        ("no_content_type", "POST", "/v1/completions", json.dumps(ok), ""),
        ("get_unknown_path", "GET", "/v1/nothing", None, None),
        ("post_unknown_path", "POST", "/v1/nothing", ok, None),
        ("get_on_completions", "GET", "/v1/completions", None, None),
        ("get_unknown_model", "GET", "/v1/models/no-such-model", None, None),
    ]
    results = []
    for name, method, path, body, ctype in cases:
        kwargs: dict[str, Any] = {}
        if ctype is not None:
            kwargs["content_type"] = ctype or None
        status, headers, data = http.request(method, path, body, **kwargs)
        results.append(
            {
                "case": name,
                "method": method,
                "path": path,
                "request_content_type": "application/json" if ctype is None else (ctype or None),
                "request_body": body if not isinstance(body, dict) else json.dumps(body),
                "status": status,
                "content_type": headers.get("content-type"),
                "body": data.decode("utf-8", errors="replace"),
            }
        )
    write_json(out / "errors.json", results)


def record_kv_events(http: Http, endpoint: str, out: Path, num_gpu_blocks: int | None, tag: str) -> None:
    """KV events for a few request patterns; ``tag`` starts every prompt (make it new for a warm server)."""
    collector = KvEventCollector(endpoint)
    checker = HashChecker()
    scenarios: list[dict[str, Any]] = []

    def run(name: str, note: str, body: dict[str, Any], keep_hex: bool = True) -> dict[str, Any]:
        collector.take(settle=0.2)  # drop anything unrelated
        response = http.post_json("/v1/completions", {"model": MODEL, "temperature": 0, **body})
        frames = collector.take()
        scenario = {
            "scenario": name,
            "note": note,
            "request": {k: v for k, v in body.items() if k != "prompt"}
            | {"prompt_chars": len(body["prompt"])},
            "usage": response["usage"],
            "messages": decode_frames(frames, checker, keep_hex=keep_hex),
        }
        scenarios.append(scenario)
        return scenario

    prompt = words(100, tag)
    run(
        "new_prompt",
        "a prompt never seen: one BlockStored for its full blocks, parent None",
        {"prompt": prompt, "max_tokens": 1},
    )
    run("repeat_prompt", "the same prompt again: prefix-cache hit", {"prompt": prompt, "max_tokens": 1})
    run(
        "extend_prompt",
        "the prompt plus more text: new blocks chained to the last cached one",
        {"prompt": prompt + " and then " + words(50, "more"), "max_tokens": 1},
    )
    run(
        "decode_fills_blocks",
        "short prompt, 70 generated tokens: blocks full of output tokens are stored too",
        {"prompt": f"{tag} short", "max_tokens": 70, "ignore_eos": True},
    )
    run(
        "cache_salt",
        "the first prompt with cache_salt: salt in extra_keys of block 0, other hashes",
        {"prompt": prompt, "max_tokens": 1, "cache_salt": "tenant-a"},
    )
    if num_gpu_blocks is not None and num_gpu_blocks <= 2048:
        per_request = 30  # blocks of 32 tokens: ~960-token prompts
        n = num_gpu_blocks // per_request + 2
        removed = Counter()
        stored = 0
        collector.take(settle=0.2)
        for k in range(n):
            http.post_json(
                "/v1/completions",
                {"model": MODEL, "prompt": words(900, f"{tag}-evict-{k}")[:3800], "max_tokens": 1},
            )
        frames = collector.take(settle=1.0)
        decoded = decode_frames(frames, HashChecker(), keep_hex=False)
        first_removed = None
        for message in decoded:
            for event in message["decoded"][1]:
                if event["type"] == "BlockRemoved":
                    removed[len(event["block_hashes"])] += 1
                    if first_removed is None:
                        first_removed = {
                            **message,
                            "decoded": [message["decoded"][0], [event], message["decoded"][2]],
                        }
                        first_removed.pop("payload_wire_types", None)
                elif event["type"] == "BlockStored":
                    stored += 1
        scenarios.append(
            {
                "scenario": "eviction",
                "note": f"{n} distinct ~30-block prompts into a {num_gpu_blocks}-block cache: LRU eviction",
                "block_stored_events": stored,
                "block_removed_events_by_hash_count": {str(k): v for k, v in sorted(removed.items())},
                "first_message_with_block_removed": first_removed,
            }
        )
    collector.close()
    write_json(
        out / "kv_events.json",
        {
            "hash_seed_used_for_checks": checker.seed,
            "scenarios": scenarios,
            "offline_encodings_with_vllm_classes": offline_encodings(),
        },
    )


def drive_metrics_traffic(http: Http) -> None:
    """Concurrent long generations (preemptions in a small cache), an aborted stream, then /metrics."""
    body = {"model": MODEL, "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        futures = [
            pool.submit(http.post_json, "/v1/completions", {**body, "prompt": words(500, f"load{k}")})
            for k in range(12)
        ]
        for f in futures:
            f.result()
    http.abort_stream("/v1/completions", {**body, "prompt": "abort me", "max_tokens": 500, "stream": True})
    time.sleep(1.0)


def record_metrics(http: Http, out: Path) -> None:
    status, _, data = http.request("GET", "/metrics", None)
    if status != 200:
        raise RuntimeError(f"/metrics -> {status}")
    (out / "metrics.txt").write_bytes(data)


def num_gpu_blocks_from_metrics(http: Http) -> int | None:
    _, _, data = http.request("GET", "/metrics", None)
    for line in data.decode().splitlines():
        if line.startswith("vllm:cache_config_info{"):
            for part in line.split("{", 1)[1].split("}", 1)[0].split('",'):
                key, _, value = part.partition("=")
                if key == "num_gpu_blocks":
                    return int(value.strip('"')) if value.strip('"').isdigit() else None
    return None


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def record_all(url: str, kv_events: str, out: Path, tag: str = "kvref") -> None:
    http = Http(url)
    out.mkdir(parents=True, exist_ok=True)
    record_models(http, out)
    record_completions(http, out)
    record_chat(http, out)
    record_errors(http, out)
    record_kv_events(http, kv_events, out, num_gpu_blocks_from_metrics(http), tag)
    drive_metrics_traffic(http)
    record_metrics(http, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="base URL of a running vLLM server (default: start one)")
    parser.add_argument(
        "--kv-events", help="ZMQ endpoint of its KV-event publisher, e.g. tcp://127.0.0.1:5557"
    )
    parser.add_argument(
        "--out", type=Path, default=HERE, help="output directory (default: beside this script)"
    )
    args = parser.parse_args(argv)
    if args.url:
        if not args.kv_events:
            parser.error("--kv-events is required with --url")
        # A server that may have seen our prompts before: make them new so the first one is a cache miss.
        record_all(args.url, args.kv_events, args.out, tag=f"kvref{int(time.time())}")
        return 0

    sys.path.insert(0, str(REPO_ROOT))
    from harness.tinymodel import MODEL_VERSION, build_tiny_model
    from harness.vllm_server import start_vllm_cpu

    model_dir = build_tiny_model(Path(tempfile.gettempdir()) / "kvscale-tiny-model" / MODEL_VERSION)
    log_path = Path(tempfile.gettempdir()) / "kvscale-record-vllm.log"
    started = time.monotonic()
    with start_vllm_cpu(model_dir, log_path=log_path, num_gpu_blocks=NUM_GPU_BLOCKS) as server:
        print(f"vLLM ready after {time.monotonic() - started:.1f}s at {server.url} (log {log_path})")
        record_all(server.url, server.kv_events_endpoint, args.out)
    print(f"recorded into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

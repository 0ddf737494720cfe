"""Unit tests of the router's small parts: admission control, API keys, pod → backend, SSE usage, governance."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from router.admission import Admission
from router.discovery import pod_to_spec
from router.errors import ApiError, sse_error_event
from router.governance import GovernanceLog, sampling_params
from router.proxy import backoff_delay, forward_headers, usage_from_sse_tail
from router.security import KeyChecker, load_api_keys


async def test_admission_bounds_active_and_queue():
    adm = Admission(max_active=2, max_queue=1, queue_timeout_s=0.2)
    await adm.acquire()
    await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0.01)
    assert adm.queued == 1
    with pytest.raises(ApiError) as full:
        await adm.acquire()
    assert full.value.status == 429 and full.value.headers["Retry-After"] == "1"
    adm.release()  # the slot passes to the waiter
    await waiter
    assert adm.active == 2 and adm.queued == 0
    with pytest.raises(ApiError) as timeout:
        await adm.acquire()
    assert timeout.value.status == 503
    adm.release()
    adm.release()
    assert adm.active == 0


async def test_admission_cancelled_waiter_leaves_no_trace():
    adm = Admission(max_active=1, max_queue=5, queue_timeout_s=5)
    await adm.acquire()
    t = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert adm.queued == 0
    adm.release()
    assert adm.active == 0


def test_api_keys(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# comment\nkey-one\n\nkey-two  # trailing\n")
    monkeypatch.setenv("KVSCALE_ROUTER_API_KEYS", "env-key, ")
    keys = load_api_keys(str(f))
    assert keys == {"key-one", "key-two", "env-key"}
    kc = KeyChecker(keys)
    assert kc.check("Bearer key-two") and kc.check("Bearer env-key")
    for bad in (None, "", "key-one", "Bearer key-on", "Basic key-one", "Bearer key-one2"):
        assert not kc.check(bad)
    assert not KeyChecker([]).enabled


def _pod(ready=True, ip="10.0.0.5", labels=None, deleting=False, annotations=None):
    return {
        "metadata": {"name": "p", "labels": labels or {}, "annotations": annotations or {},
                     "deletion_timestamp": "2026-01-01T00:00:00Z" if deleting else None},
        "status": {"phase": "Running", "pod_ip": ip,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip


def test_pod_to_spec():
    s = pod_to_spec(_pod(labels={"llm-d.ai/role": "prefill", "group": "long"}), 8000)
    assert s.url == "http://10.0.0.5:8000" and s.role == "prefill" and s.labels["group"] == "long"
    assert pod_to_spec(_pod(annotations={"kvscale.io/port": "9000"}), 8000).url.endswith(":9000")
    assert pod_to_spec(_pod(labels={"kvscale.io/role": "decode", "kvscale.io/model": "m"}), 1).models == {"m"}
    assert pod_to_spec(_pod(ready=False), 8000) is None
    assert pod_to_spec(_pod(ip=None), 8000) is None
    assert pod_to_spec(_pod(deleting=True), 8000) is None


def test_usage_from_sse_tail_and_error_event():
    tail = (b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":3,'
            b'"completion_tokens":2}}\n\ndata: [DONE]\n\n')  # fmt: skip
    assert usage_from_sse_tail(tail) == {"prompt_tokens": 3, "completion_tokens": 2}
    assert usage_from_sse_tail(b"data: [DONE]\n\n") is None
    ev = sse_error_event("boom")
    first = ev.split(b"\n\n")[0]
    assert json.loads(first[6:])["error"]["message"] == "boom" and ev.endswith(b"data: [DONE]\n\n")


def test_forward_headers_drop_router_and_hop_headers():
    h = forward_headers({"Authorization": "Bearer k", "X-Kvscale-Policy": "prefix", "Host": "r", "X-Trace": "t",
                         "Content-Type": "application/json"}, "rid")  # fmt: skip
    assert dict(h) == {"X-Trace": "t", "Content-Type": "application/json", "x-request-id": "rid"}


def test_backoff_is_jittered_and_capped():
    import random

    rng = random.Random(1)
    delays = [backoff_delay(n, 0.1, 0.3, rng) for n in range(1, 20)]
    assert all(0 <= d <= 0.3 for d in delays) and len(set(delays)) == len(delays)


def test_governance_log_never_contains_text(tmp_path):
    path = tmp_path / "gov.jsonl"
    g = GovernanceLog(str(path), name="kvscale.router.governance.test")
    body = {"temperature": 0.5, "top_p": 0.9, "max_tokens": 8, "stop": ["secret stop"], "prompt": "secret"}
    g.write({"prompt_hash": "abc", "sampling": sampling_params(body)})
    g.close()
    line = path.read_text().strip()
    assert json.loads(line)["sampling"] == {"temperature": 0.5, "top_p": 0.9, "max_tokens": 8, "stop_count": 1}
    assert "secret" not in line
    assert not logging.getLogger("kvscale.router.governance.test").propagate

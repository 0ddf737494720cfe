"""The KV-event subscriber against real simulator pods over real ZMQ sockets (PUB + replay ROUTER).

The pods are ``simulator.server.SimServer`` instances serving HTTP on free ports in this process; requests go
through the OpenAI SDK. The index must predict the ``cached_tokens`` the pod then reports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import openai
import zmq
import zmq.asyncio

from harness.procs import free_port
from harness.simpods import KV_TOPIC, Pod, kv_events_config, sim_pod
from kvscale.kv_events import BlockStored, EventBatch, decode_message, encode_message
from kvscale.latency import LatencyModel, StepCoefficients
from kvscale.tokenizer import FallbackTokenizer
from router.kvevents import EventSource, KVEventsManager, KVEventSubscriber
from simulator.kv_publisher import ZmqKVEventPublisher

MODEL = "sim-model"
TOK = FallbackTokenizer()
LAT = LatencyModel(name="const", coefficients=StepCoefficients(1e-3, 0.0, 0.0, 0.0, 0.0))


def kv_pod(**kw):
    """An in-process simulator pod publishing KV events (ZMQ PUB + replay)."""
    return sim_pod(LAT, kv_events=True, **kw)


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def prompt(tag: str, words: int = 100) -> str:
    return " ".join(f"{tag}{i}" for i in range(words))


def events(pod: Pod) -> EventSource:
    return EventSource(pod.kv_endpoint or "", KV_TOPIC, pod.replay_endpoint)


async def cached(pod: Pod, text: str) -> int:
    async with openai.AsyncOpenAI(base_url=pod.url + "/v1", api_key="x", max_retries=0) as c:
        r = await c.completions.create(model=MODEL, prompt=text, max_tokens=2)
        return r.usage.prompt_tokens_details.cached_tokens


async def test_index_predicts_cached_tokens_on_two_pods() -> None:
    mgr = KVEventsManager()
    try:
        async with kv_pod() as a, kv_pod() as b:
            await mgr.sync({a.url: events(a), b.url: events(b)})
            await wait_until(lambda: all(s.connected.is_set() for s in mgr.subscribers.values()), what="connect")
            await asyncio.sleep(0.2)  # ZMQ slow joiner: the subscription reaches the publisher
            pa, pb = prompt("alpha"), prompt("beta", 150)
            assert await cached(a, pa) == 0
            assert await cached(b, pb) == 0
            ta, tb = TOK.encode_prompt(pa), TOK.encode_prompt(pb)
            await wait_until(lambda: mgr.predict_cached_tokens(ta, [a.url])[a.url] > 0, what="events of a")
            await wait_until(lambda: mgr.predict_cached_tokens(tb, [b.url])[b.url] > 0, what="events of b")
            pred_a = mgr.predict_cached_tokens(ta, [a.url, b.url])
            pred_b = mgr.predict_cached_tokens(tb, [a.url, b.url])
            assert pred_a[b.url] == 0 and pred_b[a.url] == 0
            assert pred_a[a.url] == await cached(a, pa) == (len(ta) - 1) // 16 * 16
            assert pred_b[b.url] == await cached(b, pb)
            # a prompt sharing only the first 40 words: a partial prefix
            partial = TOK.encode_prompt(prompt("alpha", 40) + " " + prompt("zeta", 30))
            assert mgr.predict_cached_tokens(partial, [a.url])[a.url] == 40 // 16 * 16
    finally:
        await mgr.close()


async def test_late_subscriber_learns_history_from_the_replay_socket() -> None:
    mgr = KVEventsManager()
    try:
        async with kv_pod() as a:
            text = prompt("early")
            await cached(a, text)  # published before anyone subscribed
            await mgr.sync({a.url: events(a)})
            await wait_until(lambda: mgr.subscribers[a.url].connected.is_set(), what="connect")
            await asyncio.sleep(0.2)
            await cached(a, prompt("later"))  # the first live batch triggers a replay from sequence 0
            toks = TOK.encode_prompt(text)
            await wait_until(lambda: mgr.predict_cached_tokens(toks, [a.url])[a.url] > 0, what="replayed history")
            assert mgr.predict_cached_tokens(toks, [a.url])[a.url] == await cached(a, text)
            assert mgr.subscribers[a.url].last_applied == a.sim.publisher._seq - 1
    finally:
        await mgr.close()


async def test_gap_is_filled_from_replay_or_clears_the_backend() -> None:
    """A real publisher (the simulator's) with a replay socket; the subscriber is handed live batches with a
    missing sequence number, as when the SUB socket dropped one."""
    kv_port, replay_port = free_port(), free_port()
    pub = ZmqKVEventPublisher(kv_events_config(kv_port, replay_port))
    pub.start()
    ctx = zmq.asyncio.Context()
    mgr = KVEventsManager(default_block_size=4)
    try:
        toks = list(range(100, 112))
        batches = [
            [BlockStored([1], None, toks[0:4], 4)],
            [BlockStored([2], 1, toks[4:8], 4)],
            [BlockStored([3], 2, toks[8:12], 4)],
        ]
        for evs in batches:
            pub.publish(evs)
        source = EventSource(f"tcp://127.0.0.1:{kv_port}", KV_TOPIC, f"tcp://127.0.0.1:{replay_port}")
        with_replay = KVEventSubscriber("p", source, mgr.index, ctx)
        await with_replay.on_message(0, EventBatch(0.0, batches[0]))
        await with_replay.on_message(2, EventBatch(0.0, batches[2]))  # seq 1 went missing
        assert with_replay.stats.gaps == 1 and with_replay.stats.gaps_replayed == 1
        assert mgr.predict_cached_tokens([*toks, 0], ["p"])["p"] == 12

        no_replay = KVEventSubscriber("q", EventSource(f"tcp://127.0.0.1:{kv_port}", KV_TOPIC), mgr.index, ctx)
        await no_replay.on_message(0, EventBatch(0.0, batches[0]))
        await no_replay.on_message(2, EventBatch(0.0, batches[2]))
        assert no_replay.stats.gaps_cleared == 1
        assert mgr.predict_cached_tokens([*toks, 0], ["q"])["q"] == 0  # cleared; seq 2's parent is unknown
        await no_replay.on_message(0, EventBatch(0.0, batches[0]))  # sequence went back: publisher restarted
        assert no_replay.stats.restarts == 1
        assert mgr.predict_cached_tokens([*toks, 0], ["q"])["q"] == 4
    finally:
        await mgr.close()
        await pub.close()
        ctx.term()


async def test_pod_restart_clears_and_resubscribes() -> None:
    mgr = KVEventsManager()
    try:
        async with kv_pod() as a:
            ports = {"port": a.port, "kv_port": a.kv_port, "replay_port": a.replay_port}
            url = a.url
            await mgr.sync({url: events(a)})
            sub = mgr.subscribers[url]
            await wait_until(sub.connected.is_set, what="connect")
            await asyncio.sleep(0.2)
            old = prompt("before")
            await cached(a, old)
            t_old = TOK.encode_prompt(old)
            await wait_until(lambda: mgr.predict_cached_tokens(t_old, [url])[url] > 0, what="events")
        # the pod is gone: its entries must go too (its cache died with it)
        await wait_until(lambda: mgr.predict_cached_tokens(t_old, [url])[url] == 0, what="clear on disconnect")
        async with kv_pod(**ports) as a2:
            await wait_until(sub.connected.is_set, timeout=10, what="reconnect")
            await asyncio.sleep(0.3)
            new = prompt("after")
            await cached(a2, new)
            t_new = TOK.encode_prompt(new)
            await wait_until(lambda: mgr.predict_cached_tokens(t_new, [url])[url] > 0, what="events after restart")
            assert mgr.predict_cached_tokens(t_new, [url])[url] == await cached(a2, new)
            assert mgr.predict_cached_tokens(t_old, [url])[url] == 0
        assert sub.stats.disconnects >= 1
    finally:
        await mgr.close()


async def test_decode_errors_do_not_stop_the_subscriber() -> None:
    """Garbage on the wire is counted and skipped; the next good batch still lands."""
    port = free_port()
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    mgr = KVEventsManager(default_block_size=4)
    try:
        await mgr.sync({"p": EventSource(f"tcp://127.0.0.1:{port}", "kv")})
        await wait_until(mgr.subscribers["p"].connected.is_set, what="connect")
        await asyncio.sleep(0.2)
        await pub.send_multipart([b"kv", b"\x00" * 8, b"\xc1not msgpack"])
        await pub.send_multipart([b"kv", b"short", b""])
        await pub.send_multipart(encode_message("kv", 0, EventBatch(0.0, [BlockStored([9], None, [1, 2, 3, 4], 4)])))
        await wait_until(lambda: mgr.predict_cached_tokens([1, 2, 3, 4, 5], ["p"])["p"] == 4, what="good batch")
        assert mgr.subscribers["p"].stats.decode_errors == 2
        assert decode_message(encode_message("kv", 0, EventBatch(0.0, [])))[1] == 0
    finally:
        await mgr.close()
        pub.close(linger=0)
        ctx.term()

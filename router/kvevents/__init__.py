"""Precise prefix-cache state from the engines' KV events (ZMQ), mapped onto our own block hashes.

* :mod:`router.kvevents.index` — ``KVBlockIndex``: engine hash -> our hash per backend, our hash -> holders.
* :mod:`router.kvevents.subscriber` — ``KVEventSubscriber``: one ZMQ SUB per backend, gaps, replay, restarts.
* :mod:`router.kvevents.manager` — ``KVEventsManager``: subscribers in step with the backend set; predictions.
* :mod:`router.kvevents.tokens` — prompt token ids exactly as the engine tokenizes them.
"""

from router.kvevents.index import KVBlockIndex, request_hashes
from router.kvevents.manager import KVEventsCollector, KVEventsManager, cached_tokens
from router.kvevents.subscriber import EventSource, KVEventSubscriber
from router.kvevents.tokens import load_tokenizer, prompt_token_ids

__all__ = [
    "EventSource",
    "KVBlockIndex",
    "KVEventSubscriber",
    "KVEventsCollector",
    "KVEventsManager",
    "cached_tokens",
    "load_tokenizer",
    "prompt_token_ids",
    "request_hashes",
]

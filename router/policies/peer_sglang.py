"""Picker ``sglang-cache-aware`` (SGLang model-gateway's ``cache_aware`` policy) and policy ``peer:sglang-cache-aware``.

A re-implementation of a peer router's policy, for comparison runs; the pipeline has no filters or scorers, the
picker takes the whole decision over the candidate backends (``scores`` only carries the candidate set).

Algorithm (per request, as ``CacheAwarePolicy::select_worker``):

1. Loads are the router's own running-request counts (``Backend.in_flight``, SGLang's ``worker.load()``).
   The system is *imbalanced* when ``max - min > balance_abs_threshold`` **and** ``max > min ·
   balance_rel_threshold``; then the least-loaded backend is chosen (first one on ties) and the request text is
   still inserted into the tree for it.
2. Otherwise the request text is matched against one approximate radix tree per model, over **characters** (no
   tokenizer), shared by all backends: every node carries the set of backends ("tenants") that were sent a
   text through it, with a last-access time. ``match_rate = matched chars / text chars``. If ``match_rate >
   cache_threshold`` the request goes to the (first) tenant of the deepest matched node; else to the least-loaded
   backend (current SGLang, ``low_match="min-load"``) or, in SGLang before PR #14650 (Dec 2025), to the tenant
   with the fewest characters in the tree (``low_match="smallest-tree"``). The text is inserted for the chosen
   backend at pick time (SGLang inserts at selection, not on response).
3. Every ``eviction_interval_s`` the tree is trimmed: while a tenant holds more than ``max_tree_size``
   characters, its least-recently-used leaf (oldest tenant timestamp) loses that tenant; nodes left with no
   tenant and no child are deleted. (The limit counts characters per tenant, ``tenant_char_count``, although the
   SGLang docs say "nodes".)

Source read (stored copies of public GitHub code):

* ``sgl-project/sglang`` ``sgl-model-gateway/src/policies/cache_aware.rs`` @ b93974f140de1e545d9134d87e77f0bd1fbf3014
  (low match → min load) and ``sgl-router/src/policies/cache_aware.rs`` @ 026f853ba7ae08a457a2e127b85a26256a29e300
  (low match → ``tree.get_smallest_tenant()``);
* the tree: ``sgl-model-gateway/src/policies/tree.rs`` @ 24ce7f6c91a1b0fc65534cedf959e22423920b75 and
  ``sgl-router/src/policies/tree.rs`` @ 4d40eec0266be06d0e65b919457691cab9e51547 (``insert``, ``prefix_match``,
  ``evict_tenant_by_size``, ``remove_tenant``, ``get_smallest_tenant``);
* the same algorithm in ``vllm-project/router`` ``src/policies/cache_aware.rs``
  @ 2f2db0d9a6d075496b8327dfd1aac56d57eb27e7.

Defaults are what a deployed router gets from its launcher: ``sgl-model-gateway/bindings/python/src/sglang_router/
router_args.py`` @ 05e589ad6f75127e5302a250d9e83a881fbb3a3b (``cache_threshold: float = 0.3``,
``balance_abs_threshold: int = 64``, ``balance_rel_threshold: float = 1.5``, ``eviction_interval_secs: int = 60``,
``max_tree_size: int = 2**26``). The Rust CLIs (``sgl-model-gateway/src/main.rs``
@ f47e04e04c2a9408b8b106fb62612daa45d4b067, ``vllm-project/router`` ``src/main.rs``
@ 811db12b00e93791d4d65c7a2738df170ed6e97a) agree except
``eviction_interval`` = 120. ``CacheAwareConfig::default()`` in ``policies/mod.rs`` (0.5 / 32 / 1.1 / 30 / 10000,
both repos) only applies to ``CacheAwarePolicy::new()`` (tests), not to a launched router.

Approximations:

* the tenant "first in the node's map" is DashMap iteration order in SGLang (arbitrary but stable); here it is the
  first tenant that reached the node (dict order, stable too);
* loads are read over the candidates (healthy, not ejected, not yet tried), SGLang reads them over all workers of
  the model, unhealthy included; a hit on a tenant that is not a candidate falls back to the first candidate, as
  SGLang's unhealthy-worker branch, and the tenant is removed from the tree only if it left the pool;
* the request text is SGLang's ``extract_text_for_routing``: a completions prompt (list items joined by a space),
  or the chat messages' text contents joined by a space (no role markers; assistant: ``content`` and
  ``reasoning_content``);
* eviction runs on the virtual clock, at the first pick after each interval boundary (SGLang: a background
  thread); timestamps are clock seconds instead of wall milliseconds, ties broken by age of the heap entry;
* backends that leave the pool are removed from the trees on ``on_pool_change`` and at each eviction tick.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from router.policies.base import Picker

__all__ = ["ApproxTree", "SglangCacheAwarePicker", "routing_text"]


class _Node:
    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text  # edge label (a slice of some inserted text)
        self.parent = parent
        self.children: dict[str, _Node] = {}  # first character of the child's label -> child
        self.tenants: dict[str, float] = {}  # backend url -> last access time (insertion-ordered)


def _shared(text: str, start: int, label: str) -> int:
    """Length of the common prefix of ``text[start:]`` and ``label`` (the first character is known to match)."""
    if text.startswith(label, start):
        return len(label)
    lo, hi = 1, min(len(label), len(text) - start)  # invariant: a prefix of length lo matches, hi+1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(label[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class ApproxTree:
    """SGLang's multi-tenant approximate radix tree over characters (one per model)."""

    def __init__(self) -> None:
        self.root = _Node("", None)
        self.char_count: dict[str, int] = {}  # tenant -> characters of the nodes it holds (SGLang tenant_char_count)
        self._seq = itertools.count()

    def insert(self, text: str, tenant: str, now: float) -> None:
        counts = self.char_count
        node = self.root
        node.tenants[tenant] = now
        counts.setdefault(tenant, 0)
        i, n = 0, len(text)
        while i < n:
            first = text[i]
            child = node.children.get(first)
            if child is None:
                leaf = _Node(text[i:], node)
                leaf.tenants[tenant] = now
                node.children[first] = leaf
                counts[tenant] += n - i
                return
            label = child.text
            shared = _shared(text, i, label)
            if shared < len(label):  # split: node -> mid (label[:shared]) -> child (label[shared:])
                mid = _Node(label[:shared], node)
                mid.tenants = dict(child.tenants)
                child.text = label[shared:]
                child.parent = mid
                mid.children[child.text[0]] = child
                node.children[first] = mid
                child = mid
            if tenant not in child.tenants:
                counts[tenant] += shared
            child.tenants[tenant] = now
            node = child
            i += shared

    def prefix_match(self, text: str, now: float) -> tuple[int, str | None]:
        """(matched characters, first tenant of the deepest matched node); refreshes that tenant's path."""
        node = self.root
        i, n = 0, len(text)
        while i < n:
            child = node.children.get(text[i])
            if child is None:
                break
            shared = _shared(text, i, child.text)
            i += shared
            node = child
            if shared < len(child.text):
                break
        tenant = next(iter(node.tenants), None)
        if tenant is not None:
            walk: _Node | None = node
            while walk is not None:
                walk.tenants[tenant] = now
                walk = walk.parent
        return i, tenant

    def smallest_tenant(self, candidates: list[str]) -> str:
        """The candidate holding the fewest characters (absent = 0; first one on ties)."""
        get = self.char_count.get
        return min(candidates, key=lambda u: get(u, 0))

    @staticmethod
    def _is_leaf_for(node: _Node, tenant: str) -> bool:
        return tenant in node.tenants and not any(tenant in c.tenants for c in node.children.values())

    def _detach_if_empty(self, node: _Node) -> None:
        parent = node.parent
        empty = not node.children and not node.tenants and node.text
        if empty and parent is not None and parent.children.get(node.text[0]) is node:
            del parent.children[node.text[0]]

    def evict(self, max_size: int) -> None:
        """``evict_tenant_by_size``: drop LRU leaves of every tenant holding more than ``max_size`` characters."""
        counts = self.char_count
        if all(c <= max_size for c in counts.values()):
            return  # nothing to do (SGLang walks the tree and skips every entry)
        heap: list[tuple[float, int, str, _Node]] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            child_tenants: set[str] = set()
            for c in node.children.values():
                child_tenants.update(c.tenants)
            for tenant, ts in node.tenants.items():
                if tenant not in child_tenants:
                    heap.append((ts, next(self._seq), tenant, node))
        heapq.heapify(heap)
        while heap:
            _, _, tenant, node = heapq.heappop(heap)
            if counts.get(tenant, 0) <= max_size:
                continue
            if tenant in node.tenants:
                counts[tenant] = max(0, counts.get(tenant, 0) - len(node.text))
                del node.tenants[tenant]
            self._detach_if_empty(node)
            parent = node.parent
            if parent is not None and self._is_leaf_for(parent, tenant):
                heapq.heappush(heap, (parent.tenants[tenant], next(self._seq), tenant, parent))

    def remove_tenant(self, tenant: str) -> None:
        """Remove ``tenant`` from every node (deleting emptied leaves) and from the counts."""

        stack: list[tuple[_Node, bool]] = [(self.root, False)]  # iterative post-order (deep trees)
        while stack:
            node, done = stack.pop()
            if done:
                node.tenants.pop(tenant, None)
                self._detach_if_empty(node)
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in node.children.values() if tenant in c.tenants)
        self.char_count.pop(tenant, None)

    def tenants(self) -> set[str]:
        return set(self.char_count)

    def node_count(self) -> int:
        n, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            n += 1
            stack.extend(node.children.values())
        return n


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return None


def routing_text(ctx: Any) -> str:
    """SGLang's ``extract_text_for_routing`` for the request (falls back to ``ctx.prompt``)."""
    body = ctx.body if isinstance(ctx.body, Mapping) else {}
    if ctx.endpoint == "chat" and isinstance(body.get("messages"), list):
        parts = []
        for m in body["messages"]:
            if not isinstance(m, Mapping):
                continue
            text = _content_text(m.get("content"))
            if m.get("role") == "assistant":
                reasoning = m.get("reasoning_content")
                main, extra = text or "", reasoning if isinstance(reasoning, str) else ""
                text = f"{main} {extra}".strip() if (main or extra) else None
            if text is not None:
                parts.append(text)
        return " ".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return " ".join(prompt)
    return ctx.prompt


class SglangCacheAwarePicker(Picker):
    name = "sglang-cache-aware"

    @dataclass(frozen=True)
    class Config:
        cache_threshold: float = 0.3  # match rate above which the longest-match tenant is chosen
        balance_abs_threshold: int = 64  # imbalanced if max - min load > this ...
        balance_rel_threshold: float = 1.5  # ... and max > min * this
        eviction_interval_s: float = 60.0  # LRU trim period (0 = never)
        max_tree_size: int = 2**26  # characters per tenant kept by the trim
        low_match: str = "min-load"  # "min-load" (SGLang ≥ PR #14650) | "smallest-tree" (earlier SGLang)

        def validate(self) -> None:
            if not 0.0 <= self.cache_threshold <= 1.0:
                raise ValueError("cache_threshold must be in [0, 1]")
            if self.balance_abs_threshold < 0:
                raise ValueError("balance_abs_threshold must be ≥ 0")
            if self.balance_rel_threshold < 1.0:
                raise ValueError("balance_rel_threshold must be ≥ 1")
            if self.eviction_interval_s < 0:
                raise ValueError("eviction_interval_s must be ≥ 0")
            if self.max_tree_size < 0:
                raise ValueError("max_tree_size must be ≥ 0")
            if self.low_match not in ("min-load", "smallest-tree"):
                raise ValueError("low_match must be 'min-load' or 'smallest-tree'")

    def __init__(self, config, services) -> None:
        super().__init__(config, services)
        self.trees: dict[str, ApproxTree] = {}  # model -> tree
        # SGLang's eviction thread starts with the policy and sleeps one interval before its first pass
        self._next_evict = services.clock() + config.eviction_interval_s

    # -- maintenance ----------------------------------------------------------------------------------------
    def _gone(self, url: str) -> bool:
        pool = self.services.pool
        return pool is None or pool.get(url) is None

    def _forget_departed(self) -> None:
        if self.services.pool is None:
            return
        for tree in self.trees.values():
            for url in [u for u in tree.tenants() if self._gone(u)]:
                tree.remove_tenant(url)

    def _maybe_evict(self, now: float) -> None:
        interval = self.config.eviction_interval_s
        if interval <= 0:
            return
        if now < self._next_evict:
            return
        self._forget_departed()
        for tree in self.trees.values():
            tree.evict(self.config.max_tree_size)
        missed = int((now - self._next_evict) // interval) + 1
        self._next_evict += missed * interval

    def on_pool_change(self) -> None:
        self._forget_departed()

    # -- the decision ---------------------------------------------------------------------------------------
    def pick(self, ctx, scores: Mapping) -> Any:
        cands = list(scores)
        now = self.services.clock()
        self._maybe_evict(now)
        tree = self.trees.get(ctx.model)
        if tree is None:
            tree = self.trees[ctx.model] = ApproxTree()
        text = routing_text(ctx)
        loads = [b.in_flight for b in cands]
        hi, lo = max(loads), min(loads)
        cfg = self.config
        if hi - lo > cfg.balance_abs_threshold and hi > lo * cfg.balance_rel_threshold:
            chosen = cands[loads.index(lo)]
            tree.insert(text, chosen.url, now)
            return chosen
        matched, tenant = tree.prefix_match(text, now)
        rate = matched / len(text) if text else 0.0
        if rate > cfg.cache_threshold and tenant is not None:
            by_url = {b.url: b for b in cands}
            chosen = by_url.get(tenant)
            if chosen is None:  # tenant unhealthy, ejected, already tried, or gone: SGLang's fallback
                if self._gone(tenant):
                    tree.remove_tenant(tenant)
                return cands[0]
        elif cfg.low_match == "min-load":
            chosen = cands[loads.index(lo)]
        else:
            url = tree.smallest_tenant([b.url for b in cands])
            chosen = next(b for b in cands if b.url == url)
        tree.insert(text, chosen.url, now)
        return chosen


PLUGINS = (SglangCacheAwarePicker,)
POLICIES = {"peer:sglang-cache-aware": {"picker": {"type": "sglang-cache-aware"}}}

"""Bounded concurrency with a bounded wait queue: overload is answered with 429/503, memory stays bounded."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from router.errors import ApiError

__all__ = ["Admission"]


class Admission:
    """At most ``max_active`` requests proxied at once; up to ``max_queue`` more wait (FIFO) at most
    ``queue_timeout_s``. A full queue → 429; a wait that times out → 503 with ``Retry-After``."""

    def __init__(self, max_active: int, max_queue: int, queue_timeout_s: float, retry_after_s: int = 1) -> None:
        self.max_active = max_active
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.rejected_full = 0
        self.rejected_timeout = 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.active < self.max_active and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queue:
            self.rejected_full += 1
            raise ApiError(429, "the router is at capacity and its queue is full; retry later", None,
                           headers={"Retry-After": str(self.retry_after_s)})  # fmt: skip
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout_s)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self._release_slot()  # we were handed a slot just as we gave up: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            if isinstance(exc, TimeoutError):
                self.rejected_timeout += 1
                raise ApiError(503, f"no capacity within {self.queue_timeout_s:g}s; retry later", None,
                               headers={"Retry-After": str(self.retry_after_s)}) from None  # fmt: skip
            raise

    def _release_slot(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the waiter; active stays the same
                return
        self.active -= 1

    def release(self) -> None:
        self._release_slot()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

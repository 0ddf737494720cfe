"""P/D disaggregation on the HTTP driver, as vLLM's NIXL connector does it through ``kv_transfer_params``.

A request with ``{"do_remote_decode": true}`` goes to a prefill pod: it generates one token, keeps the blocks held
and answers with the parameters a decode pod needs (:func:`prefill_response_params`). The router sends those
(``do_remote_prefill: true``, the prefill pod's ``remote_host``/``remote_port``/``remote_request_id``, ...) to a
decode pod, whose engine models the KV pull; once the KV has arrived, the decode pod tells the prefill pod to
free the held blocks (``POST /kvscale/kv/release``, :class:`ReleaseNotifier`). If that message is lost, the
engine's hold timeout frees them anyway. Pod roles (``--role prefill|decode|both``) refuse the other role's legs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from simulator.openai_api import ApiError
from simulator.request import Request

log = logging.getLogger("kvscale.sim")

ROLES = ("both", "prefill", "decode")


def transfer_roles(kv_transfer_params: dict[str, Any] | None, role: str) -> tuple[bool, dict[str, Any] | None]:
    """``(do_remote_decode, remote_prefill)`` for the engine request, checked against this pod's ``role``."""
    ktp = kv_transfer_params or {}
    do_remote_decode = bool(ktp.get("do_remote_decode"))
    remote_prefill = ktp if ktp.get("do_remote_prefill") else None
    if do_remote_decode and role == "decode":
        raise ApiError(400, "this pod has role 'decode' and cannot serve a prefill-only request")
    if remote_prefill and role == "prefill":
        raise ApiError(400, "this pod has role 'prefill' and cannot pull remote KV")
    return do_remote_decode, remote_prefill


def prefill_response_params(req: Request, engine_id: str, host: str, port: int) -> dict[str, Any] | None:
    """The ``kv_transfer_params`` of a prefill leg's answer (None for any other request)."""
    if not req.do_remote_decode:
        return None
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": list(req.block_ids),
        "remote_engine_id": engine_id,
        "remote_request_id": req.request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
        "remote_num_tokens": req.num_prompt_tokens,
    }


class ReleaseNotifier:
    """The decode side: after a request's KV pull, tell its prefill pod to release the held blocks (in the
    background; a failure is logged, the prefill pod's hold timeout covers it)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()  # strong references until done (asyncio docs)

    def kv_pulled(self, req: Request) -> None:
        params = req.remote_prefill or {}
        host, port, rid = params.get("remote_host"), params.get("remote_port"), params.get("remote_request_id")
        if not (host and port and rid):
            return

        async def notify() -> None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            try:
                async with self._session.post(
                    f"http://{host}:{port}/kvscale/kv/release",
                    json={"request_id": rid},
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as resp:
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError) as e:  # the hold timeout frees the blocks anyway
                log.warning("KV release notification to %s:%s failed: %s", host, port, e)

        task = asyncio.get_running_loop().create_task(notify())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

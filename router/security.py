"""API keys (``Authorization: Bearer KEY``) checked in constant time, and key loading from a file or env var."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["KeyChecker", "load_api_keys"]


def load_api_keys(path: str | None = None, env_var: str = "KVSCALE_ROUTER_API_KEYS") -> frozenset[str]:
    """Keys from ``path`` (one per line, ``#`` comments) and from ``env_var`` (comma-separated)."""
    keys: set[str] = set()
    if path:
        for line in Path(path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
    for k in os.environ.get(env_var, "").split(","):
        if k.strip():
            keys.add(k.strip())
    return frozenset(keys)


class KeyChecker:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> bool:
        """True if the header carries one of the keys. Every key is compared (no early exit), each in constant
        time, so timing reveals neither which key matched nor how much of one."""
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        # the auth scheme is case-insensitive (RFC 7235 §2.1): "Bearer", "bearer", "BEARER"
        presented = credentials.strip().encode("utf-8", "replace") if scheme.lower() == "bearer" else b""
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(presented, key)
        return ok

"""Filter ``role``: keep backends of the given roles (``both``, ``prefill``, ``decode``).

Example: ``{"type": "role", "config": {"roles": ["decode", "both"]}}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.backends import ROLES
from router.policies.base import Filter


class RoleFilter(Filter):
    name = "role"

    @dataclass(frozen=True)
    class Config:
        roles: tuple[str, ...] = ("both", "decode")

        def validate(self) -> None:
            bad = set(self.roles) - set(ROLES)
            if bad:
                raise ValueError(f"unknown role(s) {sorted(bad)}; known: {ROLES}")

    def filter(self, ctx, backends):
        return [b for b in backends if b.role in self.config.roles]


PLUGINS = (RoleFilter,)

"""Filters ``labels`` (keep backends whose labels/tags match all of ``match``) and ``role`` (keep given roles).

Example: ``{"type": "labels", "config": {"match": {"group": "long"}}}`` keeps ``--backend URL,group=long``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.backends import ROLES
from router.policies.base import Filter


class LabelFilter(Filter):
    name = "labels"

    @dataclass(frozen=True)
    class Config:
        match: dict[str, str] = field(default_factory=dict)

    def filter(self, ctx, backends):
        m = self.config.match.items()
        return [b for b in backends if all(b.labels.get(k) == v for k, v in m)]


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


PLUGINS = (LabelFilter, RoleFilter)

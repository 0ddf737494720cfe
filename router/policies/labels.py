"""Filter ``labels``: keep backends whose labels/tags match all of ``match``.

Example: ``{"type": "labels", "config": {"match": {"group": "long"}}}`` keeps ``--backend URL,group=long``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.policies.base import Filter


class LabelFilter(Filter):
    name = "labels"

    @dataclass(frozen=True)
    class Config:
        match: dict[str, str] = field(default_factory=dict)

    def filter(self, ctx, backends):
        m = self.config.match.items()
        return [b for b in backends if all(b.labels.get(k) == v for k, v in m)]


PLUGINS = (LabelFilter,)

"""Filter ``length-bucket``: long prompts go to the "long" backend group, short ones to the others (JD Cloud's
long/short bucketing), so short requests stop queueing behind long prefills.

A prompt is long when its token count (the model's tokenizer when ``tokenizer`` is set, the simulator's fallback
tokenizer otherwise) is above ``threshold_tokens``. The long group is the backends whose label ``label`` equals
``long_value`` (``--backend URL,group=long`` or the pod label). If the wanted group has no available backend the
filter keeps everything (a bucket must never turn into an outage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.kvevents.tokens import context_token_ids, shared_tokenizer
from router.policies.base import Filter


class LengthBucketFilter(Filter):
    name = "length-bucket"

    @dataclass(frozen=True)
    class Config:
        threshold_tokens: int = 1024
        label: str = "group"
        long_value: str = "long"
        tokenizer: str | None = None

        def validate(self) -> None:
            if self.threshold_tokens < 1:
                raise ValueError("threshold_tokens must be >= 1")

    def __init__(self, config: Config, services: Any) -> None:
        super().__init__(config, services)
        self.tokenizer = shared_tokenizer(services.extras, config.tokenizer)

    def is_long(self, ctx: Any) -> bool:
        tokens = context_token_ids(ctx, self.tokenizer)
        n = len(tokens) if tokens is not None else len(ctx.prompt) // 4
        return n > self.config.threshold_tokens

    def filter(self, ctx, backends):
        key, value = self.config.label, self.config.long_value
        long_group = [b for b in backends if b.labels.get(key) == value]
        if not long_group or len(long_group) == len(backends):
            return list(backends)
        if self.is_long(ctx):
            ctx.state["length_bucket"] = "long"
            return long_group
        ctx.state["length_bucket"] = "short"
        return [b for b in backends if b.labels.get(key) != value]


PLUGINS = (LengthBucketFilter,)
POLICIES = {
    "length-buckets": {
        "filters": [{"type": "length-bucket"}],
        "scorers": [{"type": "least-request", "weight": 1.0}],
    }
}

"""Routing policies: a pipeline of **filters → weighted scorers → picker**, each plugin one small file here.

How a request is routed
-----------------------
1. The proxy builds a :class:`router.context.RequestContext` and the candidate set: backends of the pool that
   serve ``ctx.model``, are healthy and not ejected, with role ``both`` or ``decode`` (``prefill`` backends are
   left to the P/D handler, see :mod:`router.proxy`). Backends already tried for this request are excluded.
2. The policy (``--policy NAME``, or the ``x-kvscale-policy`` header per request) is a :class:`Pipeline`:
   every filter in order narrows the list (an empty list → 503); every scorer returns ``{backend: score}``;
   totals are ``Σ weight · clamp(score, 0, 1)`` (a backend missing from a scorer's dict scores 0); the picker
   chooses one backend from the totals.
3. Hooks: when the chosen backend starts answering successfully, ``on_response_start(ctx, backend)`` is called
   on every plugin of the policy used; when the attempt ends (success, failure, client gone),
   ``on_finish(ctx, backend, outcome)``. Affinity scorers learn there (``prefix`` records its blocks).

Writing a plugin (one file, e.g. ``router/policies/my_scorer.py``)
------------------------------------------------------------------
::

    from dataclasses import dataclass
    from router.policies.base import Scorer          # or Filter / Picker

    class MyScorer(Scorer):
        name = "my-scorer"                           # registry key (kebab-case), unique per kind

        @dataclass(frozen=True)
        class Config:                                # JSON config; unknown fields and wrong types are rejected
            alpha: float = 0.5
            def validate(self) -> None:              # optional range checks: raise ValueError
                if not 0 <= self.alpha <= 1: raise ValueError("alpha must be in [0, 1]")

        def __init__(self, config, services):        # optional; keep super().__init__
            super().__init__(config, services)       # -> self.config (parsed Config), self.services

        def score(self, ctx, backends):              # hot path: no I/O, no awaits
            return {b: 1.0 - b.stats.kv_usage if b.stats else 0.5 for b in backends}

        def on_response_start(self, ctx, backend): ...   # optional hook
        def on_finish(self, ctx, backend, outcome): ...  # optional hook (outcome: base.Outcome)

    PLUGINS = (MyScorer,)                            # what the registry collects from this module
    POLICIES = {                                     # optional named presets (usable by --policy / header)
        "my-policy": {
            "filters": [{"type": "bounded-load", "config": {"factor": 1.5}}],
            "scorers": [{"type": "my-scorer", "weight": 2, "config": {"alpha": 0.3}},
                        {"type": "least-request", "weight": 1}],
            "picker": {"type": "max-score"},         # default picker when omitted
        }
    }

:func:`load_registry` imports every module of this package (except ``base``, ``pipeline`` and ``_*``) and
collects ``PLUGINS`` and ``POLICIES``; no module-level registration side effects, no global registry. A module
that fails to import is an error. Users add or override policies with ``--policy-config FILE``
(``{"policies": {NAME: spec}}``), parsed just as strictly.

Signatures
----------
* ``Filter.filter(ctx, backends: Sequence[Backend]) -> list[Backend]``
* ``Scorer.score(ctx, backends: Sequence[Backend]) -> Mapping[Backend, float]`` (scores in [0, 1])
* ``Picker.pick(ctx, scores: Mapping[Backend, float]) -> Backend`` (``scores`` never empty)
* hooks on every kind: ``on_response_start(ctx, backend)``, ``on_finish(ctx, backend, outcome)``.

What plugins can read
---------------------
* ``ctx`` (:class:`router.context.RequestContext`): ``request_id``, ``model``, ``endpoint`` (``"completions"`` |
  ``"chat"``), ``prompt`` (completion prompt, or chat messages rendered to one string), ``body`` (parsed JSON),
  ``headers`` (case-insensitive), ``stream``, ``policy``, ``tried`` (URLs already attempted),
  ``block_hashes(block_chars=64, max_blocks=None)`` (lazy, cached chained xxh3-64 over character blocks),
  ``prompt_hash``, and ``state`` (a dict for per-request plugin data).
* ``Backend`` (:class:`router.backends.Backend`, hashed by identity): ``url``, ``models``, ``role``
  (``prefill``/``decode``/``both``), ``labels`` (alias ``tags``), ``in_flight`` (router-counted),
  ``stats`` (latest :class:`kvscale.engine_stats.EngineStats` from a light scrape: running, waiting, kv_usage,
  info series), ``stats_at`` / ``stats_age(now)``, ``healthy``, ``ejected_until``.
* ``self.services`` (:class:`Services`): ``clock`` (monotonic), ``rng`` (``random.Random``), ``pool``
  (:class:`router.backends.BackendPool`), ``prefix_index`` (the app's bounded :class:`PrefixIndex`),
  ``extras`` (dict for per-app shared objects, e.g. a KV-event index).

Built-in plugins and policies
-----------------------------
Pickers: ``max-score`` (ties at random), ``round-robin``, ``random``. Scorers: ``least-request``, ``least-kv``,
``prefix``. Filters: ``random-sample`` (k), ``bounded-load`` (imbalance guard), ``labels`` (match), ``role``.
Policies: ``round-robin``, ``random``, ``least-request``, ``least-kv``, ``power-of-two``, ``prefix``.
"""

from router.policies.base import (
    Filter,
    Outcome,
    Picker,
    Plugin,
    PluginConfigError,
    Registry,
    Scorer,
    Services,
    load_registry,
    parse_config,
)
from router.policies.pipeline import Pipeline, build_pipeline, build_policies, load_policy_file

__all__ = [
    "Filter",
    "Outcome",
    "Picker",
    "Pipeline",
    "Plugin",
    "PluginConfigError",
    "Registry",
    "Scorer",
    "Services",
    "build_pipeline",
    "build_policies",
    "load_policy_file",
    "load_registry",
    "parse_config",
]

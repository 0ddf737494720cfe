"""The plugin interface of the routing pipeline: filters, scorers, pickers, strict config parsing, the registry.

See the package docstring (:mod:`router.policies`) for the contract; this module holds the code.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import random
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from router.backends import Backend, BackendPool
    from router.context import RequestContext
    from router.prefix_index import PrefixIndex

__all__ = [
    "Filter",
    "Outcome",
    "Picker",
    "Plugin",
    "PluginConfigError",
    "Registry",
    "Scorer",
    "Services",
    "load_registry",
    "parse_config",
]


class PluginConfigError(ValueError):
    """A policy or plugin configuration is invalid (unknown name, unknown field, wrong type)."""


@dataclass
class Services:
    """What the router gives every plugin instance: shared, per-app objects (never module globals).

    ``clock`` is monotonic seconds; ``rng`` a seeded ``random.Random`` in tests; ``pool`` the live backend set
    (read-only for plugins); ``prefix_index`` the app's bounded prefix index; ``extras`` a place for plugins
    to share per-app objects by name (e.g. a KV-event index started by the app).
    """

    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    pool: BackendPool | None = None
    prefix_index: PrefixIndex | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """How a routed request ended, passed to ``on_finish``.

    ``status`` is the HTTP status the client saw (or would have: 499 when the client went away); ``error`` is a
    short reason when the backend failed (``"connect"``, ``"5xx"``, ``"timeout"``, ``"stream"``) or None;
    ``ttft_s`` / ``duration_s`` are router-observed; token counts come from the backend's usage when present.
    """

    status: int
    error: str | None = None
    ttft_s: float | None = None
    duration_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


class Plugin:
    """Base of all plugins. Subclasses set ``name`` (registry key, kebab-case), ``kind`` and ``Config``.

    ``Config`` is a dataclass whose fields (with defaults) are the plugin's JSON config; :func:`parse_config`
    rejects unknown fields and wrong types. The constructor receives the parsed config and the app's
    :class:`Services`.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Any, services: Services) -> None:
        self.config = config
        self.services = services

    # Optional hooks (no-ops by default). They must be cheap and must not raise.
    def on_response_start(self, ctx: RequestContext, backend: Backend) -> None:
        """The backend answered with a success status and its first body bytes are about to reach the client."""

    def on_finish(self, ctx: RequestContext, backend: Backend, outcome: Outcome) -> None:
        """The request is over (success, failure of this attempt, or client disconnect)."""

    def on_pool_change(self) -> None:
        """Backends joined or left the pool (and once at startup, after discovery's first answer). Called on the
        event loop for the plugins of the router's default policy; may schedule background work (e.g. connect
        KV-event subscribers before the first request instead of on it)."""


class Filter(Plugin):
    """Drops backends: returns the subset of ``backends`` that stays eligible (same objects, any order)."""

    kind = "filter"

    def filter(self, ctx: RequestContext, backends: Sequence[Backend]) -> list[Backend]:
        raise NotImplementedError


class Scorer(Plugin):
    """Ranks backends: returns ``{backend: score in [0, 1]}``; higher is better, a missing backend scores 0."""

    kind = "scorer"

    def score(self, ctx: RequestContext, backends: Sequence[Backend]) -> Mapping[Backend, float]:
        raise NotImplementedError


class Picker(Plugin):
    """Chooses one backend from the weighted total scores (never empty)."""

    kind = "picker"

    def pick(self, ctx: RequestContext, scores: Mapping[Backend, float]) -> Backend:
        raise NotImplementedError


_KINDS = {"filter": Filter, "scorer": Scorer, "picker": Picker}


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate (and lightly coerce int → float) one JSON value against a dataclass field's type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, where)
            except PluginConfigError as exc:
                errors.append(str(exc))
        raise PluginConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise PluginConfigError(f"{where}: expected null, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise PluginConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise PluginConfigError(f"{where}: expected an integer, got {value!r}")
    if tp in (str, bool):
        if isinstance(value, tp):
            return value
        raise PluginConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise PluginConfigError(f"{where}: expected a list, got {value!r}")
        (arg, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_check_type(v, arg, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise PluginConfigError(f"{where}: expected an object, got {value!r}")
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    return value


def parse_config(cls: type, raw: Mapping[str, Any] | None, where: str) -> Any:
    """Build dataclass ``cls`` from JSON ``raw`` strictly: unknown fields and wrong types raise; defaults fill in.

    A dataclass may define ``validate(self) -> None`` raising ``ValueError`` for range checks.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise PluginConfigError(f"{where}: config must be an object, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise PluginConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    try:
        obj = cls(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate()
    except (TypeError, ValueError) as exc:
        raise PluginConfigError(f"{where}: {exc}") from exc
    return obj


@dataclass
class Registry:
    """Plugin classes and named policy presets found in the ``router.policies`` package."""

    plugins: dict[tuple[str, str], type[Plugin]] = field(default_factory=dict)  # (kind, name) -> class
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # policy name -> pipeline spec

    def add(self, cls: type[Plugin]) -> None:
        if cls.kind not in _KINDS or not issubclass(cls, _KINDS[cls.kind]) or not cls.name:
            raise PluginConfigError(f"{cls.__qualname__}: a plugin needs a name and kind filter|scorer|picker")
        key = (cls.kind, cls.name)
        if key in self.plugins and self.plugins[key] is not cls:
            raise PluginConfigError(f"two {cls.kind}s named {cls.name!r}: {self.plugins[key]} and {cls}")
        self.plugins[key] = cls

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self.plugins if k == kind)

    def create(self, kind: str, spec: Mapping[str, Any], services: Services, where: str) -> Plugin:
        """Instantiate ``{"type": NAME, "config": {...}}`` of ``kind`` (plus ``weight`` for scorers, read by the
        pipeline builder)."""
        if not isinstance(spec, Mapping):
            raise PluginConfigError(f"{where}: expected an object like {{\"type\": ...}}, got {spec!r}")
        allowed = {"type", "config", "weight"} if kind == "scorer" else {"type", "config"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise PluginConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(allowed)}")
        name = spec.get("type")
        cls = self.plugins.get((kind, name)) if isinstance(name, str) else None
        if cls is None:
            raise PluginConfigError(f"{where}: unknown {kind} {name!r}; known: {self.names(kind)}")
        config = parse_config(cls.Config, spec.get("config"), f"{where} ({kind} {name!r})")
        return cls(config, services)


_SKIP = {"base", "pipeline"}


def load_registry(package: str = "router.policies") -> Registry:
    """Import every module of ``package`` and collect its ``PLUGINS`` and ``POLICIES``.

    A module that fails to import raises: a half-broken policy must not silently disappear from a router.
    """
    reg = Registry()
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in _SKIP:
            continue
        mod = importlib.import_module(f"{package}.{info.name}")
        for cls in getattr(mod, "PLUGINS", ()):
            reg.add(cls)
        for pname, spec in getattr(mod, "POLICIES", {}).items():
            if pname in reg.presets:
                raise PluginConfigError(f"policy {pname!r} defined twice (second in {mod.__name__})")
            reg.presets[pname] = spec
    return reg

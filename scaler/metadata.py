"""ScaledObject ``scalerMetadata`` → validated :class:`ScalerSettings`.

Keys are camelCase like KEDA's own scalers. Every value arrives as a string (KEDA passes ``metadata`` through
verbatim); each is parsed and range-checked here, and a bad or missing key raises :class:`MetadataError` naming
the key and the reason (the gRPC service answers ``INVALID_ARGUMENT`` with that message). Unknown keys are
rejected too, so a typo (``ttftSLOms``) is an error instead of a silently ignored setting.

Each key is declared once, on its :class:`ScalerSettings` field (as KEDA's ``TypedConfig`` declares a scaler's
keys in struct tags): :func:`key` gives the field its metadata name, kind (:data:`KINDS`), default as KEDA would
pass it (the field's default is that text, parsed), bounds, unit and one-line doc. :data:`METADATA_KEYS` is that
table read off the dataclass, in docs order; :func:`parse_scaler_metadata` parses every key from it, then checks
the rules that span keys (:func:`_check_rules`). ``docs/scaler.md`` documents every key (the metadata test checks
the docs against the table).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kvscale.labels import label_value_ok, parse_selector
from kvscale.latency import LatencyModel, LatencyModelError, builtin_models, load_latency_model
from scaler.schedule import FloorWindow, parse_schedule_floors

POOLS = ("prefill", "decode", "aggregated")
SOURCES = ("pods", "prometheus")

# Keys KEDA's external trigger reads itself; KEDA still forwards the whole metadata map in scalerMetadata.
KEDA_KEYS = frozenset({"scalerAddress", "enableTLS", "unsafeSsl", "tlsCertFile", "caCert", "tlsClientCert",
                       "tlsClientKey"})  # fmt: skip


MAX_VALUE_CHARS = 4096  # longer values are refused (a 1 MB value must not become a metric label or a log line)
MAX_MODEL_CHARS = 253  # ``model`` is a label of the scaler's metrics: a Kubernetes-name-sized string
MAX_ECHO_CHARS = 200  # what an error message quotes of a bad key or value


def _clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class MetadataError(ValueError):
    """A scalerMetadata key is missing or invalid; the message names the key (both clipped for the echo)."""

    def __init__(self, key: str, reason: str) -> None:
        key, reason = _clip(key, 100), _clip(reason, 2 * MAX_ECHO_CHARS)
        super().__init__(f"scalerMetadata.{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class MetadataKey:
    """One ``scalerMetadata`` key: how its text becomes the value of a :class:`ScalerSettings` field."""

    name: str  # the camelCase metadata key
    kind: str  # one of KINDS: how the text is parsed and checked
    default: str | None  # as KEDA would pass it; None: required, or derived (e.g. from the namespace)
    doc: str  # one line: what it means (docs/scaler.md says more)
    lo: float = -math.inf  # bounds of number / int kinds
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    per: float = 1.0  # unit: the field holds the number divided by this (ttftSloMs / 1000 → seconds)
    choices: tuple[str, ...] = ()  # of the choice kind
    empty: str | None = None  # the error when the (stripped) value is empty; None: the kind decides
    field: str = ""  # the ScalerSettings field (filled in from the dataclass)

    @property
    def required(self) -> bool:
        return self.default is None and self.empty is not None

    def bounds(self) -> str:
        """The allowed range as an interval, e.g. ``(0, 100)`` or ``[1, 65535]``."""
        lo_b, hi_b = ("(" if self.lo_open else "["), (")" if self.hi_open else "]")
        if self.kind == "int":
            return f"{lo_b}{int(self.lo)}, {int(self.hi)}{hi_b}"
        return f"{lo_b}{self.lo:g}, {self.hi:g}{hi_b}"


@dataclass(frozen=True)
class _Context:
    namespace: str  # the ScaledObject's: podNamespace's default
    load_model: Callable[[str], LatencyModel] | None  # None: built-in names only (the dataclass defaults)
    loaded: dict[str, LatencyModel] = field(default_factory=dict)  # the latency model, once read


# -- the kinds: (key, text as given, context) -> the field's value; raise MetadataError -----------------------------
_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# What KEDA users write: ASCII decimals ("1000", "0.5", "1e3"); not "1_000" or full-width digits, which Python's
# float() and int() would take.
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)
_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)
_PROM_MATCHER = re.compile(r'^\s*[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*$')


def _choice(k: MetadataKey, text: str, ctx: _Context) -> str:
    v = text.strip()
    if v not in k.choices:
        raise MetadataError(k.name, f"expected one of {' | '.join(k.choices)}, got {v!r}")
    return v


def _str(k: MetadataKey, text: str, ctx: _Context) -> str:
    v = text.strip()
    if len(v) > k.hi:
        raise MetadataError(k.name, f"at most {int(k.hi)} characters, got {len(v)}")
    return v


def _number(k: MetadataKey, text: str, ctx: _Context) -> float:
    if not _DECIMAL.fullmatch(text.strip()):
        raise MetadataError(k.name, f"expected a decimal number such as 1000 or 0.5, got {text!r}")
    v = float(text.strip())
    if not math.isfinite(v):
        raise MetadataError(k.name, f"expected a finite number, got {text!r}")
    if v < k.lo or (k.lo_open and v == k.lo) or v > k.hi or (k.hi_open and v == k.hi):
        raise MetadataError(k.name, f"must be in {k.bounds()}, got {text!r}")
    return v / k.per


def _int(k: MetadataKey, text: str, ctx: _Context) -> int:
    if not _INTEGER.fullmatch(text.strip()):
        raise MetadataError(k.name, f"expected an integer, got {text!r}")
    v = int(text.strip())
    if v < k.lo or (k.lo_open and v == k.lo) or v > k.hi or (k.hi_open and v == k.hi):
        raise MetadataError(k.name, f"must be in {k.bounds()}, got {text!r}")
    return v


def _bool(k: MetadataKey, text: str, ctx: _Context) -> bool:
    v = _BOOL.get(text.strip().lower())
    if v is None:
        raise MetadataError(k.name, f"expected true or false, got {text!r}")
    return v


def _check_url(name: str, text: str) -> str:
    try:
        u = urlparse(text.strip())
        u.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as e:
        raise MetadataError(name, f"not a URL ({e}): {text!r}") from None
    if u.scheme not in ("http", "https") or not u.netloc or not u.hostname:
        raise MetadataError(name, f"expected an http(s) URL, got {text!r}")
    return text.strip()


def _url(k: MetadataKey, text: str, ctx: _Context) -> str:
    """An http(s) URL, or empty (whether it is required depends on other keys)."""
    return _check_url(k.name, text.strip()) if text.strip() else ""


def _urls(k: MetadataKey, text: str, ctx: _Context) -> tuple[str, ...]:
    return tuple(_check_url(k.name, u) for u in (u.strip() for u in text.split(",")) if u)


def _selector(k: MetadataKey, text: str, ctx: _Context) -> str:
    """A Kubernetes label selector, in :func:`kvscale.labels.parse_selector`'s grammar (or empty)."""
    v = text.strip()
    if v:
        try:
            reqs = parse_selector(v)
        except ValueError:
            raise MetadataError(k.name, f"not a Kubernetes label selector: {v!r}") from None
        if not all(label_value_ok(value) for _, _, values in reqs for value in values):
            raise MetadataError(k.name, f"not a Kubernetes label selector: {v!r}")
    return v


def _namespace(k: MetadataKey, text: str, ctx: _Context) -> str:
    v = text.strip() or ctx.namespace
    if not _NAMESPACE.fullmatch(v):
        raise MetadataError(k.name, f"not a Kubernetes namespace name: {v!r}")
    return v


def _label(k: MetadataKey, text: str, ctx: _Context) -> str:
    """Empty, or a DNS label (a name shared by several ScaledObjects)."""
    v = text.strip()
    if v and (len(v) > 63 or not _NAMESPACE.fullmatch(v)):
        raise MetadataError(k.name, f"expected a DNS label (lower-case letters, digits, '-', at most 63), got {v!r}")
    return v


def _path(k: MetadataKey, text: str, ctx: _Context) -> str:
    v = text.strip()
    if not v.startswith("/"):
        raise MetadataError(k.name, f"must start with '/', got {v!r}")
    return v


def _promql(k: MetadataKey, text: str, ctx: _Context) -> str:
    v = text.strip().strip("{}")
    if v and any(not _PROM_MATCHER.match(m) for m in _split_matchers(v)):
        raise MetadataError(k.name, f'expected PromQL label matchers like job="x", got {v!r}')
    return v


def _latency_model(k: MetadataKey, text: str, ctx: _Context) -> str:
    """A built-in model name, or a latency-model file that loads (through the caller's loader, which may cache)."""
    v = text.strip()
    if v not in builtin_models() and not Path(v).is_file():
        raise MetadataError(k.name, f"{v!r} is neither a readable file nor a built-in model ({builtin_models()})")
    if ctx.load_model is not None:
        try:
            ctx.loaded[k.name] = ctx.load_model(v)
        except LatencyModelError as e:
            raise MetadataError(k.name, str(e)) from None
    return v


def _schedule(k: MetadataKey, text: str, ctx: _Context) -> tuple[FloorWindow, ...]:
    """Scheduled floor windows (:mod:`scaler.schedule`), or none."""
    try:
        return parse_schedule_floors(text)
    except ValueError as e:
        raise MetadataError(k.name, str(e)) from None


KINDS: dict[str, Callable[[MetadataKey, str, _Context], Any]] = {
    "choice": _choice, "str": _str, "number": _number, "int": _int, "bool": _bool, "url": _url, "urls": _urls,
    "selector": _selector, "namespace": _namespace, "path": _path, "promql": _promql, "label": _label,
    "latency-model": _latency_model, "schedule": _schedule,
}  # fmt: skip


def key(name: str, kind: str, default: str | None, doc: str, **spec: Any) -> Any:
    """A :class:`ScalerSettings` field read from the metadata key ``name`` (see :class:`MetadataKey`).

    The field's default is ``default`` parsed as the key would be (none for a required key)."""
    k = MetadataKey(name, kind, default, doc, **spec)
    if k.required:
        return field(metadata={"key": k})
    value = KINDS[kind](k, default or "", _Context("default", None))
    return field(default=value, metadata={"key": k})


@dataclass(frozen=True)
class ScalerSettings:
    """Everything one ScaledObject asks of the scaler (immutable; hashable for caching).

    Every field but ``raw`` is one metadata key, declared here once."""

    pool: str = key("pool", "choice", None, "required: prefill | decode | aggregated",
                    choices=POOLS, empty=f"required ({' | '.join(POOLS)})")  # fmt: skip
    model: str = key("model", "str", None, "required: served model name (vLLM's model_name label)",
                     empty="required (the served model name)", hi=MAX_MODEL_CHARS)  # fmt: skip
    latency_model: str = key("latencyModel", "latency-model", "llama-3.1-8b-h100",
                             "latency-model artifact: JSON file path or built-in name",
                             empty="must not be empty")  # fmt: skip
    ttft_slo_s: float = key("ttftSloMs", "number", "1000", "time-to-first-token SLO, milliseconds",
                            lo=0, lo_open=True, per=1000.0)  # fmt: skip
    itl_slo_s: float = key("itlSloMs", "number", "50", "inter-token-latency SLO, milliseconds",
                           lo=0, lo_open=True, per=1000.0)  # fmt: skip
    slo_percentile: float = key("sloPercentile", "number", "90", "percentile the SLOs apply to, in (0, 100)",
                                lo=0, hi=100, lo_open=True, hi_open=True)  # fmt: skip
    metrics_source: str = key("metricsSource", "choice", "pods", "pods (scrape each pod's /metrics) | prometheus",
                              choices=SOURCES)  # fmt: skip
    pod_selector: str = key("podSelector", "selector", None,
                            "pods mode: Kubernetes label selector of the pool's pods (or use podUrls)")  # fmt: skip
    pod_namespace: str = key("podNamespace", "namespace", None,
                             "pods mode: namespace of the pods (default: the ScaledObject's namespace)")  # fmt: skip
    metrics_port: int = key("metricsPort", "int", "8000", "pods mode: port of the pods' /metrics", lo=1, hi=65535)
    metrics_path: str = key("metricsPath", "path", "/metrics", "pods mode: path of the pods' metrics page")
    pod_urls: tuple[str, ...] = key(
        "podUrls", "urls", "", "pods mode without Kubernetes: comma-separated metrics URLs (replaces podSelector)"
    )
    prometheus_url: str = key("prometheusUrl", "url", None, "prometheus mode: base URL of the Prometheus HTTP API")
    prometheus_selector: str = key("prometheusSelector", "promql", "",
                                   'prometheus mode: extra PromQL label matchers, e.g. job="vllm-decode"')  # fmt: skip
    scale_to_zero: bool = key("scaleToZero", "bool", "false",
                              "allow 0 replicas after stableWindowSeconds without arrivals")  # fmt: skip
    stable_window_s: float = key("stableWindowSeconds", "number", "60",
                                 "scale down only after this long below the current count", lo=0, hi=3600)  # fmt: skip
    panic_window_s: float = key("panicWindowSeconds", "number", "10", "short window that triggers panic scale-up",
                                lo=0, hi=3600)  # fmt: skip
    panic_threshold: float = key("panicThreshold", "number", "2.0",
                                 "panic when the short-window need reaches this multiple of current replicas",
                                 lo=1, hi=100, lo_open=True)  # fmt: skip
    max_scale_up_rate: float = key("maxScaleUpRate", "number", "4.0",
                                   "at most this multiple of current replicas per decision (up)",
                                   lo=1, hi=1000, lo_open=True)  # fmt: skip
    max_scale_down_rate: float = key("maxScaleDownRate", "number", "2.0",
                                     "at most divide current replicas by this per decision (down)",
                                     lo=1, hi=1000, lo_open=True)  # fmt: skip
    max_burst_hold_s: float = key("maxBurstHoldSeconds", "number", "600",
                                  "longest gap between recurring bursts to hold burst capacity across (0 disables)",
                                  lo=0, hi=3600)  # fmt: skip
    startup_s: float = key("startupSeconds", "number", "90", "pod cold start: the forecast horizon", lo=0, hi=3600)
    signal_interval_s: float = key("signalIntervalSeconds", "number", "5",
                                   "how often signals are read and a decision is made", lo=0.1, hi=300)  # fmt: skip
    latency_window_s: float = key("latencyWindowSeconds", "number", "30",
                                  "window for observed latency percentiles and mean ISL/OSL (>= signalIntervalSeconds)",
                                  lo=0.1, hi=3600)  # fmt: skip
    kv_usage_threshold: float = key("kvUsageThreshold", "number", "0.9", "KV-cache usage above which capacity is added",
                                    lo=0.05, hi=1)  # fmt: skip
    max_num_seqs: int = key("maxNumSeqs", "int", "256", "the engine's max_num_seqs (decode batch limit)",
                            lo=1, hi=1 << 20)  # fmt: skip
    max_latency_correction: float = key("maxLatencyCorrection", "number", "1.5",
                                        "bound of the observed/predicted latency correction factor",
                                        lo=1, hi=10)  # fmt: skip
    target_utilization: float = key("targetUtilization", "number", "0.8",
                                    "fraction of the modelled per-replica capacity to plan for (tail headroom)",
                                    lo=0.05, hi=1)  # fmt: skip
    pod_deletion_cost: bool = key("podDeletionCost", "bool", "true",
                                  "pods mode with podSelector: while asking for fewer pods than there are, set "
                                  "each pod's controller.kubernetes.io/pod-deletion-cost to its running + waiting "
                                  "requests, so a scale-down deletes the idlest (RBAC: patch pods)")  # fmt: skip
    max_replicas: int = key("maxReplicas", "int", "100",
                            "most replicas ever asked for (set it to the ScaledObject's maxReplicaCount)",
                            lo=1, hi=100_000)  # fmt: skip
    variant_group: str = key("variantGroup", "label", "",
                             "heterogeneous variants: ScaledObjects of one pool role on different hardware that "
                             "share this name (same namespace) are scaled together at the least cost")  # fmt: skip
    cost_per_hour: float = key("costPerHour", "number", "0",
                               "variant groups: price of one replica per hour (any currency, the same in the group)",
                               lo=0, hi=1e6)  # fmt: skip
    min_replicas: int = key("minReplicas", "int", "0",
                            "variant groups: fewest replicas of this variant (set it to minReplicaCount)",
                            lo=0, hi=100_000)  # fmt: skip
    schedule_floors: tuple[FloorWindow, ...] = key("scheduleFloors", "schedule", "",
                                 "known peaks: YAML list of {start, end, desiredReplicas, timezone} windows (KEDA "
                                 "cron trigger fields; 5-field crons) during which at least desiredReplicas are "
                                 "asked for, from startupSeconds before each start")  # fmt: skip
    raw: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    @property
    def metric_name(self) -> str:
        """The metric name this scaler reports to KEDA (KEDA prefixes it with ``sN-``)."""
        return f"kvscale-desired-replicas-{self.pool}"


# The table: every key, in docs order, with the field it sets.
METADATA_KEYS: tuple[MetadataKey, ...] = tuple(
    dataclasses.replace(f.metadata["key"], field=f.name)
    for f in dataclasses.fields(ScalerSettings)
    if "key" in f.metadata
)
KEYS: dict[str, MetadataKey] = {k.name: k for k in METADATA_KEYS}


def _check_rules(v: dict[str, Any], model: LatencyModel | None) -> None:
    """The rules that span keys (``v``: field name -> parsed value; ``model``: the latency model, when loaded)."""
    if v["metrics_source"] == "pods" and not v["pod_selector"] and not v["pod_urls"]:
        raise MetadataError("podSelector", "required in pods mode (or give podUrls)")
    if v["metrics_source"] == "prometheus" and not v["prometheus_url"]:
        raise MetadataError("prometheusUrl", "required in prometheus mode")
    if v["variant_group"] and v["cost_per_hour"] <= 0:
        raise MetadataError("costPerHour", "required (> 0) when variantGroup is set: the split minimises cost")
    if v["min_replicas"] > v["max_replicas"]:
        raise MetadataError("minReplicas", f"must be <= maxReplicas ({v['max_replicas']}), got {v['min_replicas']}")
    for i, w in enumerate(v["schedule_floors"]):
        if w.replicas > v["max_replicas"]:
            raise MetadataError("scheduleFloors", f"window {i + 1}: desiredReplicas {w.replicas} is above maxReplicas "
                                                  f"({v['max_replicas']})")
    stable, panic = v["stable_window_s"], v["panic_window_s"]
    if panic > stable:
        raise MetadataError("panicWindowSeconds", f"must be <= stableWindowSeconds ({stable:g}), got {panic:g}")
    interval, latency = v["signal_interval_s"], v["latency_window_s"]
    if latency < interval:
        raise MetadataError("latencyWindowSeconds", f"must be >= signalIntervalSeconds ({interval:g}), got {latency:g}")
    if model is not None:  # an SLO the model cannot meet on an idle replica cannot be met by any replica count
        floors = {"ttftSloMs": (v["ttft_slo_s"], model.prefill_time(1) + model.request_overhead_s, "one-token prefill"),
                  "itlSloMs": (v["itl_slo_s"], model.decode_step_time(1, 1), "decode step")}  # fmt: skip
        for name, (slo, floor, what) in floors.items():
            if slo < floor:
                raise MetadataError(name, f"{slo * 1000:g} ms is below the latency model's unloaded {what} "
                                          f"({floor * 1000:.3g} ms for {model.name!r}): no replica count can meet it")


def parse_scaler_metadata(
    metadata: dict[str, str], namespace: str = "default", *, load_model: Callable[[str], LatencyModel] | None = None
) -> ScalerSettings:
    """Validate a ScaledObject's ``scalerMetadata``; ``namespace`` is the ScaledObject's (default podNamespace).

    A ``latencyModel`` file is validated by loading it with ``load_model`` (default :func:`load_latency_model`); the
    scaler service passes its model cache, so a new ScaledObject's model file is read once."""
    md = {str(k): str(v) for k, v in metadata.items()}
    unknown = sorted(set(md) - set(KEYS) - KEDA_KEYS)
    if unknown:
        raise MetadataError(unknown[0], f"unknown key (valid keys: {', '.join(KEYS)})")
    ctx = _Context(namespace, load_model or load_latency_model)
    values: dict[str, Any] = {}
    for k in METADATA_KEYS:
        text = md.get(k.name, k.default or "")
        if len(text) > MAX_VALUE_CHARS:
            raise MetadataError(k.name, f"a value of {len(text)} characters (at most {MAX_VALUE_CHARS})")
        if k.empty is not None and not text.strip():
            raise MetadataError(k.name, k.empty)
        values[k.field] = KINDS[k.kind](k, text, ctx)
    _check_rules(values, ctx.loaded.get("latencyModel"))
    return ScalerSettings(**values, raw=tuple(sorted(md.items())))


def _split_matchers(text: str) -> list[str]:
    """Split PromQL matchers on commas outside quoted values."""
    parts, cur, quoted, escaped = [], "", False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]

"""ScaledObject ``scalerMetadata`` → validated :class:`ScalerSettings`.

Keys are camelCase like KEDA's own scalers. Every value arrives as a string (KEDA passes ``metadata`` through
verbatim); each is parsed and range-checked here, and a bad or missing key raises :class:`MetadataError` naming
the key and the reason (the gRPC service answers ``INVALID_ARGUMENT`` with that message). Unknown keys are
rejected too, so a typo (``ttftSLOms``) is an error instead of a silently ignored setting.

``docs/scaler.md`` documents every key; :data:`KEYS` is the single list both the parser and the docs test use.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from kvscale.labels import split_selector

POOLS = ("prefill", "decode", "aggregated")
SOURCES = ("pods", "prometheus")

# key -> (default as KEDA would pass it, or None if required/derived; one-line meaning). Order = docs order.
# Keys KEDA's external trigger reads itself; KEDA still forwards the whole metadata map in scalerMetadata.
KEDA_KEYS = frozenset({"scalerAddress", "enableTLS", "unsafeSsl", "tlsCertFile", "caCert", "tlsClientCert",
                       "tlsClientKey"})  # fmt: skip

KEYS: dict[str, tuple[str | None, str]] = {
    "pool": (None, "required: prefill | decode | aggregated"),
    "model": (None, "required: served model name (vLLM's model_name label)"),
    "latencyModel": ("llama-3.1-8b-h100", "latency-model artifact: JSON file path or built-in name"),
    "ttftSloMs": ("1000", "time-to-first-token SLO, milliseconds"),
    "itlSloMs": ("50", "inter-token-latency SLO, milliseconds"),
    "sloPercentile": ("90", "percentile the SLOs apply to, in (0, 100)"),
    "metricsSource": ("pods", "pods (scrape each pod's /metrics) | prometheus"),
    "podSelector": (None, "pods mode: Kubernetes label selector of the pool's pods (or use podUrls)"),
    "podNamespace": (None, "pods mode: namespace of the pods (default: the ScaledObject's namespace)"),
    "metricsPort": ("8000", "pods mode: port of the pods' /metrics"),
    "metricsPath": ("/metrics", "pods mode: path of the pods' metrics page"),
    "podUrls": ("", "pods mode without Kubernetes: comma-separated metrics URLs (replaces podSelector)"),
    "prometheusUrl": (None, "prometheus mode: base URL of the Prometheus HTTP API"),
    "prometheusSelector": ("", "prometheus mode: extra PromQL label matchers, e.g. job=\"vllm-decode\""),
    "scaleToZero": ("false", "allow 0 replicas after stableWindowSeconds without arrivals"),
    "stableWindowSeconds": ("60", "scale down only after this long below the current count"),
    "panicWindowSeconds": ("10", "short window that triggers panic scale-up"),
    "panicThreshold": ("2.0", "panic when the short-window need reaches this multiple of current replicas"),
    "maxScaleUpRate": ("4.0", "at most this multiple of current replicas per decision (up)"),
    "maxScaleDownRate": ("2.0", "at most divide current replicas by this per decision (down)"),
    "maxBurstHoldSeconds": ("600", "longest gap between recurring bursts to hold burst capacity across (0 disables)"),
    "startupSeconds": ("90", "pod cold start: the forecast horizon"),
    "signalIntervalSeconds": ("5", "how often signals are read and a decision is made"),
    "latencyWindowSeconds": ("30", "window for observed latency percentiles and mean ISL/OSL"),
    "kvUsageThreshold": ("0.9", "KV-cache usage above which capacity is added"),
    "maxNumSeqs": ("256", "the engine's max_num_seqs (decode batch limit)"),
    "maxLatencyCorrection": ("1.5", "bound of the observed/predicted latency correction factor"),
    "targetUtilization": ("0.8", "fraction of the modelled per-replica capacity to plan for (tail headroom)"),
}


class MetadataError(ValueError):
    """A scalerMetadata key is missing or invalid; the message names the key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"scalerMetadata.{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class ScalerSettings:
    """Everything one ScaledObject asks of the scaler (immutable; hashable for caching)."""

    pool: str
    model: str
    latency_model: str = KEYS["latencyModel"][0]  # type: ignore[assignment]
    ttft_slo_s: float = 1.0
    itl_slo_s: float = 0.05
    slo_percentile: float = 90.0
    metrics_source: str = "pods"
    pod_selector: str = ""
    pod_namespace: str = "default"
    metrics_port: int = 8000
    metrics_path: str = "/metrics"
    pod_urls: tuple[str, ...] = ()
    prometheus_url: str = ""
    prometheus_selector: str = ""
    scale_to_zero: bool = False
    stable_window_s: float = 60.0
    panic_window_s: float = 10.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 4.0
    max_scale_down_rate: float = 2.0
    max_burst_hold_s: float = 600.0
    startup_s: float = 90.0
    signal_interval_s: float = 5.0
    latency_window_s: float = 30.0
    kv_usage_threshold: float = 0.9
    max_num_seqs: int = 256
    max_latency_correction: float = 1.5
    target_utilization: float = 0.8
    raw: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    @property
    def metric_name(self) -> str:
        """The metric name this scaler reports to KEDA (KEDA prefixes it with ``sN-``)."""
        return f"kvscale-desired-replicas-{self.pool}"


_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
# A permissive check of Kubernetes label-selector syntax: comma-separated requirements.
_SELECTOR_REQ = re.compile(
    r"^\s*(!?[A-Za-z0-9./_-]+(\s*(=|==|!=)\s*[A-Za-z0-9._-]*)?|[A-Za-z0-9./_-]+\s+(in|notin)\s+\([A-Za-z0-9._,\s-]*\))\s*$"
)
_PROM_MATCHER = re.compile(r'^\s*[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*$')


def _number(md: dict[str, str], key: str, *, lo: float, hi: float = math.inf, lo_open: bool = False,
            hi_open: bool = False) -> float:  # fmt: skip
    text = md.get(key, KEYS[key][0])
    assert text is not None
    try:
        v = float(text.strip())
    except ValueError:
        raise MetadataError(key, f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise MetadataError(key, f"expected a finite number, got {text!r}")
    if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
        lo_b, hi_b = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise MetadataError(key, f"must be in {lo_b}{lo:g}, {hi:g}{hi_b}, got {text!r}")
    return v


def _int(md: dict[str, str], key: str, *, lo: int, hi: int) -> int:
    text = md.get(key, KEYS[key][0])
    assert text is not None
    try:
        v = int(text.strip())
    except ValueError:
        raise MetadataError(key, f"expected an integer, got {text!r}") from None
    if not lo <= v <= hi:
        raise MetadataError(key, f"must be in [{lo}, {hi}], got {text!r}")
    return v


def _url(key: str, text: str) -> str:
    u = urlparse(text.strip())
    if u.scheme not in ("http", "https") or not u.netloc:
        raise MetadataError(key, f"expected an http(s) URL, got {text!r}")
    return text.strip()


def parse_scaler_metadata(metadata: dict[str, str], namespace: str = "default") -> ScalerSettings:
    """Validate a ScaledObject's ``scalerMetadata``; ``namespace`` is the ScaledObject's (default podNamespace)."""
    md = {str(k): str(v) for k, v in metadata.items()}
    unknown = sorted(set(md) - set(KEYS) - KEDA_KEYS)
    if unknown:
        raise MetadataError(unknown[0], f"unknown key (valid keys: {', '.join(KEYS)})")

    pool = md.get("pool", "").strip()
    if not pool:
        raise MetadataError("pool", f"required ({' | '.join(POOLS)})")
    if pool not in POOLS:
        raise MetadataError("pool", f"expected one of {' | '.join(POOLS)}, got {pool!r}")
    model = md.get("model", "").strip()
    if not model:
        raise MetadataError("model", "required (the served model name)")

    latency = md.get("latencyModel", KEYS["latencyModel"][0] or "").strip()
    if not latency:
        raise MetadataError("latencyModel", "must not be empty")
    from kvscale.latency import LatencyModelError, builtin_models, load_latency_model

    if latency not in builtin_models():
        if not Path(latency).is_file():
            raise MetadataError(
                "latencyModel", f"{latency!r} is neither a readable file nor a built-in model ({builtin_models()})"
            )
        try:
            load_latency_model(latency)
        except LatencyModelError as e:
            raise MetadataError("latencyModel", str(e)) from None

    source = md.get("metricsSource", "pods").strip()
    if source not in SOURCES:
        raise MetadataError("metricsSource", f"expected one of {' | '.join(SOURCES)}, got {source!r}")

    selector = md.get("podSelector", "").strip()
    pod_urls = tuple(u.strip() for u in md.get("podUrls", "").split(",") if u.strip())
    for u in pod_urls:
        _url("podUrls", u)
    if selector and any(not _SELECTOR_REQ.match(part) for part in split_selector(selector)):
        raise MetadataError("podSelector", f"not a Kubernetes label selector: {selector!r}")
    if source == "pods" and not selector and not pod_urls:
        raise MetadataError("podSelector", "required in pods mode (or give podUrls)")
    pod_ns = md.get("podNamespace", "").strip() or namespace
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", pod_ns):
        raise MetadataError("podNamespace", f"not a Kubernetes namespace name: {pod_ns!r}")
    path = md.get("metricsPath", "/metrics").strip()
    if not path.startswith("/"):
        raise MetadataError("metricsPath", f"must start with '/', got {path!r}")

    prom_url = md.get("prometheusUrl", "").strip()
    if source == "prometheus" and not prom_url:
        raise MetadataError("prometheusUrl", "required in prometheus mode")
    if prom_url:
        _url("prometheusUrl", prom_url)
    prom_sel = md.get("prometheusSelector", "").strip().strip("{}")
    if prom_sel and any(not _PROM_MATCHER.match(m) for m in _split_matchers(prom_sel)):
        raise MetadataError("prometheusSelector", f'expected PromQL label matchers like job="x", got {prom_sel!r}')

    s2z_text = md.get("scaleToZero", "false").strip().lower()
    if s2z_text not in _BOOL:
        raise MetadataError("scaleToZero", f"expected true or false, got {md['scaleToZero']!r}")

    ttft = _number(md, "ttftSloMs", lo=0, lo_open=True) / 1000.0
    itl = _number(md, "itlSloMs", lo=0, lo_open=True) / 1000.0
    interval = _number(md, "signalIntervalSeconds", lo=0.1, hi=300)
    stable = _number(md, "stableWindowSeconds", lo=0, hi=3600)
    panic = _number(md, "panicWindowSeconds", lo=0, hi=3600)
    if panic > stable:
        raise MetadataError("panicWindowSeconds", f"must be <= stableWindowSeconds ({stable:g}), got {panic:g}")
    return ScalerSettings(
        pool=pool,
        model=model,
        latency_model=latency,
        ttft_slo_s=ttft,
        itl_slo_s=itl,
        slo_percentile=_number(md, "sloPercentile", lo=0, hi=100, lo_open=True, hi_open=True),
        metrics_source=source,
        pod_selector=selector,
        pod_namespace=pod_ns,
        metrics_port=_int(md, "metricsPort", lo=1, hi=65535),
        metrics_path=path,
        pod_urls=pod_urls,
        prometheus_url=prom_url,
        prometheus_selector=prom_sel,
        scale_to_zero=_BOOL[s2z_text],
        stable_window_s=stable,
        panic_window_s=panic,
        panic_threshold=_number(md, "panicThreshold", lo=1, hi=100, lo_open=True),
        max_scale_up_rate=_number(md, "maxScaleUpRate", lo=1, hi=1000, lo_open=True),
        max_scale_down_rate=_number(md, "maxScaleDownRate", lo=1, hi=1000, lo_open=True),
        max_burst_hold_s=_number(md, "maxBurstHoldSeconds", lo=0, hi=3600),
        startup_s=_number(md, "startupSeconds", lo=0, hi=3600),
        signal_interval_s=interval,
        latency_window_s=_number(md, "latencyWindowSeconds", lo=interval, hi=3600),
        kv_usage_threshold=_number(md, "kvUsageThreshold", lo=0, hi=1, lo_open=True),
        max_num_seqs=_int(md, "maxNumSeqs", lo=1, hi=1 << 20),
        max_latency_correction=_number(md, "maxLatencyCorrection", lo=1, hi=10),
        target_utilization=_number(md, "targetUtilization", lo=0, hi=1, lo_open=True),
        raw=tuple(sorted(md.items())),
    )


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

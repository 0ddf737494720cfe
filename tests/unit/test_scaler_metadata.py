"""ScaledObject metadata: defaults, every key validated, errors naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scaler.metadata import KEYS, MetadataError, parse_scaler_metadata

BASE = {"pool": "decode", "model": "llama", "podSelector": "app=vllm,role in (decode)"}


def test_defaults_and_namespace():
    s = parse_scaler_metadata(BASE, namespace="llm")
    assert (s.pool, s.model, s.pod_namespace, s.metrics_source) == ("decode", "llama", "llm", "pods")
    assert (s.ttft_slo_s, s.itl_slo_s, s.slo_percentile) == (1.0, 0.05, 90.0)
    assert (s.stable_window_s, s.panic_window_s, s.startup_s, s.signal_interval_s) == (60.0, 10.0, 90.0, 5.0)
    assert s.metric_name == "kvscale-desired-replicas-decode"
    # every documented default parses to the dataclass default
    explicit = {k: v for k, (v, _) in KEYS.items() if v not in (None, "")}
    assert parse_scaler_metadata({**BASE, **explicit}, namespace="llm") == s


def test_max_burst_hold_seconds():
    assert parse_scaler_metadata(BASE).max_burst_hold_s == 600.0
    assert parse_scaler_metadata({**BASE, "maxBurstHoldSeconds": "0"}).max_burst_hold_s == 0.0  # disables the hold
    assert parse_scaler_metadata({**BASE, "maxBurstHoldSeconds": " 240 "}).max_burst_hold_s == 240.0
    with pytest.raises(MetadataError, match=r"^scalerMetadata\.maxBurstHoldSeconds: must be in \[0, 3600\]"):
        parse_scaler_metadata({**BASE, "maxBurstHoldSeconds": "-5"})


def test_every_key_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "scaler.md").read_text()
    for key, (default, _) in KEYS.items():
        assert f"`{key}`" in doc, key
        if default:
            assert re.search(rf"`{key}`[^\n]*{re.escape(default)}", doc), f"{key}: default {default} not in docs"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"pool": "both"}, "pool"),
        ({"model": " "}, "model"),
        ({"ttftSloMs": "-1"}, "ttftSloMs"),
        ({"itlSloMs": "nan"}, "itlSloMs"),
        ({"sloPercentile": "0"}, "sloPercentile"),
        ({"metricsSource": "prometheus"}, "prometheusUrl"),
        ({"metricsSource": "prometheus", "prometheusUrl": "ftp://x"}, "prometheusUrl"),
        ({"metricsSource": "prometheus", "prometheusUrl": "http://p:9090", "prometheusSelector": "job=x"},
         "prometheusSelector"),
        ({"podSelector": ""}, "podSelector"),
        ({"podSelector": "a b c"}, "podSelector"),
        ({"podNamespace": "Bad_NS"}, "podNamespace"),
        ({"metricsPort": "70000"}, "metricsPort"),
        ({"metricsPath": "metrics"}, "metricsPath"),
        ({"podUrls": "not-a-url"}, "podUrls"),
        ({"scaleToZero": "maybe"}, "scaleToZero"),
        ({"panicWindowSeconds": "100"}, "panicWindowSeconds"),
        ({"panicThreshold": "1"}, "panicThreshold"),
        ({"maxScaleUpRate": "0.5"}, "maxScaleUpRate"),
        ({"maxScaleDownRate": "x"}, "maxScaleDownRate"),
        ({"maxBurstHoldSeconds": "-1"}, "maxBurstHoldSeconds"),
        ({"maxBurstHoldSeconds": "ten minutes"}, "maxBurstHoldSeconds"),
        ({"maxBurstHoldSeconds": "7200"}, "maxBurstHoldSeconds"),
        ({"startupSeconds": "-5"}, "startupSeconds"),
        ({"kvUsageThreshold": "1.5"}, "kvUsageThreshold"),
        ({"targetUtilization": "0"}, "targetUtilization"),
        ({"latencyModel": "no-such-model"}, "latencyModel"),
        ({"maxNumSeqs": "1.5"}, "maxNumSeqs"),
        ({"stableWindowSecs": "10"}, "stableWindowSecs"),
    ],
)
def test_bad_values_name_the_key(change: dict[str, str], key: str):
    with pytest.raises(MetadataError) as err:
        parse_scaler_metadata({**BASE, **change})
    assert err.value.key == key
    assert str(err.value).startswith(f"scalerMetadata.{key}: ")


def test_prometheus_mode_and_files(tmp_path: Path):
    s = parse_scaler_metadata({"pool": "prefill", "model": "m", "metricsSource": "prometheus",
                               "prometheusUrl": "http://prom:9090", "prometheusSelector": 'job="vllm",ns=~"a.*"'})
    assert s.prometheus_selector == 'job="vllm",ns=~"a.*"' and s.pod_selector == ""
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(MetadataError) as err:
        parse_scaler_metadata({**BASE, "latencyModel": str(bad)})
    assert err.value.key == "latencyModel" and "schema" in err.value.reason

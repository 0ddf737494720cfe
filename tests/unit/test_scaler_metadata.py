"""ScaledObject metadata: defaults, every key validated, errors naming the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaler.metadata import KEYS, METADATA_KEYS, MetadataError, ScalerSettings, parse_scaler_metadata

BASE = {"pool": "decode", "model": "llama", "podSelector": "app=vllm,role in (decode)"}


def test_defaults_and_namespace():
    s = parse_scaler_metadata(BASE, namespace="llm")
    assert (s.pool, s.model, s.pod_namespace, s.metrics_source) == ("decode", "llama", "llm", "pods")
    assert (s.ttft_slo_s, s.itl_slo_s, s.slo_percentile) == (1.0, 0.05, 90.0)
    assert (s.stable_window_s, s.panic_window_s, s.startup_s, s.signal_interval_s) == (60.0, 10.0, 90.0, 5.0)
    assert s.metric_name == "kvscale-desired-replicas-decode"
    # every documented default parses to the dataclass default
    explicit = {k.name: k.default for k in METADATA_KEYS if k.default not in (None, "")}
    assert parse_scaler_metadata({**BASE, **explicit}, namespace="llm") == s


def test_max_burst_hold_seconds():
    assert parse_scaler_metadata(BASE).max_burst_hold_s == 600.0
    assert parse_scaler_metadata({**BASE, "maxBurstHoldSeconds": "0"}).max_burst_hold_s == 0.0  # disables the hold
    assert parse_scaler_metadata({**BASE, "maxBurstHoldSeconds": " 240 "}).max_burst_hold_s == 240.0
    with pytest.raises(MetadataError, match=r"^scalerMetadata\.maxBurstHoldSeconds: must be in \[0, 3600\]"):
        parse_scaler_metadata({**BASE, "maxBurstHoldSeconds": "-5"})


def test_every_key_is_declared_once_on_its_field():
    fields = [f.name for f in dataclasses.fields(ScalerSettings)]
    assert [k.field for k in METADATA_KEYS] == [f for f in fields if f != "raw"]  # every field but raw is a key
    assert len(KEYS) == len(METADATA_KEYS) and list(KEYS) == [k.name for k in METADATA_KEYS]
    for k in METADATA_KEYS:
        f = ScalerSettings.__dataclass_fields__[k.field]
        if k.required:
            assert f.default is dataclasses.MISSING, k.name
        elif k.default:  # the field's default is the documented text, parsed (ms → s for the SLOs)
            one = parse_scaler_metadata({**BASE, k.name: k.default})
            assert getattr(one, k.field) == f.default, k.name
    assert ScalerSettings.__dataclass_fields__["ttft_slo_s"].default == 1.0  # 1000 ms
    assert ScalerSettings.__dataclass_fields__["itl_slo_s"].default == 0.05  # 50 ms


def _docs_table() -> dict[str, str]:
    """The ``Metadata keys`` table of docs/scaler.md: key -> its default cell."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "scaler.md").read_text()
    section = doc.split("## Metadata keys", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Za-z]+)` \| ([^|]*) \|", section, flags=re.M)
    return {key: default.strip() for key, default in rows}


def test_every_key_is_documented():
    table = _docs_table()
    assert list(table) == [k.name for k in METADATA_KEYS]  # every key, no other, in the table's order
    for k in METADATA_KEYS:
        cell = table[k.name]
        if k.required:
            assert cell.startswith("required"), f"{k.name}: documented as {cell!r}, but it is required"
        elif k.default:
            assert f"`{k.default}`" in cell, f"{k.name}: default {k.default} not in the docs ({cell!r})"
        else:
            assert cell, k.name


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


def test_latency_model_validation_uses_the_callers_loader(tmp_path: Path):
    from kvscale.latency import load_latency_model

    path = tmp_path / "m.json"
    path.write_text(load_latency_model("llama-3.1-8b-h100").dumps())
    calls: list[str] = []

    def loader(spec: str):
        calls.append(spec)
        return load_latency_model(spec)

    s = parse_scaler_metadata({**BASE, "latencyModel": str(path)}, load_model=loader)
    assert s.latency_model == str(path) and calls == [str(path)]  # the file is read by the loader, once
    parse_scaler_metadata(BASE, load_model=loader)  # a built-in too (its step times bound the SLOs)
    assert calls == [str(path), "llama-3.1-8b-h100"]


def test_pod_selector_uses_the_label_selector_grammar():
    for ok in ("app=vllm", "app==vllm,tier!=x", "app in (a, b),!legacy", "role notin (prefill)", "example.com/pool=d"):
        assert parse_scaler_metadata({**BASE, "podSelector": ok}).pod_selector == ok
    for bad in ("a b c", "app=vllm,", "app=v@x", "-bad=x", "app in (a"):
        with pytest.raises(MetadataError, match=r"^scalerMetadata\.podSelector: not a Kubernetes label selector"):
            parse_scaler_metadata({**BASE, "podSelector": bad})


_keys = st.sampled_from([*KEYS, "scalerAddress", "bogus", "ttftSLOms"])
_values = st.one_of(st.text(max_size=40), st.sampled_from(["0", "-1", "1e308", "nan", "inf", "1_0", "0.5", "true",
                                                           "http://[::1", "http://h:99999", "app=vllm", "prefill",
                                                           "aggregated", "\uff11\uff10", " 5 ", "x" * 5000]))


@settings(max_examples=400, deadline=None)
@given(md=st.dictionaries(_keys, _values, max_size=8))
def test_fuzzed_metadata_parses_or_names_the_key(md: dict[str, str]):
    """Any map either parses (every number finite and in bounds) or raises MetadataError with a short message;
    no other exception (the gRPC face would answer it as INTERNAL, never as UNKNOWN, but it must not happen)."""
    try:
        s = parse_scaler_metadata({**BASE, **md})
    except MetadataError as e:
        assert str(e).startswith("scalerMetadata.") and len(str(e)) < 1200
        return
    assert s.max_replicas >= 1 and 0 < s.target_utilization <= 1 and s.ttft_slo_s > 0

"""``kvscale eval scaling --variants``: a mixed fleet of GPU variants against single-variant fleets and the oracle,
on the virtual clock with the real scaler classes (ScalingPolicy per variant, VariantGroup, the HPA emulation)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kvscale.cli import main
from scaler.evaluate.run import EvalConfig
from scaler.evaluate.variants import MIN_REPLICAS, VariantEvaluation, parse_variants


@pytest.mark.parametrize(("text", "message"), [
    ("h100", "expected SPEC:COST"),
    ("h100:4,a100-40gb:1.6:0", "MAX must be >= 1"),
    ("h100:4,a100-40gb:x", "is not a number"),
    ("h100:4,a100-40gb:-1", "cost must be > 0"),
    ("h100:4,nope:1", "no such file or built-in model"),
    ("h100:4", "at least two variants"),
    ("h100:4,h100:3", "given twice"),
])  # fmt: skip
def test_bad_variants_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_variants(text)


def test_shorthands_and_model_names() -> None:
    vs = parse_variants("h100:4.0, llama-3-8b-a100-40gb-vllm-public:1.6:3")
    assert [(v.name, v.model_spec, v.cost_per_hour, v.max_replicas) for v in vs] == [
        ("h100", "llama-3-8b-h100-vllm-public", 4.0, None),
        ("llama-3-8b-a100-40gb-vllm-public", "llama-3-8b-a100-40gb-vllm-public", 1.6, 3)]  # fmt: skip


@pytest.fixture(scope="module")
def evaluation() -> VariantEvaluation:
    cfg = EvalConfig(trace="step", workload="chat", duration_s=240.0, peak_replicas=3.0, startup_s=20.0)
    return VariantEvaluation(cfg, parse_variants("h100:4.0,a100-40gb:1.6:2"))  # a quota of 2 A100 nodes


def test_mixed_oracle_provides_the_least_cost_cover_of_its_window(evaluation: VariantEvaluation) -> None:
    o = evaluation.oracle
    names = list(o.alone)
    for i in range(o.n):
        got = o._split(i)
        if not any(a[i] > 0 for a in o.alone.values()):
            assert got == dict.fromkeys(names, MIN_REPLICAS)
            continue
        covers = [c for c in itertools.product(range(MIN_REPLICAS, 12), range(MIN_REPLICAS, 3))  # A100 quota: 2
                  if sum(n / o.alone[v][i] for n, v in zip(c, names, strict=True)) >= 1 - 1e-9]  # fmt: skip
        best = min(sum(n * evaluation.costs[v] for n, v in zip(c, names, strict=True)) for c in covers)
        assert sum(n * evaluation.costs[v] for v, n in got.items()) == pytest.approx(best)
    for t in range(0, int(o.n * o.bucket_s), 5):  # what it provides covers every bucket it looks ahead to
        counts = o.counts(float(t))
        i0 = min(int(t // o.bucket_s), o.n - 1)
        i1 = max(min(int((t + o.startup_s + 5) // o.bucket_s) + 1, o.n), i0 + 1)
        assert all(o._covers(counts, j) for j in range(i0, i1)) or counts["a100-40gb"] == 2
        assert counts["a100-40gb"] <= 2


def test_every_policy_reports_cost_and_gpu_hours_per_variant(evaluation: VariantEvaluation, tmp_path: Path) -> None:
    res = evaluation.run()
    assert list(res["policies"]) == ["kvscale-mixed", "oracle-mixed", "kvscale-h100", "oracle-h100",
                                     "kvscale-a100-40gb", "oracle-a100-40gb"]  # fmt: skip
    for name, f in res["policies"].items():
        hours = f["gpu_hours_per_variant"]
        assert f["gpu_hours"] == pytest.approx(sum(hours.values()))
        assert f["cost"] == pytest.approx(4.0 * hours["h100"] + 1.6 * hours["a100-40gb"])
        assert 0 <= f["slo_attainment"] <= 1
        if name.endswith("-mixed"):
            assert hours["h100"] > 0 and hours["a100-40gb"] > 0  # both Deployments ran (at least one pod each)
        else:
            assert (hours["h100"] > 0) == name.endswith("h100") and (hours["a100-40gb"] > 0) != name.endswith("h100")
    assert res["policies"]["oracle-a100-40gb"]["max_replicas"] <= 2  # and on the A100-only fleet
    # the same requests on every fleet
    assert len({ev.trace[-1].arrival_s for ev in evaluation.singles.values()}) == 1
    assert res["requests"] == len(evaluation.trace) and res["sized_on"] == "h100"
    json.dumps(res)


def test_cli_variants(tmp_path: Path, capsys) -> None:
    assert main(["eval", "scaling", "--variants", "h100:4"]) == 2
    assert "at least two variants" in capsys.readouterr().err
    assert main(["eval", "scaling", "--variants", "h100:4,a100-40gb:1.6", "--pools", "pd"]) == 2
    assert "only aggregated pools" in capsys.readouterr().err


def test_a_mixed_pools_replicas_carry_their_latency_model_label(evaluation: VariantEvaluation) -> None:
    """What the router's slo scorer reads (kvscale.io/latency-model): each replica's own variant's model."""
    c = evaluation._cluster({"h100": 1, "a100-40gb": 2})
    assert sorted(r.view.variant for r in c.replicas) == ["llama-3-8b-a100-40gb-vllm-public"] * 2 + [
        "llama-3-8b-h100-vllm-public"]  # fmt: skip
    assert {r.variant: c.latency_of(r).name for r in c.replicas} == {
        "h100": "llama-3-8b-h100-vllm-public", "a100-40gb": "llama-3-8b-a100-40gb-vllm-public"}  # fmt: skip

"""``kvscale eval scaling --trace-file``: a recorded trace (3 minutes of the committed Azure code trace) sized
to a replica peak, every figure per policy, policies in worker processes giving the same figures as one by one,
and the bad input a user can give (clear message, exit 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvscale.cli import main
from kvscale.traces import import_trace, window
from scaler.evaluate.run import EvalConfig, Evaluation

AZURE = Path(__file__).resolve().parents[2] / "data" / "traces" / "azure-llm-2023-code.csv"
POLICIES = ("kvscale", "static-peak", "oracle")


@pytest.fixture(scope="module")
def azure_3min() -> list:
    return window(import_trace("azure", AZURE), 900.0, 1080.0)


def _evaluation(trace: list, **kw: object) -> Evaluation:
    return Evaluation(EvalConfig(requests=trace, trace_name="azure", policies=POLICIES, startup_s=20.0, **kw))


def test_a_trace_file_is_sized_so_the_oracle_peak_needs_peak_replicas(azure_3min: list) -> None:
    ev = _evaluation(azure_3min, peak_replicas=4.0)
    peak = float(ev._needs("aggregated", ev.trace).max())  # the busiest bucket's need, fractional
    assert peak == pytest.approx(4.0, rel=0.05), peak
    assert int(ev.schedules["aggregated"].max()) in (4, 5)
    assert ev.scale > 1.0 and len(ev.trace) > len(azure_3min)  # the 3-minute window needs fewer than 4 at 1x
    assert ev.cfg.duration_s == pytest.approx(ev.trace[-1].arrival_s + 1.0, abs=1.0)
    as_given = _evaluation(azure_3min, size_to_peak=False)
    assert as_given.scale == 1.0 and len(as_given.trace) == len(azure_3min)


def test_policies_in_workers_give_the_figures_of_one_by_one(azure_3min: list) -> None:
    ev = _evaluation(azure_3min, peak_replicas=3.0)
    serial, forked = ev.run(jobs=1), ev.run(jobs=2)
    assert forked["jobs"] == 2
    for name in POLICIES:
        a, b = dict(serial["policies"][name]), dict(forked["policies"][name])
        a.pop("wall_s"), b.pop("wall_s")
        assert a == b, name
        assert serial["timelines"][name] == forked["timelines"][name]
    figs = serial["policies"]
    for name in POLICIES:
        f = figs[name]
        for key in ("gpu_hours", "slo_attainment", "ttft_p90_s", "ttft_p99_s", "itl_p90_s"):
            assert math.isfinite(f[key]) and f[key] >= 0, (name, key)
        assert f["requests_dropped"] == 0
    peak = int(ev.schedules["aggregated"].max())
    assert peak in (3, 4)
    assert figs["static-peak"]["max_replicas"] == peak and figs["static-peak"]["scale_events"] == 0
    assert figs["oracle"]["max_replicas"] <= peak
    assert figs["oracle"]["gpu_hours"] < figs["static-peak"]["gpu_hours"]


def test_the_command_on_a_trace_file_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res.json"
    rc = main(["eval", "scaling", "--trace-file", str(AZURE), "--format", "azure", "--window", "900:1020",
               "--rate-scale", "2", "--startup-seconds", "20", "--policies", "static-peak,oracle", "--jobs", "1",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["trace"] == AZURE.name and res["workload"] == "recorded" and res["rate_scale"] == 1.0
    n = len(window(import_trace("azure", AZURE), 900.0, 1020.0))
    assert abs(res["requests"] - 2 * n) <= 0.1 * n  # --rate-scale 2 (copies drawn at random), no sizing on top
    assert set(res["policies"]) == {"static-peak", "oracle"}
    assert "azure-llm-2023-code.csv x recorded" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace-file", "AZ", "--format", "azure", "--rate", "3"], "--rate applies to the synthetic traces"),
        (["--trace-file", "AZ", "--format", "azure", "--duration", "60"], "--duration applies to the synthetic"),
        (["--window", "0:60"], "apply to --trace-file"),
        (["--trace-file", "BAD", "--format", "kvscale"], "BAD.jsonl:2"),
        (["--trace-file", "MISSING", "--format", "kvscale"], "no such file"),
    ],
)
def test_bad_input_is_a_clear_error(args: list[str], message: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    bad = tmp_path / "BAD.jsonl"
    bad.write_text('{"arrival_s": 0, "input_len": 10, "output_len": 5}\n{"arrival_s": "soon"}\n')
    subs = {"AZ": str(AZURE), "BAD": str(bad), "MISSING": str(tmp_path / "missing.jsonl")}
    args = [subs.get(a, a) for a in args]
    assert main(["eval", "scaling", *args, "--policies", "oracle", "--jobs", "1"]) == 2
    assert message in capsys.readouterr().err


def test_an_slo_no_replica_meets_is_named_not_sized(azure_3min: list) -> None:
    with pytest.raises(ValueError, match="no replica meets the SLO"):
        _evaluation(azure_3min, ttft_slo_ms=60.0)  # below one prefill of the trace's mean prompt
    as_given = _evaluation(azure_3min, ttft_slo_ms=60.0, size_to_peak=False)  # at --rate-scale: runs, plans the max
    assert int(as_given.schedules["aggregated"].max()) == as_given.cfg.max_replicas


MOONCAKE = AZURE.parent / "mooncake-fast25-synthetic.jsonl"


def test_the_router_policy_dispatches_and_changes_the_prefix_hits() -> None:
    trace = window(import_trace("mooncake", MOONCAKE), 0.0, 120.0)
    cfg = {"requests": trace, "policies": ("static-peak",), "startup_s": 20.0, "peak_replicas": 4.0,
           "ttft_slo_ms": 6000.0, "itl_slo_ms": 100.0}  # fmt: skip
    own = Evaluation(EvalConfig(**cfg)).run()
    routed = Evaluation(EvalConfig(**cfg, router_policy="prefix")).run()
    assert own["router_policy"] == "least-request" and routed["router_policy"] == "prefix"
    hit_own, hit_prefix = (r["policies"]["static-peak"]["prefix_hit_rate"] for r in (own, routed))
    assert 0 <= hit_own < hit_prefix <= 1, (hit_own, hit_prefix)  # the prefix-aware router finds the sharing
    with pytest.raises(ValueError, match="--router-policy: unknown 'nope'"):
        Evaluation(EvalConfig(**cfg, router_policy="nope"))

"""The router's own policy Pipeline on the virtual-clock cluster (router.evaluate) and `kvscale eval routing`, on a
slice of the real Mooncake trace (data/traces)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvscale.cli import main
from kvscale.latency import load_latency_model
from kvscale.traces import import_trace, window
from router.evaluate.dispatch import PipelineDispatcher
from router.evaluate.run import RoutingSetup, goodput, run_policy
from simulator.cluster import Cluster

MOONCAKE = Path(__file__).resolve().parents[2] / "data" / "traces" / "mooncake-fast25-synthetic.jsonl"
LAT = load_latency_model("llama-3.1-8b-h100")


@pytest.fixture(scope="module")
def trace():
    return window(import_trace("mooncake", MOONCAKE), 0.0, 90.0)


@pytest.fixture(scope="module")
def rows(trace):
    setup = RoutingSetup(LAT, replicas=4)
    return {p: run_policy(trace, p, setup) for p in ("round-robin", "prefix", "kv-events")}


def test_prefix_aware_policies_find_the_traces_sharing(rows, trace):
    rr, prefix, kv = rows["round-robin"], rows["prefix"], rows["kv-events"]
    assert rr["completed"] == prefix["completed"] == kv["completed"] > 0.99 * len(trace)
    assert prefix["prefix_hit_rate"] > rr["prefix_hit_rate"] + 0.01
    assert kv["prefix_hit_rate"] > rr["prefix_hit_rate"] + 0.01
    assert kv["ttft_p50_s"] < rr["ttft_p50_s"]
    for r in rows.values():
        assert r["load_imbalance"] >= 1.0 and r["rejected_by_filters"] == 0
        assert r["ttft_p50_s"] <= r["ttft_p90_s"] <= r["ttft_p99_s"]


def test_kv_events_lost_cost_hits(trace, rows):
    lost = run_policy(trace, "kv-events", RoutingSetup(LAT, replicas=4, kv_event_drop=1.0))
    kept = rows["kv-events"]
    assert lost["kv_event_batches_dropped"] > 0 and kept["kv_event_batches_dropped"] == 0
    assert lost["prefix_hit_rate"] < kept["prefix_hit_rate"]


def test_goodput_bisects_on_the_slo():
    calls = []

    def fake_run(trace, policy, setup):  # P90 TTFT grows with the speed: within 1 s up to speed 3
        x = trace[-1].arrival_s and 100.0 / trace[-1].arrival_s
        calls.append(x)
        return {"ttft_p90_s": x / 3}

    from kvscale.traces import TraceRequest

    tr = [TraceRequest(float(t), None, 10, 10) for t in range(101)]
    g = goodput(tr, "x", RoutingSetup(LAT), 1.0, run=fake_run, steps=8)
    assert g["speed"] == pytest.approx(3.0, rel=0.02) and g["rate_rps"] == pytest.approx(3.03, rel=0.02)


def test_cli_json_table_and_bad_policy(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["eval", "routing", "--trace-file", str(MOONCAKE), "--format", "mooncake", "--window", "0:40",
            "--replicas", "2", "--policies", "round-robin,least-request",
            "--json", str(out), "--plot", str(png)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r["policies"]) == {"round-robin", "least-request"} and r["replicas"] == 2
    assert {"ttft_p90_s", "itl_p50_s", "e2e_p90_s", "prefix_hit_rate", "throughput_rps", "load_imbalance"} <= set(
        r["policies"]["round-robin"]
    )
    assert png.stat().st_size > 10_000 and "least-request" in capsys.readouterr().out
    bad = [*argv[:-6], "--policies", "round-robin,nope", "--json", str(out)]
    assert main(bad) == 2
    assert "unknown router policy ['nope']" in capsys.readouterr().err


def test_plugins_that_count_open_work_see_every_request_finish(trace):
    """The virtual driver delivers ``on_finish`` as the proxy does: after the run no request is still counted open
    by ``slo`` (queued prefill, decodes, context) nor by Dynamo's active sequences, and slo compared predicted with
    observed TTFT for each request."""
    setup = RoutingSetup(LAT, replicas=4)
    for policy in ("slo", "peer:dynamo-kv"):
        d = PipelineDispatcher(policy)
        res = Cluster(LAT, setup.engine_config(), replicas={"aggregated": 4}, dispatcher=d,
                      kv_events=d.uses_kv_events).run(trace)  # fmt: skip
        done = sum(r.e2e_s == r.e2e_s for r in res.records)
        assert done > 0.9 * len(trace) and not d._open  # the rest: prompts beyond max_model_len (vLLM's 400)
        if policy == "slo":
            loads = d.services.extras["slo"].loads
            assert loads and all((x.pending_prefill, x.decoding, x.context) == (0, 0, 0) for x in loads.values())
            assert len(d.services.extras["slo.records"]) == done
        else:
            picker = d.pipeline.picker  # Dynamo's KV router is a picker (its cost is the whole decision)
            actives = [picker.active(f"http://aggregated-{i}") for i in range(4)]
            assert any(a is not None for a in actives) and all(len(a) == 0 for a in actives if a is not None)


def test_sim_run_routes_with_a_router_policy_and_refuses_unknown_ones(tmp_path, capsys):
    """``kvscale sim run --policy`` runs the router's pipeline (here ``prefix`` on a shared-prefix workload finds more
    cache hits than ``round-robin``); an unknown policy or a bad P:D is a clear error, exit 2."""
    hits = {}
    for policy in ("round-robin", "prefix"):
        out = tmp_path / f"{policy}.json"
        argv = ["sim", "run", "--trace", "poisson", "--workload", "shared-prefix", "--rate", "8", "--duration", "60",
                "--replicas", "3", "--policy", policy, "--json", str(out)]  # fmt: skip
        assert main(argv) == 0
        hits[policy] = json.loads(out.read_text())["prefix_hit_rate"]
    assert hits["prefix"] > hits["round-robin"] + 0.01, hits  # 0.92 vs 0.90 when written
    assert main(["sim", "run", "--duration", "5", "--policy", "nope"]) == 2
    assert "unknown router policy 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sim", "run", "--pd", "0:2"])
    assert e.value.code == 2 and "P and D must be >= 1" in capsys.readouterr().err

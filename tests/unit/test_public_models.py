"""Latency models from public GPU measurements (``kvscale profile import --format llm-inference-bench``).

Every built-in latency model is held against published points and must not miss one by more than the error the
artifact itself claims. The points below are rows of LLM-Inference-Bench (argonne-lcf/LLM-Inference-Bench,
``Plots/All_results.csv`` at commit 4211f5d, copied to ``data/public-gpu/llm-inference-bench-all-results.csv``;
the line numbers are that file's): (line, L = input = output length, batch, end-to-end seconds of the batch).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from kvscale.cli import main as kvscale_main
from kvscale.latency import LatencyModelError, builtin_models, latency_model_from_dict, load_latency_model
from predictor.offline import offline_features, predict_offline
from predictor.public import PublicImportError, fit_tables, read_table

ROOT = Path(__file__).resolve().parents[2]
TABLES = [ROOT / "data/public-gpu/llm-inference-bench-all-results.csv",
          ROOT / "data/public-gpu/llm-inference-bench-ttft-itl.csv"]  # fmt: skip
SHIPPED_MODELS = "meta-llama/Meta-Llama-3-8B,meta-llama/Meta-Llama-3-70B"

PUBLISHED: dict[str, list[tuple[int, int, int, float]]] = {
    "llama-3-70b-h100-tp4-vllm-public": [(1615, 128, 1, 2.4624), (1629, 1024, 32, 30.2350), (1634, 2048, 64, 80.2155)],
    "llama-3-70b-mi250-tp4-vllm-public": [(3034, 128, 1, 5.4324), (3047, 1024, 32, 64.7386),
                                          (3048, 2048, 32, 140.3775)],
    "llama-3-70b-mi300x-tp8-vllm-public": [(3889, 128, 1, 3.2515), (3907, 1024, 64, 67.4163),
                                           (3918, 2048, 256, 745.1998)],
    "llama-3-70b-mi300x-vllm-public": [(3919, 128, 1, 7.1267), (3927, 1024, 16, 127.6642), (3928, 2048, 16, 347.24)],
    "llama-3-8b-a100-40gb-tp2-vllm-public": [(805, 128, 1, 1.2565), (818, 1024, 32, 17.4352),
                                             (824, 2048, 64, 67.3032)],
    "llama-3-8b-a100-40gb-vllm-public": [(785, 128, 1, 1.8263), (798, 1024, 32, 26.3555), (799, 2048, 32, 66.1987)],
    "llama-3-8b-gh200-vllm-public": [(3336, 128, 1, 0.9480), (3349, 1024, 32, 13.0801), (3355, 2048, 64, 50.5727)],
    "llama-3-8b-h100-tp2-vllm-public": [(1575, 128, 1, 0.8514), (1589, 1024, 32, 11.3899), (1594, 2048, 64, 39.6126)],
    "llama-3-8b-h100-tp4-vllm-public": [(1595, 128, 1, 0.7602), (1609, 1024, 32, 9.7052), (1614, 2048, 64, 33.3427)],
    "llama-3-8b-h100-vllm-public": [(1555, 128, 1, 0.9939), (1569, 1024, 32, 13.0567), (1574, 2048, 64, 48.2152)],
    "llama-3-8b-mi250-tp2-vllm-public": [(3076, 128, 32, 2.3147), (3079, 1024, 32, 21.1956), (3085, 2048, 64, 73.0475)],
    "llama-3-8b-mi250-tp4-vllm-public": [(3086, 128, 1, 1.4954), (3099, 1024, 32, 19.2497), (3105, 2048, 64, 60.8016)],
    "llama-3-8b-mi300x-tp8-vllm-public": [(4008, 128, 1, 2.3225), (4026, 1024, 64, 19.8234),
                                          (4037, 2048, 256, 171.8327)],
    # Rooflines of Llama 3.1 (the same shapes as Llama 3) against the Llama 3 rows on the same GPU
    "llama-3.1-8b-h100": [(1555, 128, 1, 0.9939), (1569, 1024, 32, 13.0567), (1574, 2048, 64, 48.2152),
                          (1570, 1024, 64, 18.8087)],
    "llama-3.1-70b-h100-tp4": [(1615, 128, 1, 2.4624), (1629, 1024, 32, 30.2350), (1634, 2048, 64, 80.2155)],
}  # fmt: skip


def claimed_error(name: str) -> float:
    d = load_latency_model(name).to_dict()
    if d["kind"] == "fitted-public":
        return d["fit"]["validation"]["e2e"]["max_ape"]
    return d["derivation"]["validation"]["e2e_max_ape"]


def test_every_builtin_model_has_published_points() -> None:
    assert sorted(PUBLISHED) == builtin_models()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_builtin_model_meets_its_claimed_error_on_published_points(name: str) -> None:
    rows = {r.line: r for r in read_table(TABLES[0])}
    bound = claimed_error(name)
    assert 0 < bound < 1
    for line, length, batch, seconds in PUBLISHED[name]:
        assert (rows[line].input_len, rows[line].batch) == (length, batch)  # the table is the one the test cites
        assert math.isclose(rows[line].latency_s, seconds, rel_tol=1e-4)
        got = predict_offline(load_latency_model(name), batch, length, length, 8192).e2e_s
        assert abs(got / seconds - 1) <= bound + 1e-9, f"{name} at L={length} B={batch}: {got:.3f} s vs {seconds} s"


def test_kv_capacity_matches_vllms_own_memory_profile() -> None:
    """vllm-project/vllm#10511 logs Llama-3-8B on one H100: 53.29 GiB for the KV cache at utilization 0.9."""
    for name in ("llama-3.1-8b-h100", "llama-3-8b-h100-vllm-public"):
        kv_tokens = load_latency_model(name).num_gpu_blocks() * 16
        assert kv_tokens * 131072 / 2**30 == pytest.approx(53.29, rel=0.002)


def test_shipped_public_models_are_what_the_import_fits_now(tmp_path: Path) -> None:
    for r in fit_tables(TABLES, frameworks={"vLLM"}, models=set(SHIPPED_MODELS.split(","))):
        if r.latency_model is None:
            assert r.name not in PUBLISHED, f"{r.name} is shipped but now refused: {r.refused}"
            continue
        shipped = load_latency_model(r.name).to_dict()
        now = r.latency_model.to_dict()
        for d in (shipped, now):
            d["fit"].pop("date")
            d["fit"].pop("kvscale_version")
            d["notes"] = d["notes"].split(" to ", 1)[1]  # "Fitted by kvscale <version> to ..."
        assert now == shipped, f"{r.name}: re-run the import command in docs/profiling.md"


def test_groups_the_model_cannot_explain_are_refused_with_the_reason() -> None:
    by_name = {r.name: r for r in fit_tables(TABLES, frameworks=None)}
    assert by_name["llama-3-8b-mi300x-vllm-public"].refused.startswith("held-out end-to-end MAPE")
    assert by_name["llama-3-8b-mi300x-vllm-public"].latency_model is None
    assert "mixture-of-experts" in by_name["mixtral-8x7b-v0.1-mi300x-vllm-public"].refused
    assert "framework 'TensorRT-LLM'" in by_name["llama-3-8b-h100-tensorrtllm-public"].refused
    assert "no datasheet entry" in by_name["llama-3-8b-unknown-vllm-public"].refused
    a100 = by_name["llama-3-8b-a100-40gb-vllm-public"]  # B=64 x 4096 tokens does not fit a 40 GB A100: preempted
    assert [e["row"] for e in a100.excluded] == ["llm-inference-bench-all-results.csv:804"]


def test_prefill_and_decode_terms_of_the_offline_schedule() -> None:
    f = offline_features(batch=16, input_len=1024, output_len=1024, max_tokens=8192)
    assert list(f.prefill) == [2, 16 * 1024, 16 * 1024 * 512, 0, 0]  # 8 prompts per 8192-token step
    assert f.decode[0] == 1023 and f.decode[3] == 16 * 1023
    assert f.decode[4] == 16 * sum(1024 + j for j in range(1, 1024))


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


HEADER = "Hardware,Num of Hardware,Framework,Model,Input Output Length,Batch Size,Latency,Throughput\n"


@pytest.mark.parametrize(("body", "message"), [
    ("Nvidia H100 GPU,1,vLLM,meta-llama/Meta-Llama-3-8B,128,1,-0.9,250\n", ":2: field 'Latency': expected a positive"),
    ("Nvidia H100 GPU,1,vLLM,meta-llama/Meta-Llama-3-8B,12x,1,0.9,250\n",
     ":2: field 'Input Output Length': expected a int"),
    ("Nvidia H100 GPU,1,vLLM,,128,1,0.9,250\n", ":2: field 'Model': empty"),
    ("", "no data rows"),
])  # fmt: skip
def test_bad_rows_name_file_line_and_field(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(PublicImportError, match=message):
        read_table(_write(tmp_path, "t.csv", HEADER + body))


def test_unknown_column_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PublicImportError, match=r"t.csv:1: unknown column set"):
        read_table(_write(tmp_path, "t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n"))


def test_import_cli_writes_passing_groups_and_nothing_for_a_bad_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "models"
    good = tmp_path / "all.csv"
    shutil.copy(TABLES[0], good)
    rc = kvscale_main(["profile", "import", "--format", "llm-inference-bench", str(good), "--out", str(out),
                       "--models", "meta-llama/Meta-Llama-3-8B", "--json", str(tmp_path / "report.json")])
    assert rc == 0
    written = sorted(p.stem for p in out.glob("*.json"))
    assert "llama-3-8b-h100-vllm-public" in written and "llama-3-8b-mi300x-vllm-public" not in written
    m = load_latency_model(out / "llama-3-8b-h100-vllm-public.json")
    assert m.kind == "fitted-public" and m.extra["fit"]["pinned"]["per_prefill_token_s"].startswith("tied")
    report = json.loads((tmp_path / "report.json").read_text())
    assert any(g["refused"] for g in report) and all(g["refused"] or g["heldout_e2e_mape"] <= 0.10 for g in report)
    bad = _write(tmp_path, "bad.csv", HEADER + "Nvidia H100 GPU,1,vLLM,meta-llama/Meta-Llama-3-8B,128,1,x,1\n")
    out2 = tmp_path / "none"
    assert kvscale_main(["profile", "import", "--format", "llm-inference-bench", str(good), str(bad),
                         "--out", str(out2)]) == 2  # fmt: skip
    assert "bad.csv:2: field 'Latency'" in capsys.readouterr().err
    assert not out2.exists()


def test_fitted_public_artifact_without_its_source_is_rejected() -> None:
    d = load_latency_model("llama-3-8b-h100-vllm-public").to_dict()
    del d["fit"]["source"]
    with pytest.raises(LatencyModelError, match=r"fit\.source"):
        latency_model_from_dict(d)
    d = load_latency_model("llama-3-8b-h100-vllm-public").to_dict()
    d["fit"]["validation"]["e2e"]["max_ape"] = -1
    with pytest.raises(LatencyModelError, match=r"fit.validation.e2e.max_ape"):
        latency_model_from_dict(d)


def test_predict_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.json"
    assert kvscale_main(["profile", "predict", "--latency-model", "llama-3-8b-h100-vllm-public", "--batch", "16",
                         "--input-len", "1024", "--output-len", "1024", "--json", str(out)]) == 0  # fmt: skip
    got = json.loads(out.read_text())
    assert got["e2e_s"] == pytest.approx(11.02, rel=0.05)  # published: 11.025 s (line 1568)
    assert got["ttft_s"] == pytest.approx(0.4257, rel=0.01)  # published TTFT table: 0.4257 s
    assert got["prefill_steps"] == 2 and got["decode_steps"] == 1023
    assert "single prefill of 1000 tokens" in capsys.readouterr().out
    assert kvscale_main(["profile", "predict", "--latency-model", "nope", "--batch", "1", "--input-len", "1",
                         "--output-len", "1"]) == 2  # fmt: skip


def test_compare_cli(tmp_path: Path, capsys) -> None:
    plot, out = tmp_path / "c.png", tmp_path / "c.json"
    assert kvscale_main(["profile", "compare", "llama-3-8b-h100-vllm-public", "llama-3-8b-a100-40gb-vllm-public",
                         "--plot", str(plot), "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())
    h100, a100 = rows
    assert h100["capacity_rps"]["aggregated"] > a100["capacity_rps"]["aggregated"]  # the faster GPU serves more
    assert h100["kv_cache_tokens"] > a100["kv_cache_tokens"]
    assert plot.stat().st_size > 10_000
    assert kvscale_main(["profile", "compare", "llama-3-8b-h100-vllm-public"]) == 2
    assert "at least two" in capsys.readouterr().err

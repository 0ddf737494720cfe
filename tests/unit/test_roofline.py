"""Roofline default latency models: the committed JSON files match the derivation; the numbers are sane."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from kvscale.latency import builtin_models, load_latency_model
from predictor import roofline

NAMES = sorted(roofline.PRESETS)


def test_presets_are_the_two_shipped_models() -> None:
    assert NAMES == ["llama-3.1-70b-h100-tp4", "llama-3.1-8b-h100"]
    assert set(NAMES) <= set(builtin_models())


@pytest.mark.parametrize("name", NAMES)
def test_committed_file_equals_current_derivation(name: str) -> None:
    path = roofline.MODELS_DIR / f"{name}.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(roofline.render(roofline.PRESETS[name])), (
        f"{path} is stale: run `python -m predictor.roofline`"
    )
    loaded = load_latency_model(path)
    derived = roofline.derive(roofline.PRESETS[name])
    assert loaded.coefficients == derived.coefficients
    assert (loaded.kv_transfer_base_s, loaded.kv_transfer_per_token_s) == (
        derived.kv_transfer_base_s,
        derived.kv_transfer_per_token_s,
    )
    assert loaded == load_latency_model(name)  # also loadable as a built-in by name


@pytest.mark.parametrize("name", NAMES)
def test_artifact_metadata_and_derivation_shown(name: str) -> None:
    m = load_latency_model(roofline.MODELS_DIR / f"{name}.json")
    assert m.name == name
    assert m.kind == "estimate"
    assert "estimate" in m.notes.lower()
    assert m.engine == "vllm (roofline estimate)"
    assert "H100" in m.hardware
    steps = m.extra["derivation"]["steps"]
    for coeff in (
        "base_s",
        "per_prefill_token_s",
        "per_prefill_attn_s",
        "per_decode_seq_s",
        "per_decode_ctx_s",
    ):
        assert steps[coeff]["value"] == getattr(m.coefficients, coeff)
        assert steps[coeff]["formula"]
    assert m.extra["kv_cache"]["num_gpu_blocks"] > 0
    assert m.extra["kv_cache"]["block_size"] == 16


def test_8b_coefficients_match_hand_arithmetic() -> None:
    """Recomputed here from the brief's numbers, independently of roofline.py's code."""
    c = load_latency_model("llama-3.1-8b-h100").coefficients
    bw = 3.35e12 * 0.8
    kv_bytes = 2 * 32 * 8 * 128 * 2
    assert kv_bytes == 131072
    assert math.isclose(c.base_s, 8.03e9 * 2 / bw + 2e-3, rel_tol=1e-5)
    assert math.isclose(c.per_prefill_token_s, 2 * 8.03e9 / (989e12 * 0.6), rel_tol=1e-5)
    assert math.isclose(c.per_prefill_attn_s, 4 * 32 * 32 * 128 / (989e12 * 0.4), rel_tol=1e-5)
    assert math.isclose(c.per_decode_ctx_s, kv_bytes / bw, rel_tol=1e-5)
    m = load_latency_model("llama-3.1-8b-h100")
    assert math.isclose(m.kv_transfer_per_token_s, kv_bytes / 50e9, rel_tol=1e-5)
    gib = 2**30  # vLLM's own memory profile of this model on an H100 (vllm-project/vllm#10511)
    assert m.extra["kv_cache"]["num_gpu_blocks"] == math.floor(
        (79.22 * gib * 0.9 - 16.06e9 - 1.79 * gib - 1.26 * gib) / (16 * kv_bytes))


def test_70b_tp4_uses_four_gpus_and_pays_for_all_reduce() -> None:
    c = load_latency_model("llama-3.1-70b-h100-tp4").coefficients
    weight_read = 70.6e9 * 2 / (4 * 3.35e12 * 0.8)
    allreduce_latency = 80 * 2 * 10e-6
    assert math.isclose(c.base_s, weight_read + 3e-3 + allreduce_latency, rel_tol=1e-5)
    gemm = 2 * 70.6e9 / (4 * 989e12 * 0.6)
    assert c.per_prefill_token_s > gemm * 1.05  # all-reduce traffic per token is on top of the GEMMs
    kv = load_latency_model("llama-3.1-70b-h100-tp4").extra["kv_cache"]
    per_gpu_block = 16 * (2 * 80 * 8 * 128 * 2) / 4
    gib = 2**30  # outside PyTorch: 3.58 GiB at tensor parallel > 1 (vllm-project/vllm#10511)
    assert kv["num_gpu_blocks"] == math.floor((79.22 * gib * 0.9 - 70.6e9 * 2 / 4 - 3.58 * gib - 1.26 * gib)
                                              / per_gpu_block)


def test_sanity_ranges_for_8b() -> None:
    m = load_latency_model("llama-3.1-8b-h100")
    assert 0.015 <= m.prefill_time(1000) <= 0.040
    assert 0.010 <= m.decode_step_time(64, 64 * 1000) <= 0.020


def test_8b_is_faster_than_70b() -> None:
    small = load_latency_model("llama-3.1-8b-h100")
    big = load_latency_model("llama-3.1-70b-h100-tp4")
    assert small.coefficients.per_prefill_token_s < big.coefficients.per_prefill_token_s
    assert small.coefficients.per_decode_seq_s < big.coefficients.per_decode_seq_s
    assert small.prefill_time(1000) < big.prefill_time(1000)
    assert small.decode_step_time(64, 64_000) < big.decode_step_time(64, 64_000)
    assert small.kv_transfer_time(1000) < big.kv_transfer_time(1000)


def test_main_writes_and_check_detects_stale(tmp_path, capsys) -> None:
    assert roofline.main(["--check", "--out-dir", str(tmp_path)]) == 1  # nothing there yet
    assert roofline.main(["--out-dir", str(tmp_path)]) == 0
    for name in NAMES:
        assert (tmp_path / f"{name}.json").read_text() == (roofline.MODELS_DIR / f"{name}.json").read_text()
    assert roofline.main(["--check", "--out-dir", str(tmp_path)]) == 0
    path = tmp_path / "llama-3.1-8b-h100.json"
    data = json.loads(path.read_text())
    data["step_time"]["coefficients"]["base_s"] *= 2
    path.write_text(json.dumps(data))
    assert roofline.stale_models(tmp_path) == ["llama-3.1-8b-h100"]
    assert roofline.main(["--check", "--out-dir", str(tmp_path)]) == 1
    assert "llama-3.1-8b-h100" in capsys.readouterr().err


def test_changing_an_assumption_changes_the_model() -> None:
    p = roofline.PRESETS["llama-3.1-8b-h100"]
    slower = dataclasses.replace(p, assumptions=dataclasses.replace(p.assumptions, eff_hbm=0.4))
    assert roofline.derive(slower).coefficients.per_decode_ctx_s == pytest.approx(
        2 * roofline.derive(p).coefficients.per_decode_ctx_s, rel=1e-5
    )


def test_tensor_parallel_must_divide_heads() -> None:
    p = dataclasses.replace(roofline.PRESETS["llama-3.1-8b-h100"], tensor_parallel=3)
    with pytest.raises(ValueError, match="tensor_parallel"):
        roofline.derive(p)

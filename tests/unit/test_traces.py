"""Trace importers, statistics, transforms and prefix-block prompts (kvscale.traces), on the real published
traces in data/traces/ and on small files written here for each bad-input case."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from kvscale.cli import main
from kvscale.hashing import block_hashes
from kvscale.traces import (
    PrefixBlocks,
    TraceFormatError,
    TraceRequest,
    import_trace,
    load_trace,
    prefix_reuse,
    rate_scale,
    save_trace,
    speed,
    trace_stats,
    window,
)
from kvscale.traces.prompts import expand_tokens

DATA = Path(__file__).resolve().parents[2] / "data" / "traces"
MOONCAKE = DATA / "mooncake-fast25-synthetic.jsonl"
AZURE = DATA / "azure-llm-2023-code.csv"


@pytest.fixture(scope="module")
def mooncake() -> list[TraceRequest]:
    return import_trace("mooncake", MOONCAKE)


def test_mooncake_import_keeps_prefix_blocks_compactly(mooncake, tmp_path):
    first = json.loads(MOONCAKE.open().readline())
    assert len(mooncake) == 3993 and mooncake[0].arrival_s == 0.0
    assert mooncake[0].prefix_blocks == first["hash_ids"] and mooncake[0].prefix_block_tokens == 512
    assert mooncake[0].input_len == first["input_length"] and mooncake[0].prompt_tokens is None
    assert mooncake[-1].arrival_s == pytest.approx(1022.025)
    out = tmp_path / "m.jsonl"
    save_trace(mooncake, out)
    assert load_trace(out) == mooncake
    assert out.stat().st_size < 1.1 * MOONCAKE.stat().st_size  # ids, not tokens: ~15k-token prompts, ~30 ints


def test_mooncake_stats_match_the_published_reuse(mooncake):
    s = trace_stats(mooncake)
    assert s["requests"] == 3993 and s["span_s"] == pytest.approx(1022.025)
    assert s["mean_rate"] == pytest.approx(3993 / 1022.025)
    assert s["isl"]["mean"] == pytest.approx(15325, abs=1) and s["osl"]["mean"] == pytest.approx(149, abs=1)
    assert s["prefix_reuse"] == pytest.approx(0.651, abs=0.001)  # data/traces/README: 65 %
    assert s["peak_requests_per_min"] >= 60 * s["mean_rate"]


def test_azure_import_and_stats():
    trace = import_trace("azure", AZURE)
    s = trace_stats(trace)
    assert s["requests"] == 8819 and s["span_s"] == pytest.approx(3435.948, abs=1e-3)
    assert trace[1].arrival_s == pytest.approx(0.052)  # 18:17:04.0319600 - 18:17:03.9799600
    assert s["prefix_reuse"] == 0.0 and s["prefix_kind"] == "none"
    assert s["peak_rate_per_min"] > 2 * s["mean_rate"]  # the code service is bursty


def test_azure_2024_timestamps_with_offsets(tmp_path):
    p = tmp_path / "a24.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00.009930+00:00,100,5\n"
                 "2024-05-10 00:00:01.509930+00:00,200,6\n")  # fmt: skip
    trace = import_trace("azure", p)
    assert [r.arrival_s for r in trace] == pytest.approx([0.0, 1.5])


def test_burstgpt_failures_dropped_or_kept(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,472,18,490,Conversation log\n45,ChatGPT,1087,0,1087,Conversation log\n"
                 "118,GPT-4,417,276,693,API log\n")  # fmt: skip
    kept = import_trace("burstgpt", p, keep_failed=True)
    dropped = import_trace("burstgpt", p)
    assert [(r.arrival_s, r.input_len, r.output_len) for r in dropped] == [(0.0, 472, 18), (113.0, 417, 276)]
    assert [r.output_len for r in kept] == [18, 1, 276]


BAD = [
    ("mooncake", "m.jsonl", '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n'
     '{"timestamp": 5, "input_length": -3, "output_length": 2, "hash_ids": [2]}\n',
     r"m\.jsonl:2: field 'input_length'"),
    ("mooncake", "m.jsonl", '{"timestamp": 9, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n'
     '{"timestamp": 5, "input_length": 10, "output_length": 2, "hash_ids": [2]}\n',
     r"m\.jsonl:2: field 'timestamp': goes backwards"),
    ("mooncake", "m.jsonl", '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1, 2]}\n',
     r"m\.jsonl:1: field 'hash_ids'"),
    ("mooncake", "m.jsonl", '{"timestamp": 0, "input_length": 10, "output_length": 2}\n{"timestamp": 1,\n',
     r"m\.jsonl:2: not a JSON"),
    ("azure", "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,4808,10\n"
     "2023-11-16 18:17:02.97,10,1\n", r"a\.csv:3: field 'TIMESTAMP': goes backwards"),
    ("azure", "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,4808,10\n"
     "2023-11-16 18:17:04.97,-1,1\n", r"a\.csv:3: field 'ContextTokens': expected an integer >= 1, got '-1'"),
    ("azure", "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,4808,10\n", r"a\.csv:2: field 'TIMESTAMP'"),
    ("azure", "a.csv", "time,in,out\n1,2,3\n", r"a\.csv:1: unknown column set \['time', 'in', 'out'\]"),
    ("azure", "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,4808,10,7\n",
     r"a\.csv: malformed CSV: .*line 2"),
    ("burstgpt", "b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
     "5,ChatGPT,4.5,18,490,Conversation log\n", r"b\.csv:2: field 'Request tokens'"),
    ("kvscale", "k.jsonl", '{"arrival_s": 0, "input_len": 500, "output_len": 2, "prefix_blocks": [1, 2, 3], '
     '"prefix_block_tokens": 256}\n', r"k\.jsonl:1: field 'prefix_blocks'"),
    ("kvscale", "k.jsonl", '{"arrival_s": 0, "input_len": 6, "output_len": 2, "prefix_blocks": [1]}\n',
     r"k\.jsonl:1: field 'prefix_block_tokens'"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "name", "text", "message"), BAD)
def test_bad_input_names_file_line_and_field_and_writes_nothing(tmp_path, capsys, fmt, name, text, message):
    src, out = tmp_path / name, tmp_path / "out.jsonl"
    src.write_text(text)
    with pytest.raises(TraceFormatError, match=message):
        import_trace(fmt, src)
    assert main(["trace", "import", "--format", fmt, str(src), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_save_is_atomic(tmp_path):
    out = tmp_path / "t.jsonl"
    save_trace([TraceRequest(0.0, None, 5, 5)], out)

    def broken():
        yield TraceRequest(1.0, None, 5, 5)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        save_trace(broken(), out)
    assert load_trace(out) == [TraceRequest(0.0, None, 5, 5)] and sorted(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("block_size", [16, 32, 48, 512])
def test_block_prompt_hashes_equal_hashing_the_expanded_tokens(block_size):
    pb = PrefixBlocks()
    for blocks, n in (([1, 2, 3], 1200), ([1, 2, 3], 1536), ([1, 2, 9], 1536), ([7], 100), ([1, 2], 1500)):
        want = block_hashes(expand_tokens(blocks, 512, n, salt=5), block_size)
        assert pb.hashes(blocks, 512, n, 5, block_size) == want
        assert pb.hashes(blocks, 512, n, 5, block_size) == want  # from the cache


def test_block_prompts_share_exactly_what_the_trace_says():
    pb = PrefixBlocks()
    a = pb.hashes([1, 2, 3], 512, 1536, 0, 16)
    b = pb.hashes([1, 2, 4], 512, 1536, 1, 16)  # shares blocks 1, 2
    c = pb.hashes([9, 2, 3], 512, 1536, 2, 16)  # block 2 again, at the same position, after another block
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    assert common == 64 and not set(a) & set(c)
    tail_a, tail_b = expand_tokens([1], 512, 600, 0)[512:], expand_tokens([1], 512, 600, 1)[512:]
    assert not np.array_equal(tail_a, tail_b)  # past the listed blocks, prompts are unique


def test_speed_window_and_rate_scale(mooncake):
    base = prefix_reuse(mooncake)
    fast = speed(mooncake, 4.0)
    assert len(fast) == len(mooncake) and fast[-1].arrival_s == pytest.approx(mooncake[-1].arrival_s / 4)
    assert prefix_reuse(fast) == base
    w = window(mooncake, 100.0, 200.0)
    assert w and w[0].arrival_s >= 0 and w[-1].arrival_s < 100
    assert len(w) == sum(100 <= r.arrival_s < 200 for r in mooncake)
    double = rate_scale(mooncake, 2.0, seed=1)
    assert len(double) == 2 * len(mooncake)
    assert double[-1].arrival_s <= mooncake[-1].arrival_s + 1
    assert prefix_reuse(double) == pytest.approx(base, abs=0.02)
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(double))
    half = rate_scale(mooncake, 0.5, seed=1)
    assert abs(len(half) - len(mooncake) / 2) < 4 * np.sqrt(len(mooncake) / 4)
    assert rate_scale(mooncake, 1.5, seed=3) == rate_scale(mooncake, 1.5, seed=3)
    with pytest.raises(ValueError, match="rate_scale must be a positive"):
        rate_scale(mooncake, 0.0)


def test_rate_scale_of_token_prompts_keeps_reuse():
    shared = list(range(200, 264))
    trace = [TraceRequest(float(i), shared + [1000 + i] * 16, 80, 4) for i in range(50)]
    base = prefix_reuse(trace)
    assert base == pytest.approx(49 * 64 / (50 * 80))
    tripled = rate_scale(trace, 3.0)
    assert len(tripled) == 150
    assert prefix_reuse(tripled) == pytest.approx(base)  # each copy misses its shared prefix once
    assert len({tuple(r.prompt_tokens[:64]) for r in tripled}) == 3  # three namespaces


def test_cli_stats_transform_and_plot(tmp_path, capsys):
    src = tmp_path / "m.jsonl"
    assert main(["trace", "import", "--format", "mooncake", str(MOONCAKE), "--out", str(src)]) == 0
    out, js, png = tmp_path / "w.jsonl", tmp_path / "s.json", tmp_path / "s.png"
    assert main(["trace", "transform", str(src), "--window", "0:300", "--speed", "2", "--out", str(out)]) == 0
    assert main(["trace", "stats", str(out), "--json", str(js), "--plot", str(png)]) == 0
    s = json.loads(js.read_text())
    assert set(s) >= {"requests", "span_s", "mean_rate", "peak_rate_per_min", "isl", "osl", "prefix_reuse"}
    assert s["span_s"] <= 150 and png.stat().st_size > 10_000
    assert "prefix reuse" in capsys.readouterr().out
    assert main(["trace", "transform", str(src), "--out", str(out)]) == 2
    assert main(["trace", "stats", str(AZURE), "--format", "azure"]) == 0

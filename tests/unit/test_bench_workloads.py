"""The routing benchmark's request bodies for a text-only gateway (sglang-router takes no token-id prompts)."""

from __future__ import annotations

from bench.workloads import as_text_prompts, from_trace
from kvscale.tokenizer import FallbackTokenizer
from kvscale.traces import TraceRequest


def first_difference(x: list[int], y: list[int]) -> int:
    return next((k for k, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))


def test_id_prompts_as_text_keep_lengths_and_sharing_under_the_simulators_tokenizer() -> None:
    # two requests sharing their first prefix block (ids 7), a third sharing nothing; 32-token blocks
    trace = [TraceRequest(0.0, None, 80, 4, prefix_blocks=[7, 8, 9], prefix_block_tokens=32),
             TraceRequest(0.5, None, 70, 4, prefix_blocks=[7, 10, 11], prefix_block_tokens=32),
             TraceRequest(1.0, None, 40, 4, prefix_blocks=[12, 13], prefix_block_tokens=32)]  # fmt: skip
    by_id = from_trace(trace)
    as_text = as_text_prompts(by_id)
    tok = FallbackTokenizer()
    encoded = [tok.encode_prompt(r.body["prompt"]) for r in as_text]
    ids = [r.body["prompt"] for r in by_id]
    assert all(isinstance(r.body["prompt"], str) for r in as_text)
    assert [len(e) for e in encoded] == [len(i) for i in ids] == [80, 70, 40]
    for a in range(3):  # the same leading tokens where, and only where, the id prompts share them
        for b in range(a + 1, 3):
            assert first_difference(ids[a], ids[b]) == first_difference(encoded[a], encoded[b])
    assert ids[0][:32] == ids[1][:32] and encoded[0][:32] == encoded[1][:32]
    assert as_text_prompts([r for r in as_text]) == as_text  # text prompts pass unchanged
    assert {k: v for k, v in as_text[0].body.items() if k != "prompt"} == {
        k: v for k, v in by_id[0].body.items() if k != "prompt"}

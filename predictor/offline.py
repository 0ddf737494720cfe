"""The engine's schedule of an offline batch, written out as step-time features.

An offline latency benchmark (vLLM's ``benchmark_latency``, the published LLM-Inference-Bench tables) admits
``B`` prompts of ``L_in`` tokens at once and generates ``L_out`` tokens for each (``ignore_eos``). vLLM's V0
scheduler, without chunked prefill (its default until v0.6, when those tables were measured), runs:

* prefill steps first, each packing whole prompts up to ``max_num_batched_tokens`` tokens and ``max_num_seqs``
  sequences: ``ceil(B / min(max_num_seqs, max_num_batched_tokens // L_in))`` steps, each prompt's attention
  ``L_in * L_in / 2``; every prompt's first token comes out of its prefill step;
* then ``L_out - 1`` pure decode steps of all ``B`` sequences, the context of each growing by one token a step
  (decode step ``j`` reads ``L_in + j`` tokens per sequence, as ``simulator.scheduler`` counts it).

Each quantity is linear in the ``linear-v1`` coefficients (``kvscale.latency``), so a measured end-to-end latency
is one linear equation in them: ``features(...) @ coefficients``. ``kvscale profile predict`` evaluates the same
features with a model, so what is fitted and what is predicted are one schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvscale.latency import COEFFICIENTS, LatencyModel

MAX_NUM_SEQS = 256  # vLLM's default --max-num-seqs


def max_batched_tokens(max_model_len: int) -> int:
    """vLLM's default ``max_num_batched_tokens`` without chunked prefill: ``max(max_model_len, 2048)``."""
    return max(int(max_model_len), 2048)


def prefill_steps(batch: int, input_len: int, max_tokens: int, max_seqs: int = MAX_NUM_SEQS) -> int:
    per_step = max(1, min(max_seqs, max_tokens // max(1, input_len)))
    return math.ceil(batch / per_step)


@dataclass(frozen=True)
class OfflineFeatures:
    """Step-time features (one entry per ``kvscale.latency.COEFFICIENTS``) of the prefill and the decode phase."""

    prefill: np.ndarray
    decode: np.ndarray
    decode_steps: int

    @property
    def total(self) -> np.ndarray:
        return self.prefill + self.decode


def offline_features(batch: int, input_len: int, output_len: int, max_tokens: int,
                     max_seqs: int = MAX_NUM_SEQS) -> OfflineFeatures:  # fmt: skip
    """The features of one offline batch (see the module docstring), in ``COEFFICIENTS`` order."""
    if batch < 1 or input_len < 1 or output_len < 1:
        raise ValueError(f"batch, input and output length must be >= 1, got {batch}, {input_len}, {output_len}")
    b, n = float(batch), float(input_len)
    steps = output_len - 1
    pre = np.array([prefill_steps(batch, input_len, max_tokens, max_seqs), b * n, b * n * n / 2.0, 0.0, 0.0])
    # sum over decode steps j = 1..steps of B * (L_in + j)
    ctx = b * (steps * n + steps * (steps + 1) / 2.0)
    dec = np.array([float(steps), 0.0, 0.0, b * steps, ctx])
    return OfflineFeatures(prefill=pre, decode=dec, decode_steps=steps)


def coefficient_vector(model: LatencyModel) -> np.ndarray:
    c = model.coefficients
    return np.array([getattr(c, k) for k in COEFFICIENTS])


@dataclass(frozen=True)
class OfflinePrediction:
    ttft_s: float  # the batch's prefill phase: when the last prompt's first token is out
    mean_itl_s: float  # mean decode step
    e2e_s: float  # the whole batch
    prefill_steps: int
    decode_steps: int

    def as_dict(self) -> dict[str, float | int]:
        return {"ttft_s": self.ttft_s, "mean_itl_s": self.mean_itl_s, "e2e_s": self.e2e_s,
                "prefill_steps": self.prefill_steps, "decode_steps": self.decode_steps}  # fmt: skip


def predict_offline(model: LatencyModel, batch: int, input_len: int, output_len: int,
                    max_tokens: int = 8192, max_seqs: int = MAX_NUM_SEQS) -> OfflinePrediction:  # fmt: skip
    """What ``model`` predicts for an offline batch run as the module docstring describes."""
    f = offline_features(batch, input_len, output_len, max_tokens, max_seqs)
    coef = coefficient_vector(model)
    ttft = float(f.prefill @ coef)
    decode = float(f.decode @ coef)
    itl = decode / f.decode_steps if f.decode_steps else 0.0
    return OfflinePrediction(ttft_s=ttft, mean_itl_s=itl, e2e_s=ttft + decode, prefill_steps=int(f.prefill[0]),
                             decode_steps=f.decode_steps)

"""A random-weight decoder with the shape of a Llama model, in plain PyTorch (``torch.nn.functional`` only).

What one forward step is (no transformers, nothing downloaded)::

    embedding -> layers x [RMSNorm, fused QKV GEMM, RoPE, KV-cache write, SDPA attention (GQA), O GEMM, residual,
                           RMSNorm, fused gate/up GEMM, SiLU*up, down GEMM, residual]
              -> final RMSNorm and LM head on the last token of each sequence (no sampling)

Attention is ``torch.nn.functional.scaled_dot_product_attention``: a prefill from position 0 is causal (with
``enable_gqa`` where torch has it, else the KV heads repeated); a prefill after a cached prefix repeats the KV heads
and uses a bottom-right causal mask; a decode step folds the query heads of each KV group into that group's query
rows over a contiguous per-sequence KV cache. The dtype is the caller's (``predictor.gpu_campaign`` picks bf16 on
CUDA). :class:`Timer` is the clock a step is timed with: CUDA events on a GPU, ``time.perf_counter`` on CPU.

Torch is imported inside the functions, so importing this module stays light (``kvscale --help``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from predictor.roofline import ModelShape

if TYPE_CHECKING:
    import torch

ROPE_THETA = 500_000.0  # Llama 3.x; it does not change the timing
RMS_EPS = 1e-5


def param_count(s: ModelShape) -> int:
    """Parameters of the Llama-shaped decoder built here (untied embedding and LM head)."""
    per_layer = (
        s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim  # fused QKV
        + s.heads * s.head_dim * s.hidden  # O
        + 3 * s.hidden * s.intermediate  # gate, up, down
        + 2 * s.hidden  # two RMSNorms
    )
    return s.layers * per_layer + 2 * s.vocab * s.hidden + s.hidden


@dataclass
class _Layer:
    in_norm: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass
class Decoder:
    """Random weights of ``layers`` Llama layers plus embedding and LM head, and the forward pieces."""

    shape: ModelShape
    embed: torch.Tensor
    layers: list[_Layer]
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    gqa_native: bool  # SDPA takes enable_gqa (torch >= 2.5)

    @classmethod
    def random(cls, shape: ModelShape, layers: int, device: torch.device, dtype: torch.dtype, seed: int) -> Decoder:
        import torch

        gen = torch.Generator(device=device).manual_seed(seed)

        def w(*size: int) -> torch.Tensor:
            return torch.empty(size, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)

        def ones() -> torch.Tensor:
            return torch.ones(shape.hidden, device=device, dtype=dtype)

        s = shape
        qkv_out = (s.heads + 2 * s.kv_heads) * s.head_dim
        blocks = [
            _Layer(ones(), w(qkv_out, s.hidden), w(s.hidden, s.heads * s.head_dim), ones(),
                   w(2 * s.intermediate, s.hidden), w(s.hidden, s.intermediate))
            for _ in range(layers)
        ]  # fmt: skip
        return cls(s, w(s.vocab, s.hidden), blocks, ones(), w(s.vocab, s.hidden), gqa_native=sdpa_gqa_native())

    def rope_table(self, positions: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions ``0..positions-1`` (built outside the timed region, like vLLM's cache)."""
        import torch

        d = self.shape.head_dim
        inv = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        freqs = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def layer(self, x: torch.Tensor, lw: _Layer, kv: tuple[torch.Tensor, torch.Tensor], start: int,
              cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """One decoder layer over ``x`` (B, T, hidden) at positions ``start..start+T-1``; writes K/V into ``kv``."""
        import torch
        import torch.nn.functional as F

        s = self.shape
        b, t, _ = x.shape
        h = _rms_norm(x, lw.in_norm)
        q, k, v = F.linear(h, lw.qkv).split([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                                             s.kv_heads * s.head_dim], dim=-1)  # fmt: skip
        q = q.view(b, t, s.heads, s.head_dim).transpose(1, 2)
        k = k.view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        c, sn = cos[start : start + t], sin[start : start + t]
        q, k = _rope(q, c, sn), _rope(k, c, sn)
        k_cache, v_cache = kv
        k_cache[:, :, start : start + t] = k
        v_cache[:, :, start : start + t] = v
        keys, values = k_cache[:, :, : start + t], v_cache[:, :, : start + t]
        groups = s.heads // s.kv_heads
        if t == 1:
            # Decode: the query heads of a KV group become that group's query rows; no copy of the cache.
            out = F.scaled_dot_product_attention(q.reshape(b, s.kv_heads, groups, s.head_dim), keys, values)
            out = out.reshape(b, s.heads, 1, s.head_dim)  # back to (B, heads, T=1, head_dim)
        elif start == 0:
            if self.gqa_native:
                out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, _repeat_kv(keys, groups), _repeat_kv(values, groups),
                                                     is_causal=True)  # fmt: skip
        else:
            # Cached prefix: causal mask aligned bottom-right (query i sees keys 0..start+i).
            out = F.scaled_dot_product_attention(q, _repeat_kv(keys, groups), _repeat_kv(values, groups),
                                                 attn_mask=_lower_right_mask(t, start + t, x.device))  # fmt: skip
        x = x + F.linear(out.transpose(1, 2).reshape(b, t, s.heads * s.head_dim), lw.o)
        gate, up = F.linear(_rms_norm(x, lw.post_norm), lw.gate_up).chunk(2, dim=-1)
        return x + F.linear(torch.nn.functional.silu(gate) * up, lw.down)

    def hidden(self, x: torch.Tensor, start: int, caches: list[tuple[torch.Tensor, torch.Tensor]],
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """All built layers over the embedded tokens ``x`` at positions ``start..``."""
        for lw, kv in zip(self.layers, caches, strict=True):
            x = self.layer(x, lw, kv, start, cos, sin)
        return x

    def step(self, ids: torch.Tensor, start: int, caches: list[tuple[torch.Tensor, torch.Tensor]],
             cos: torch.Tensor, sin: torch.Tensor, timer: Timer) -> tuple[float, float, float]:  # fmt: skip
        """One forward step; returns seconds spent in (embedding, the built layers, final norm + LM head)."""
        import torch.nn.functional as F

        timer.sync()
        m0 = timer.mark()
        x = F.embedding(ids, self.embed)
        m1 = timer.mark()
        x = self.hidden(x, start, caches, cos, sin)
        m2 = timer.mark()
        F.linear(_rms_norm(x[:, -1], self.final_norm), self.lm_head)  # logits of each sequence's last token
        m3 = timer.mark()
        timer.sync()
        return timer.elapsed(m0, m1), timer.elapsed(m1, m2), timer.elapsed(m2, m3)


def sdpa_gqa_native() -> bool:
    """SDPA takes ``enable_gqa`` from torch 2.5 on."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 5)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    if hasattr(F, "rms_norm"):  # torch >= 2.4
        return F.rms_norm(x, (x.shape[-1],), weight, RMS_EPS)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(x.dtype) * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _lower_right_mask(q_len: int, kv_len: int, device: torch.device) -> Any:
    """A bottom-right causal mask: torch's ``causal_lower_right`` (flash/efficient kernels) where it exists."""
    try:
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(q_len, kv_len)
    except ImportError:  # torch < 2.3: an explicit boolean mask
        import torch

        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


class Timer:
    """CUDA events on a GPU (device time between marks), ``time.perf_counter`` on CPU (synchronous)."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.clock = clock
        self._torch = torch
        self.name = "cuda-events" if self.cuda else "perf_counter"

    def sync(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize()

    def mark(self) -> Any:
        if self.cuda:
            e = self._torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return self.clock()

    def elapsed(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

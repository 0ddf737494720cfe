"""Tokenizers for the simulator's HTTP driver.

* ``HFTokenizer``: a local Hugging Face tokenizer directory (``--tokenizer DIR``), used exactly as vLLM uses it —
  completions are encoded with special tokens (BOS), chat requests are rendered with the tokenizer's chat template
  (``add_generation_prompt=True``) and encoded without adding special tokens again. Prefix blocks and KV events
  then carry the same token ids as a real engine serving a model with that tokenizer.
* ``FallbackTokenizer`` (no directory given): deterministic and dependency-free. Text is split into words and
  punctuation (regex ``\\w+|[^\\w\\s]``); each piece maps to ``1000 + xxh32(piece) % 29000``. Chat messages are
  rendered as ``<|role|>\\ncontent\\n`` lines plus ``<|assistant|>\\n``. Output ids decode to a fixed word list, so
  generated text is readable (" lorem ipsum ..."). Token counts approximate real tokenizers (~1 token per word).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

import xxhash

_PIECE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_WORDS = tuple(
    (
        "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
        "they you were her she there been one all we their has would when if so no will more can who its out into "
        "them time only some could new these two may first then do any like my now over such our man me even most "
        "made after also did many before must through back years where much your way well down should because each "
        "just those people how too little state good very make world still own see men work long get here between "
        "both life being under never day same another know while last might us great old year off come since "
        "against go came right used take three"
    ).split()
)


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_token_id: int | None

    def encode_prompt(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...
    def decode_token(self, token_id: int) -> str: ...
    def output_token_range(self) -> tuple[int, int]: ...


class FallbackTokenizer:
    name = "kvscale-fallback"
    vocab_size = 30000
    eos_token_id = None

    def encode_prompt(self, text: str) -> list[int]:
        # surrogatepass: a lone surrogate (JSON "\\ud800") is text a client may send, not a crash
        pieces = _PIECE.findall(text)
        return [1000 + xxhash.xxh32_intdigest(p.encode("utf-8", "surrogatepass")) % 29000 for p in pieces]

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        parts = [f"<|{m.get('role', 'user')}|>\n{_content_text(m.get('content'))}\n" for m in messages]
        return "".join(parts) + "<|assistant|>\n"

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode_prompt(self.render_chat(messages))

    def decode_token(self, token_id: int) -> str:
        return " " + _WORDS[token_id % len(_WORDS)]

    def output_token_range(self) -> tuple[int, int]:
        return (1000, 30000)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never from a hub)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer  # optional dependency (extra "tokenizer")

        p = Path(path)
        if not p.is_dir():
            raise ValueError(f"--tokenizer {path}: not a directory")
        self._tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        self.name = p.name
        self.vocab_size = len(self._tok)
        self.eos_token_id = self._tok.eos_token_id
        self._cache: dict[int, str] = {}

    def encode_prompt(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode_token(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._cache[token_id] = self._tok.decode([token_id], skip_special_tokens=True)
        return s

    def output_token_range(self) -> tuple[int, int]:
        special = set(self._tok.all_special_ids)
        lo = max([*special, 255]) + 1  # past byte-level single bytes and special tokens
        hi = self.vocab_size
        while hi - 1 in special:
            hi -= 1
        if hi - lo < 16:
            return (0, self.vocab_size)
        return (lo, hi)


def _content_text(content: Any) -> str:
    """OpenAI message content: a string or a list of parts ({"type": "text", "text": ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise TypeError("message content must be a string or a list of content parts")


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    return HFTokenizer(path) if path else FallbackTokenizer()

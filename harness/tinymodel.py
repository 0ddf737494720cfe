"""A tiny, random, fully local Llama model for tests: no hub, no network, deterministic.

``build_tiny_model(out_dir)`` writes a Hugging Face model directory that vLLM (CPU build) can serve:

* a byte-level BPE tokenizer (vocab 2048) trained with the ``tokenizers`` library on English-like text
  generated here from a seeded RNG, wrapped as a ``PreTrainedTokenizerFast`` with BOS/EOS and a ChatML chat
  template;
* a random ``LlamaForCausalLM`` (hidden 256, 4 heads of dim 64, 2 KV heads, 2 layers) saved as bfloat16
  safetensors.

``size="small"`` builds a 41M-parameter sibling (hidden 768, 12 heads, 4 KV heads, 6 layers) with the same
tokenizer, for measurements: the tiny model's vLLM CPU steps (1.5-3.5 ms) are mostly fixed per-step overhead and
scheduling noise, the small model's (~20 ms) mostly compute, as on a GPU serving a real model.

The directory is finished with a marker file; a second call with the same seed and size returns at once.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "MODEL_VERSION",
    "build_tiny_model",
    "cached_tiny_model",
    "is_complete",
    "make_corpus",
]

# Bump when anything below changes what is written: cached directories keyed by it are rebuilt.
MODEL_VERSION = "tiny-llama-v1"
MARKER = "kvscale-tiny-model.json"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, IM_START, IM_END, PAD_TOKEN]
VOCAB_SIZE = 2048

# ChatML, with the BOS token first (the template output is tokenized without adding special tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "num_attention_heads": 4,  # head_dim 64: what the CPU attention backend supports
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
SMALL_MODEL_CONFIG: dict[str, Any] = {
    **MODEL_CONFIG,
    "hidden_size": 768,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "num_hidden_layers": 6,
    "intermediate_size": 2048,
}
SIZES: dict[str, dict[str, Any]] = {"tiny": MODEL_CONFIG, "small": SMALL_MODEL_CONFIG}
DTYPE = "bfloat16"

_WORDS_TEXT = (
    "the a an of to and in is it that for on with as was at by be this from or are have not but had his they "
    "you we can all there one been their has more when will would who so no if out up what about into than "
    "them only some time could new other then these two may first any like now my such make over our even "
    "most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off "
    "come since against go came right used take three cache block token request server router model queue "
    "latency prefix decode prefill batch scale memory engine replica node cluster metric event hash"
)
_WORDS = _WORDS_TEXT.split()
_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "pl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "n", "r", "s", "t", "l", "nd", "ng", "st")


def make_corpus(seed: int = 0, n_lines: int = 4000) -> list[str]:
    """Return ``n_lines`` deterministic English-like sentences (common words plus made-up ones, numbers)."""
    rng = random.Random(seed)
    invented = sorted(
        {
            "".join(
                rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                for _ in range(rng.randint(1, 3))
            )
            for _ in range(1500)
        }
    )
    lines = []
    for _ in range(n_lines):
        n = rng.randint(5, 18)
        words = [rng.choice(_WORDS) if rng.random() < 0.7 else rng.choice(invented) for _ in range(n)]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "?", "!", ","])
        lines.append(sentence)
    return lines


def is_complete(out_dir: Path, seed: int = 0, size: str = "tiny") -> bool:
    """True if ``out_dir`` holds a finished model built by this version with ``seed`` and ``size``."""
    try:
        marker = json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == MODEL_VERSION and marker.get("seed") == seed and marker.get("size", "tiny") == size


def _train_tokenizer(seed: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Like Llama 3: BOS is prepended by the post-processor (add_special_tokens=True), no EOS appended.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_into(tmp: Path, seed: int, size: str) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(seed)
    tokenizer.save_pretrained(tmp)

    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, DTYPE)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=[eos_id, im_end_id], pad_token_id=pad_id
    )
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / MARKER).write_text(
        json.dumps({"version": MODEL_VERSION, "seed": seed, "size": size, "dtype": DTYPE}, indent=2) + "\n"
    )


def build_tiny_model(out_dir: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Build the tiny model into ``out_dir`` (created; replaced if incomplete or stale) and return it.

    Idempotent: if ``out_dir`` already holds a complete model for this version and ``seed`` it is returned
    without touching it. The model is built in a sibling temporary directory and renamed into place, so a
    crash never leaves a half-written ``out_dir`` that looks complete.
    """
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; one of {', '.join(SIZES)}")
    out_dir = Path(out_dir)
    if is_complete(out_dir, seed, size):
        return out_dir
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build_into(tmp, seed, size)
        if is_complete(out_dir, seed, size):  # another process finished first
            return out_dir
        if out_dir.exists():
            stale = out_dir.parent / f".{out_dir.name}.stale-{os.getpid()}"
            out_dir.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def cached_tiny_model(size: str = "tiny") -> Path:
    """The machine-wide tiny model, built on first use: ``$KVSCALE_TINY_MODEL_DIR`` or
    ``<tmp>/kvscale-tiny-model/<MODEL_VERSION>`` (shared by the tests, the demo and the benchmarks); the small
    one in ``<MODEL_VERSION>-small`` next to it."""
    import tempfile

    default = Path(tempfile.gettempdir()) / "kvscale-tiny-model" / MODEL_VERSION
    tiny = Path(os.environ.get("KVSCALE_TINY_MODEL_DIR", default))
    out = tiny if size == "tiny" else tiny.with_name(f"{tiny.name}-{size}")
    return build_tiny_model(out, size=size)

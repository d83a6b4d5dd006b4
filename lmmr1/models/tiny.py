"""Tiny random Qwen2.5-VL / Qwen2 models with a real byte-level BPE tokenizer, built offline.

Tests, smoke configs and users who want a seconds-long run use these instead of a downloaded checkpoint:
`lmmr1 model tiny --out DIR [--kind vl|text]` writes a folder that `from_pretrained` (and vLLM) load.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# ChatML as in Qwen2-VL: an image item becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor
# expands to one <|image_pad|> per merged image patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a of and to in is what how many much sum total answer think first then so we get add subtract multiply "
    "divide plus minus times equals number numbers each has have apples books cars left right up down box goal "
    "player move moves push wall image figure triangle circle rectangle area perimeter radius side angle degrees "
    "length width height shown find compute solve step final result please reason inside tags"
).split()


def _corpus(n_lines: int, seed: int) -> list[str]:
    """Synthetic training text for the BPE: the words, numbers and tags the demo tasks use."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        op = rng.choice("+-*/=")
        lines.append(f"{words} {a} {op} {b} <think>{words}</think> <answer>\\boxed{{{a}}}</answer>")
    return lines


def build_tokenizer(vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2/Qwen style) on synthetic text; every byte is in the alphabet, so nothing is UNK."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000, seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=4096,
    )


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _text_settings(tokenizer: PreTrainedTokenizerFast, hidden_size: int, layers: int) -> dict:
    """The language model's shape, shared by the VL and text-only models: head_dim 32 (vLLM's CPU attention
    rejects 16)."""
    ids = _special_ids(tokenizer)
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )


def tiny_vl_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, layers: int = 2) -> Qwen2_5_VLConfig:
    """A ~0.3M-parameter Qwen2.5-VL; mrope sections [4, 6, 6] sum to head_dim / 2 = 16."""
    ids = _special_ids(tokenizer)
    text = _text_settings(tokenizer, hidden_size, layers)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        out_hidden_size=hidden_size,
        window_size=112,
        fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=True,
        **{k: v for k, v in ids.items() if k not in text},
    )


def tiny_text_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, layers: int = 2) -> Qwen2Config:
    """A text-only Qwen2 of the same shape as the tiny VL model's language part."""
    return Qwen2Config(tie_word_embeddings=True, **_text_settings(tokenizer, hidden_size, layers))


def image_processor(min_pixels: int = 4 * 28 * 28, max_pixels: int = 16384 * 28 * 28) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL image processing on the PIL path (torchvision is absent on CPU machines); LMM-R1's pixel bounds."""
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def build_tiny(out: str | Path, kind: str = "vl", seed: int = 0) -> Path:
    """Write a tiny random model + tokenizer (+ processor for `vl`) to `out`, deterministically for `seed`."""
    if kind not in ("vl", "text"):
        raise ValueError(f"--kind must be 'vl' or 'text', got {kind!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed=seed)
    torch.manual_seed(seed)
    if kind == "vl":
        model = Qwen2_5_VLForConditionalGeneration(tiny_vl_config(tokenizer))
        image_processor().save_pretrained(out)  # Qwen2_5_VLProcessor needs torchvision (video), absent on CPU
    else:
        model = Qwen2ForCausalLM(tiny_text_config(tokenizer))
    for key, value in _special_ids(tokenizer).items():
        if key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, key, value)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

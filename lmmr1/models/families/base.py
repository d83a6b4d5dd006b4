"""What differs between model families, behind one small interface; this base class is the text-only causal LM.

Callers never ask which family a model is. They ask its adapter (`family_of(config)`): how an image becomes pixel
tensors and placeholder tokens, which positions the decoder takes, which tokens must never be sampled, which
parameters form the vision tower, what extra inputs a forward or `generate` needs, and whether packing works. Each
image-text-to-text family overrides the few parts that differ (see `qwen_vl.py`, `gemma3.py`, `llava.py`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast


@dataclass
class EncodedImages:
    """One prompt's images as the model takes them."""

    pixel_values: Tensor  # family layout: Qwen (patches, D); fixed-size families (n_images, C, H, W)
    grid: Tensor | None  # (n_images, 3) Qwen's (t, h, w) patch grid; None where every image has one shape
    n_tokens: list[int]  # (n_images,) placeholder tokens each image expands to (= its features in the decoder)


class Family:
    """A text-only causal LM: plain positions, no images, nothing banned, packing supported."""

    name = "causal_lm"
    model_types: tuple[str, ...] = ()
    """config.model_type values this adapter serves (the registry's key)."""
    vision_prefixes: tuple[str, ...] = ()
    """Parameter-name prefixes of everything that runs on pixels before the language model; `freeze: [vision]`."""
    banned_tokens: tuple[str, ...] = ()
    """Tokens never sampled: a generated image placeholder would claim an image feature that does not exist."""
    placeholder: str | None = None
    """What the chat template writes for one image item."""
    image_token: str | None = None
    """The token that carries one image feature; the placeholder expands into `n_tokens` of them (plus framing)."""
    end_of_turn: str | None = None
    """Token that ends an assistant turn in generation; None = the tokenizer's eos token."""
    supports_packing = True
    supports_sequence_parallel = True
    """Whether the decoder can run on slices of a packed row (lmmr1/distributed/sequence_parallel.py)."""
    position_scheme = "plain"
    """plain (1-D, counting real tokens) or mrope (3 axes: temporal, height, width; arXiv:2409.12191)."""

    # ---- prompts ----------------------------------------------------------------------------------------------

    def load_image_processor(self, path: Path, *, min_pixels: int, max_pixels: int) -> Any:
        return None

    def encode_images(self, image_processor: Any, config: Any, images: list[Any]) -> EncodedImages:
        raise NotImplementedError(f"{self.name}: no image support")

    def expansion(self, n_tokens: int) -> str:
        """The text one placeholder becomes for an image of `n_tokens` features."""
        return self.image_token * n_tokens

    def expand(self, text: str, n_tokens: list[int], where: str) -> str:
        """Replace the i-th placeholder of `text` by `expansion(n_tokens[i])`; a count mismatch names the row."""
        if text.count(self.placeholder) != len(n_tokens):
            raise ValueError(f"{where}: message: {text.count(self.placeholder)} image placeholders for "
                             f"{len(n_tokens)} images")
        pieces = text.split(self.placeholder)
        return pieces[0] + "".join(self.expansion(n) + rest for n, rest in zip(n_tokens, pieces[1:]))

    def image_token_id(self, tokenizer: Any) -> int | None:
        return None if self.image_token is None else tokenizer.convert_tokens_to_ids(self.image_token)

    # ---- sampling ---------------------------------------------------------------------------------------------

    def eos_token_id(self, tokenizer: Any) -> int:
        return tokenizer.eos_token_id if self.end_of_turn is None else tokenizer.convert_tokens_to_ids(self.end_of_turn)

    def banned_token_ids(self, tokenizer: Any) -> list[int]:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in self.banned_tokens]
        return [i for i in ids if i is not None and i != tokenizer.unk_token_id]

    def vllm_prompt_ids(self, ids: list[int], tokenizer: Any) -> list[int]:
        """The prompt as vLLM wants it with `multi_modal_data`: each expanded image collapsed to one placeholder
        (vLLM expands it again from the image). Default: each run of image tokens becomes one."""
        token = self.image_token_id(tokenizer)
        return [t for k, t in enumerate(ids) if t != token or k == 0 or ids[k - 1] != token]

    # ---- forward ----------------------------------------------------------------------------------------------

    def positions(self, backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                  image_grid: Tensor | None) -> Tensor:
        """(N, L) positions of left/right-padded rows as generation assigns them, counting real tokens from 0;
        padding gets 0 (it is masked out)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def image_inputs(self, config: Any, input_ids: Tensor, pixel_values: Tensor | None,
                     image_grid: Tensor | None, *, generation: bool = False) -> dict[str, Tensor]:
        """Keyword arguments beside input_ids/attention_mask/position_ids for a forward (or `generate`)."""
        return {} if pixel_values is None else {"pixel_values": pixel_values}

    def check_packing(self, flag: str = "--model.policy.init_args.packing") -> None:
        if not self.supports_packing:
            raise ValueError(f"{flag}: the {self.name} family does not support packing (see the README's families "
                             f"table); set packing: false")

    def check_sequence_parallel(self, flag: str = "--model.policy.init_args.sequence_parallel_size") -> None:
        if not self.supports_sequence_parallel:
            raise ValueError(f"{flag}: the {self.name} family does not support sequence parallelism (see the README's "
                             f"families table); set it to 1")

    def decoder(self, backbone: nn.Module) -> nn.Module:
        """The text decoder inside `backbone` (`model.model`): what sequence parallelism runs on slices."""
        return getattr(backbone, "language_model", backbone)

    # ---- vision tower -----------------------------------------------------------------------------------------

    def vision_tower(self, backbone: nn.Module) -> nn.Module | None:
        """The module whose parameters run only on images (None for text-only models)."""
        return None

    def image_features(self, backbone: nn.Module, pixel_values: Tensor, image_grid: Tensor | None) -> list[Tensor]:
        """(n_images,) what each image's placeholder tokens are replaced by: (n_tokens_i, hidden) per image, from
        the tower and projector alone (the language model does not run)."""
        raise NotImplementedError(f"{self.name}: no image features")

    def dummy_vision_output(self, backbone: nn.Module) -> Tensor:
        """The image-side modules run on the smallest blank image, summed to a scalar (see distributed/vision.py).
        Only called for families with a `vision_tower`, which must then define it."""
        raise NotImplementedError(f"{self.name}: a vision tower without a dummy pass")

    # ---- tiny random models -----------------------------------------------------------------------------------

    def build_tiny(self, out: Path, seed: int) -> None:
        """Write a tiny random model of this family (+ tokenizer, + image processor) to `out`."""
        raise NotImplementedError(f"no tiny builder for {self.name}")


# ---- shared by the tiny builders --------------------------------------------------------------------------------

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


def build_tokenizer(special_tokens: list[str], chat_template: str, *, eos: str, pad: str, bos: str | None = None,
                    vocab_size: int = 1024, seed: int = 0, **extra: Any) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) on synthetic text with a family's special tokens and chat template;
    every byte is in the alphabet, so nothing is UNK."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(4000, seed), trainer=trainer)
    named = {"eos_token": eos, "pad_token": pad, **({"bos_token": bos} if bos else {}), **extra}
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=special_tokens[1:],
                                   chat_template=chat_template, padding_side="left", model_max_length=4096, **named)


def text_settings(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, layers: int = 2) -> dict[str, Any]:
    """A tiny language model's shape: head_dim 32 (vLLM's CPU attention rejects 16)."""
    bos = tokenizer.pad_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id
    return dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=hidden_size // 32, num_key_value_heads=1,
                max_position_embeddings=4096, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def save_tiny(model: nn.Module, tokenizer: PreTrainedTokenizerFast, out: Path, image_processor: Any = None) -> None:
    """Write the folder; generation defaults name this vocabulary's bos/eos/pad (not the family's hub ids)."""
    text = model.config.get_text_config()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(text, key))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if image_processor is not None:
        image_processor.save_pretrained(out)


def blank_square_image(backbone: nn.Module) -> Tensor:
    """One zero image at the vision tower's input size, dtype and device (for the ZeRO-3 dummy pass of towers that
    take fixed-size square images, as SigLIP in Gemma 3 and CLIP in LLaVA)."""
    import torch

    config = backbone.config.vision_config
    param = next(backbone.vision_tower.parameters())
    return torch.zeros(1, config.num_channels, config.image_size, config.image_size, dtype=param.dtype,
                       device=param.device)

"""Turn data rows into model inputs: chat template, Qwen2-VL image processing, image-token expansion.

transformers' `Qwen2_5_VLProcessor` insists on a video processor that needs torchvision (absent on CPU machines), so
this class pairs the tokenizer with the PIL image processor and does the one step the processor adds: expanding each
`<|image_pad|>` into as many tokens as the vision tower produces features for that image.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from transformers import AutoTokenizer

IMAGE_PAD = "<|image_pad|>"


@dataclass
class PromptBatch:
    """B prompts, left-padded, with their images; what a rollout engine consumes."""

    input_ids: Tensor  # (B, P) left-padded prompt tokens
    attention_mask: Tensor  # (B, P)
    rows: list[dict[str, Any]]  # (B,) the data rows (answer, datasource, env, ...)
    pixel_values: list[Tensor | None] = field(default_factory=list)  # (B,) per-prompt patches (n_patches, D) or None
    image_grid_thw: list[Tensor | None] = field(default_factory=list)  # (B,) per-prompt (n_images, 3) or None

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, index: list[int]) -> PromptBatch:
        """The prompts at `index`, keeping the padded length P."""
        idx = torch.tensor(index, dtype=torch.long)
        return PromptBatch(self.input_ids[idx], self.attention_mask[idx], [self.rows[i] for i in index],
                           [self.pixel_values[i] for i in index], [self.image_grid_thw[i] for i in index])


def load_image(ref: str) -> Image.Image:
    """Open an image given as a path, a file:// URL or a data: URL, converted to RGB."""
    if ref.startswith("data:"):
        _, _, payload = ref.partition(",")
        return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")
    if ref.startswith("file://"):
        ref = ref[len("file://") :]
    return Image.open(Path(ref)).convert("RGB")


def _chat_messages(row: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The row's messages with image items reduced to {"type": "image"}, and the image references in order."""
    messages, images = [], []
    for message in row["message"]:
        content = message["content"]
        if isinstance(content, list):
            items = []
            for item in content:
                if item.get("type") == "image" or "image" in item:
                    images.append(item["image"])
                    items.append({"type": "image"})
                else:
                    items.append(item)
            content = items
        messages.append({"role": message["role"], "content": content})
    return messages, images


class PromptProcessor:
    """Tokenizer + image processor of one model folder; `__call__(rows) -> PromptBatch`."""

    def __init__(self, path: str | Path, *, min_pixels: int = 4 * 28 * 28, max_pixels: int = 16384 * 28 * 28,
                 max_prompt_tokens: int | None = None, system_prompt: str | None = None,
                 few_shot: list[dict[str, Any]] | None = None) -> None:
        """
        Args:
            path: model folder (tokenizer, chat template and, for VL models, preprocessor_config.json).
            min_pixels / max_pixels: image resize bounds.
            max_prompt_tokens: longer prompts are an error naming the row.
            system_prompt: replaces the rows' system message (or adds one).
            few_shot: messages (e.g. worked user/assistant examples) inserted after the system message.
        """
        path = Path(path).expanduser()
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.image_processor = None
        if (Path(path) / "preprocessor_config.json").exists():
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(
                path, min_pixels=min_pixels, max_pixels=max_pixels
            )
        self.max_prompt_tokens = max_prompt_tokens
        self.system_prompt, self.few_shot = system_prompt, list(few_shot or [])
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The row's messages with the configured system prompt and few-shot turns applied."""
        messages, _ = _chat_messages(row)
        system = [m for m in messages if m["role"] == "system"]
        if self.system_prompt is not None:
            system = [{"role": "system", "content": self.system_prompt}]
        return system + self.few_shot + [m for m in messages if m["role"] != "system"]

    def prompt_text(self, row: dict[str, Any]) -> str:
        """The chat-templated prompt (generation prompt appended), images as one placeholder each."""
        return self.tokenizer.apply_chat_template(self.messages(row), add_generation_prompt=True, tokenize=False)

    def _encode_images(self, row: dict[str, Any], refs: list[str], text: str) -> tuple[str, Tensor, Tensor]:
        where = row.get("_where", "row")
        if self.image_processor is None:
            raise ValueError(f"{where}: message: row has images but the model has no image processor (text-only model)")
        images = [load_image(ref) for ref in refs]
        out = self.image_processor(images=images, return_tensors="pt")
        grid = out["image_grid_thw"]
        merge = self.image_processor.merge_size**2
        n_tokens = (grid.prod(-1) // merge).tolist()
        if text.count(IMAGE_PAD) != len(n_tokens):
            raise ValueError(
                f"{where}: message: {text.count(IMAGE_PAD)} image placeholders for {len(n_tokens)} images"
            )
        pieces = text.split(IMAGE_PAD)
        text = pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(n_tokens, pieces[1:]))
        return text, out["pixel_values"], grid

    def __call__(self, rows: list[dict[str, Any]]) -> PromptBatch:
        texts, pixel_values, grids = [], [], []
        for row in rows:
            _, refs = _chat_messages(row)
            text = self.prompt_text(row)
            pixels = grid = None
            if refs:
                text, pixels, grid = self._encode_images(row, refs, text)
            texts.append(text)
            pixel_values.append(pixels)
            grids.append(grid)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        for row, ids, mask, grid in zip(rows, enc["input_ids"], enc["attention_mask"], grids):
            expected = 0 if grid is None else int((grid.prod(-1) // self.image_processor.merge_size**2).sum())
            found = int(((ids == self.image_pad_id) & mask.bool()).sum())
            if found != expected:  # e.g. the text itself contains "<|image_pad|>", or truncation cut image tokens
                raise ValueError(f"{row.get('_where', 'row')}: message: {found} image tokens for {expected} features")
            if self.max_prompt_tokens is not None and int(mask.sum()) > self.max_prompt_tokens:
                raise ValueError(
                    f"{row.get('_where', 'row')}: message: prompt has {int(mask.sum())} tokens, more than "
                    f"max_prompt_tokens={self.max_prompt_tokens}"
                )
        return PromptBatch(enc["input_ids"], enc["attention_mask"], list(rows), pixel_values, grids)


def concat_images(pixel_values: list[Tensor | None], grids: list[Tensor | None]) -> tuple[Tensor | None, Tensor | None]:
    """Stack per-sample images into the flat (patches, D) / (images, 3) layout Qwen2-VL models take."""
    pixels = [p for p in pixel_values if p is not None]
    if not pixels:
        return None, None
    return torch.cat(pixels), torch.cat([g for g in grids if g is not None])

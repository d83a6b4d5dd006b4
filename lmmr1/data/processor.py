"""Turn data rows into model inputs: chat template, image processing, image-token expansion.

The model family's adapter (lmmr1/models/families/) supplies the image processor (its PIL variant: transformers'
processors for several families insist on a torchvision video processor, absent on CPU machines) and the one step a
full processor adds: expanding each image placeholder into as many tokens as the vision tower produces features for
that image. The expansion is checked against the tokenized prompt, naming the row.
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
from transformers import AutoConfig, AutoTokenizer

from lmmr1.models.families import family_of


@dataclass
class PromptBatch:
    """B prompts, left-padded, with their images; what a rollout engine consumes."""

    input_ids: Tensor  # (B, P) left-padded prompt tokens
    attention_mask: Tensor  # (B, P)
    rows: list[dict[str, Any]]  # (B,) the data rows (answer, datasource, env, ...)
    pixel_values: list[Tensor | None] = field(default_factory=list)  # (B,) per-prompt images in the family's layout
    image_grid_thw: list[Tensor | None] = field(default_factory=list)  # (B,) (n_images, 3) patch grids, or None

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
        self.config = AutoConfig.from_pretrained(path)
        self.family = family_of(self.config)
        self.image_processor = None
        if (Path(path) / "preprocessor_config.json").exists():
            self.image_processor = self.family.load_image_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
        self.max_prompt_tokens = max_prompt_tokens
        self.system_prompt, self.few_shot = system_prompt, list(few_shot or [])
        self.image_token_id = self.family.image_token_id(self.tokenizer)

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

    def _require_image_processor(self, where: str) -> None:
        if self.image_processor is None:
            raise ValueError(f"{where}: message: row has images but the model has no image processor (text-only model)")

    def encode_images(self, text: str, images: list[Image.Image], where: str = "row"
                      ) -> tuple[str, Tensor, Tensor | None, int]:
        """Process `images` and expand the image placeholders of `text`, as the model family does.

        Returns:
            (text with each placeholder expanded, pixel values, (n_images, 3) grids or None, total image tokens).
        """
        self._require_image_processor(where)
        encoded = self.family.encode_images(self.image_processor, self.config, images)
        text = self.family.expand(text, encoded.n_tokens, where)
        return text, encoded.pixel_values, encoded.grid, sum(encoded.n_tokens)

    def __call__(self, rows: list[dict[str, Any]]) -> PromptBatch:
        texts, pixel_values, grids, expected = [], [], [], []
        for row in rows:
            _, refs = _chat_messages(row)
            text = self.prompt_text(row)
            pixels = grid = None
            n_tokens = 0
            if refs:
                self._require_image_processor(row.get("_where", "row"))  # before opening the images
                text, pixels, grid, n_tokens = self.encode_images(text, [load_image(r) for r in refs],
                                                                  row.get("_where", "row"))
            texts.append(text)
            pixel_values.append(pixels)
            grids.append(grid)
            expected.append(n_tokens)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        for row, ids, mask, n_tokens in zip(rows, enc["input_ids"], enc["attention_mask"], expected):
            found = 0 if self.image_token_id is None else int(((ids == self.image_token_id) & mask.bool()).sum())
            if found != n_tokens:  # e.g. the text itself contains the image token, or truncation cut image tokens
                raise ValueError(f"{row.get('_where', 'row')}: message: {found} image tokens for {n_tokens} features")
            if self.max_prompt_tokens is not None and int(mask.sum()) > self.max_prompt_tokens:
                raise ValueError(
                    f"{row.get('_where', 'row')}: message: prompt has {int(mask.sum())} tokens, more than "
                    f"max_prompt_tokens={self.max_prompt_tokens}"
                )
        return PromptBatch(enc["input_ids"], enc["attention_mask"], list(rows), pixel_values, grids)


def concat_images(pixel_values: list[Tensor | None], grids: list[Tensor | None]) -> tuple[Tensor | None, Tensor | None]:
    """Stack per-sample images along their first axis, in row order: flat (patches, D) / (images, 3) for families
    with grids, (images, C, H, W) and no grid for fixed-size ones."""
    pixels = [p for p in pixel_values if p is not None]
    if not pixels:
        return None, None
    present = [g for g in grids if g is not None]
    return torch.cat(pixels), torch.cat(present) if present else None

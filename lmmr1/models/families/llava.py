"""LLaVA-style models: a CLIP tower + MLP projector in front of any causal LM; `<image>` expands to one token per
patch; plain RoPE (arXiv:2304.08485).

Images are resized and center-cropped to the tower's square size (CLIP's PIL processor); each gives
(size / patch)^2 features (plus the CLS token with `vision_feature_select_strategy: full`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmmr1.models.families.base import (
    EncodedImages,
    Family,
    blank_square_image,
    build_tokenizer,
    save_tiny,
    text_settings,
)

IMAGE = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE]
# LLaVA-1.5's conversation format: "USER: <image>\n... ASSISTANT: ...</s>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}</s>{% else %}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class Llava(Family):
    name = "llava"
    model_types = ("llava",)
    vision_prefixes = ("vision_tower.", "multi_modal_projector.")
    banned_tokens = (IMAGE,)
    placeholder = image_token = IMAGE

    def load_image_processor(self, path: Path, *, min_pixels: int, max_pixels: int) -> Any:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        return LlavaImageProcessorPil.from_pretrained(path)  # fixed size: the pixel bounds do not apply

    def encode_images(self, image_processor: Any, config: Any, images: list[Any]) -> EncodedImages:
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        patch = config.vision_config.patch_size
        n = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        n += int(config.vision_feature_select_strategy == "full")  # the CLS token kept
        return EncodedImages(pixels, None, [n] * len(images))

    def vision_tower(self, backbone: nn.Module) -> nn.Module | None:
        return backbone.vision_tower

    def image_features(self, backbone: nn.Module, pixel_values: Tensor, image_grid: Tensor | None) -> list[Tensor]:
        return list(backbone.get_image_features(pixel_values).pooler_output)

    def dummy_vision_output(self, backbone: nn.Module) -> Tensor:
        return backbone.get_image_features(blank_square_image(backbone)).pooler_output[0].sum()

    def build_tiny(self, out: Path, seed: int) -> None:
        from transformers import LlavaConfig, LlavaForConditionalGeneration
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        tokenizer = build_tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE, eos="</s>", pad="<pad>", bos="<s>", seed=seed)
        text = dict(model_type="llama", **text_settings(tokenizer))
        # 28 px / 14 px patches = 2 x 2 = 4 image tokens; the last layer's features (-1): every tower weight is used
        vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, image_size=28, patch_size=14, projection_dim=64)
        config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids(
            IMAGE), image_seq_length=4, vision_feature_layer=-1, tie_word_embeddings=True)
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        processor = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        save_tiny(model, tokenizer, out, processor)

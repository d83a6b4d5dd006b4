"""Gemma 3: fixed-size SigLIP images, `<start_of_image>` expansion, plain RoPE, bidirectional attention over images.

Each image is resized to the tower's square size and pooled to `mm_tokens_per_image` soft tokens; the chat template's
`<start_of_image>` becomes "\\n\\n<start_of_image>" + that many `<image_soft_token>` + "<end_of_image>\\n\\n" (as
transformers' Gemma3Processor does). Image tokens attend to each other in both directions (`token_type_ids`), in
training and in generation's prefill alike. Packing is not supported: the bidirectional image blocks and the
sliding-window layers are built from a padded layout's mask, so a packed row would not be equivalent.
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

BOI, EOI, IMAGE_SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", BOI, EOI, IMAGE_SOFT]
# Gemma's turns: the system text leads the first user turn, the assistant's role is "model"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set system = namespace(text='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set system.text = (message['content'] if message['content'] is string else "
    "message['content'][0]['text']) + '\n\n' %}{% endif %}{% endfor %}"
    "{% set first = namespace(done=false) %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if not first.done %}{{ system.text }}{% set first.done = true %}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class Gemma3(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    vision_prefixes = ("vision_tower.", "multi_modal_projector.")
    banned_tokens = (BOI, EOI, IMAGE_SOFT)
    placeholder, image_token = BOI, IMAGE_SOFT
    end_of_turn = "<end_of_turn>"
    supports_packing = False

    def load_image_processor(self, path: Path, *, min_pixels: int, max_pixels: int) -> Any:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        return Gemma3ImageProcessorPil.from_pretrained(path)  # fixed size: the pixel bounds do not apply

    def encode_images(self, image_processor: Any, config: Any, images: list[Any]) -> EncodedImages:
        out = image_processor(images=images, return_tensors="pt")
        if int(out["pixel_values"].shape[0]) != len(images):
            raise ValueError("gemma3: pan-and-scan crops are not supported (set do_pan_and_scan: false)")
        return EncodedImages(out["pixel_values"], None, [config.mm_tokens_per_image] * len(images))

    def expansion(self, n_tokens: int) -> str:
        return f"\n\n{BOI}{IMAGE_SOFT * n_tokens}{EOI}\n\n"

    def image_inputs(self, config: Any, input_ids: Tensor, pixel_values: Tensor | None,
                     image_grid: Tensor | None, *, generation: bool = False) -> dict[str, Tensor]:
        if pixel_values is None:
            return {}
        return {"pixel_values": pixel_values, "token_type_ids": (input_ids == config.image_token_id).long()}

    def vllm_prompt_ids(self, ids: list[int], tokenizer: Any) -> list[int]:
        """vLLM expands a bare <start_of_image> into the whole framed sequence: undo our expansion."""
        boi, eoi, soft = (tokenizer.convert_tokens_to_ids(t) for t in (BOI, EOI, IMAGE_SOFT))
        frame = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        out: list[int] = []
        k = 0
        while k < len(ids):
            if ids[k] == boi and out[-len(frame):] == frame:
                del out[-len(frame):]
                k += 1
                while k < len(ids) and ids[k] == soft:
                    k += 1
                k += int(k < len(ids) and ids[k] == eoi)
                k += len(frame) if ids[k : k + len(frame)] == frame else 0
                out.append(boi)
                continue
            out.append(ids[k])
            k += 1
        return out

    def vision_tower(self, backbone: nn.Module) -> nn.Module | None:
        return backbone.vision_tower

    def image_features(self, backbone: nn.Module, pixel_values: Tensor, image_grid: Tensor | None) -> list[Tensor]:
        return list(backbone.get_image_features(pixel_values).pooler_output)

    def dummy_vision_output(self, backbone: nn.Module) -> Tensor:
        return backbone.get_image_features(blank_square_image(backbone)).pooler_output.sum()

    def build_tiny(self, out: Path, seed: int) -> None:
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        tokenizer = build_tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE, eos="<eos>", pad="<pad>", bos="<bos>", seed=seed)
        text = text_settings(tokenizer)
        text.update(head_dim=32, query_pre_attn_scalar=32, sliding_window=512,
                    layer_types=["sliding_attention", "full_attention"],
                    eos_token_id=tokenizer.convert_tokens_to_ids("<end_of_turn>"))
        # 56 px / 14 px patches = 4 x 4, pooled to 2 x 2 = 4 soft tokens per image
        vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, image_size=56, patch_size=14, vision_use_head=False)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOI, EOI, IMAGE_SOFT)}
        config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                              boi_token_index=ids[BOI], eoi_token_index=ids[EOI], image_token_index=ids[IMAGE_SOFT],
                              tie_word_embeddings=True)
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config)
        save_tiny(model, tokenizer, out, Gemma3ImageProcessorPil(size={"height": 56, "width": 56}))

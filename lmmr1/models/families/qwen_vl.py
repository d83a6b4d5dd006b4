"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic-resolution patches, `<|image_pad|>` expansion, M-RoPE positions.

All three take flat patches (patches, D) with an (images, 3) grid, expand each `<|image_pad|>` into one token per
merged patch (grid.prod() / merge_size^2), and position tokens on three axes (temporal, height, width; Qwen2-VL,
arXiv:2409.12191) through the decoder's own `get_rope_index`. transformers' Qwen processors insist on a video
processor that needs torchvision (absent on CPU machines), so the PIL image processor is paired with the tokenizer
and the expansion is done here. Qwen3-VL adds DeepStack (vision features injected into early decoder layers) and
16-px patches; its tower's DeepStack mergers take part in the dummy pass like the main merger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from lmmr1.models.families.base import EncodedImages, Family, build_tokenizer, save_tiny, text_settings

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
IMAGE_ITEM = VISION_START + IMAGE_PAD + VISION_END
"""What the chat template writes for one image item; the processor expands its IMAGE_PAD."""
VISION_TOKENS = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
# ChatML as in Qwen2-VL: an image item becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor
# expands to one <|image_pad|> per merged image patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}" + IMAGE_ITEM +
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28  # LMM-R1's pixel bounds


def tiny_tokenizer(seed: int = 0):  # noqa: ANN201
    """A 1024-token byte-level BPE with Qwen's ChatML and vision special tokens."""
    return build_tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE, eos=IM_END, pad=END_OF_TEXT, seed=seed)


def token_ids(tokenizer: Any) -> dict[str, int]:
    """The config's vision token ids in this tokenizer's vocabulary."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    return {"image_token_id": ids[IMAGE_PAD], "video_token_id": ids[VIDEO_PAD],
            "vision_start_token_id": ids[VISION_START], "vision_end_token_id": ids[VISION_END]}


def mm_token_type_ids(config: Any, input_ids: Tensor) -> Tensor:
    """Qwen-VL's modality map of a token row: 0 text, 1 image placeholder, 2 video placeholder."""
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == config.image_token_id] = 1
    video = getattr(config, "video_token_id", None)
    if video is not None:
        types[input_ids == video] = 2
    return types


class Qwen2VL(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    vision_prefixes = ("visual.",)  # patch embedding, blocks and the merger (the projector) all live in `visual`
    banned_tokens = VISION_TOKENS
    placeholder = image_token = IMAGE_PAD
    end_of_turn = IM_END
    position_scheme = "mrope"
    patch_size = 14

    def load_image_processor(self, path: Path, *, min_pixels: int, max_pixels: int) -> Any:
        return Qwen2VLImageProcessorPil.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)

    def encode_images(self, image_processor: Any, config: Any, images: list[Any]) -> EncodedImages:
        out = image_processor(images=images, return_tensors="pt")
        grid = out["image_grid_thw"]
        return EncodedImages(out["pixel_values"], grid, (grid.prod(-1) // image_processor.merge_size**2).tolist())

    def positions(self, backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                  image_grid: Tensor | None) -> Tensor:
        """(3, N, L) M-RoPE positions; image tokens take 2-D grid positions. Text only: all axes equal."""
        text = super().positions(backbone, input_ids, attention_mask, image_grid)
        if image_grid is None:
            return text.unsqueeze(0).expand(3, -1, -1)
        positions, _ = backbone.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids(backbone.config,
                                                                                               input_ids),
                                               image_grid_thw=image_grid, attention_mask=attention_mask)
        return positions

    def image_inputs(self, config: Any, input_ids: Tensor, pixel_values: Tensor | None,
                     image_grid: Tensor | None, *, generation: bool = False) -> dict[str, Tensor]:
        if pixel_values is None:
            return {}
        inputs = {"pixel_values": pixel_values, "image_grid_thw": image_grid}
        if generation:  # the modality map switches generation to M-RoPE, as in training (positions passed) and vLLM
            inputs["mm_token_type_ids"] = mm_token_type_ids(config, input_ids)
        return inputs

    def vision_tower(self, backbone: nn.Module) -> nn.Module | None:
        return getattr(backbone, "visual", None)

    def image_features(self, backbone: nn.Module, pixel_values: Tensor, image_grid: Tensor | None) -> list[Tensor]:
        return list(backbone.get_image_features(pixel_values, image_grid).pooler_output)

    def dummy_vision_output(self, backbone: nn.Module) -> Tensor:
        """One merge window of blank patches through `visual` (merger and any DeepStack mergers included)."""
        visual = backbone.visual
        config = visual.config
        merge = config.spatial_merge_size
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
        param = next(visual.parameters())
        pixels = torch.zeros(merge * merge, patch_dim, dtype=param.dtype, device=param.device)
        out = visual(pixels, grid_thw=torch.tensor([[1, merge, merge]], device=param.device))
        total = getattr(out, "pooler_output", out).sum()
        for feature in getattr(out, "deepstack_features", None) or []:
            total = total + feature.sum()
        return total

    # ---- tiny -------------------------------------------------------------------------------------------------

    def tiny_config(self, tokenizer: Any, hidden_size: int = 64, layers: int = 2) -> Any:
        from transformers import Qwen2VLConfig

        text = text_settings(tokenizer, hidden_size, layers)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
        vision = dict(depth=2, embed_dim=64, hidden_size=hidden_size, mlp_ratio=2, num_heads=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                             **token_ids(tokenizer))

    def tiny_model_class(self) -> type:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def tiny_image_processor(self) -> Any:
        return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=self.patch_size)

    def build_tiny(self, out: Path, seed: int) -> None:
        tokenizer = tiny_tokenizer(seed)
        torch.manual_seed(seed)
        model = self.tiny_model_class()(self.tiny_config(tokenizer))
        save_tiny(model, tokenizer, out, self.tiny_image_processor())


class Qwen25VL(Qwen2VL):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def tiny_config(self, tokenizer: Any, hidden_size: int = 64, layers: int = 2) -> Any:
        """A ~0.3M-parameter Qwen2.5-VL; mrope sections [4, 6, 6] sum to head_dim / 2 = 16."""
        from transformers import Qwen2_5_VLConfig

        text = text_settings(tokenizer, hidden_size, layers)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden_size,
                      window_size=112, fullatt_block_indexes=[1])
        ids = {"bos_token_id": text["bos_token_id"], "eos_token_id": text["eos_token_id"],
               "pad_token_id": text["pad_token_id"], **token_ids(tokenizer)}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                                **{k: v for k, v in ids.items() if k not in text})

    def tiny_model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration


class Qwen3VL(Qwen2VL):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    supports_sequence_parallel = False  # its deepstack adds image features inside the decoder: not split yet
    patch_size = 16

    def tiny_config(self, tokenizer: Any, hidden_size: int = 64, layers: int = 2) -> Any:
        """Interleaved M-RoPE (Qwen3-VL's layout) with sections [6, 5, 5] summing to head_dim / 2 = 16; one
        DeepStack layer."""
        from transformers import Qwen3VLConfig

        text = text_settings(tokenizer, hidden_size, layers)
        text.update(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [6, 5, 5], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden_size,
                      patch_size=self.patch_size, num_position_embeddings=64, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **token_ids(tokenizer))

    def tiny_model_class(self) -> type:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration


class Qwen2Text(Family):
    """Text-only Qwen2 (the tiny text model): a causal LM whose turns end with <|im_end|>."""

    name = "qwen2"
    model_types = ("qwen2",)
    end_of_turn = IM_END

    def build_tiny(self, out: Path, seed: int) -> None:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tokenizer = tiny_tokenizer(seed)
        torch.manual_seed(seed)
        save_tiny(Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **text_settings(tokenizer))), tokenizer, out)

"""Model-family adapters: the one place that knows how a family builds image prompts, positions tokens, which
tokens are never sampled and where its vision tower is. `family_of(config)` picks one by `config.model_type`.

Adding a family: subclass `Family` in a new module here (override what differs: image processor, placeholder and its
expansion, positions, extra forward inputs, vision prefixes, banned tokens, a tiny builder) and list it in
`_ADAPTERS`. See the README's "Model families".
"""

from __future__ import annotations

from typing import Any

from lmmr1.models.families.base import EncodedImages, Family
from lmmr1.models.families.gemma3 import Gemma3
from lmmr1.models.families.llava import Llava
from lmmr1.models.families.qwen_vl import Qwen2Text, Qwen2VL, Qwen3VL, Qwen25VL

_ADAPTERS: list[Family] = [Qwen2VL(), Qwen25VL(), Qwen3VL(), Gemma3(), Llava(), Qwen2Text()]
FAMILIES: dict[str, Family] = {f.name: f for f in _ADAPTERS}
"""Adapters by name (the `--family` of `lmmr1 model tiny`)."""
_BY_MODEL_TYPE = {t: f for f in _ADAPTERS for t in f.model_types}
TEXT = Family()

__all__ = ["FAMILIES", "EncodedImages", "Family", "family_named", "family_of"]


def family_of(config: Any) -> Family:
    """The adapter of a model config (a PretrainedConfig or a model/backbone holding `.config`).

    Unknown model types without a vision config are plain causal LMs; unknown image-text-to-text models are an error
    rather than a guess (wrong positions would train silently wrong)."""
    config = getattr(config, "config", config)
    family = _BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if family is not None:
        return family
    if getattr(config, "vision_config", None) is not None:
        raise ValueError(f"model_type {config.model_type!r} has no lmmr1 family adapter; supported image-text-to-text "
                         f"families: {sorted(f.name for f in _ADAPTERS if f.vision_prefixes)} (README: 'Model "
                         f"families' says how to add one)")
    return TEXT


def family_named(name: str, flag: str = "--family") -> Family:
    if name not in FAMILIES:
        raise ValueError(f"{flag}: unknown family {name!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[name]

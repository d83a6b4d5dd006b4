"""The trained model: a Hugging Face causal LM or image-text-to-text model plus what RL needs from it.

`Policy.logprobs` returns per-token log-probabilities and entropy of the response tokens given prompt + images; the
same class serves as the frozen reference model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _matches(name: str, prefixes: list[str]) -> bool:
    """True if a dotted component sequence of `name` starts with one of `prefixes` ("visual." matches "model.visual.x")."""
    dotted = "." + name
    return any(("." + prefix) in dotted for prefix in prefixes)


class Policy(nn.Module):
    """A local Hugging Face model folder loaded for RL (no hub access)."""

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        freeze: list[str] | None = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
    ) -> None:
        """
        Args:
            path: local folder written by `save_pretrained` (or `lmmr1 model tiny|prepare-mini`).
            dtype: float32 | bfloat16 | float16 for the weights.
            freeze: parameter-name prefixes that get no gradient, e.g. ["visual."] for the vision tower.
            gradient_checkpointing: recompute activations in backward to save memory.
            attn_implementation: "sdpa" (CPU and GPU) or "flash_attention_2" (GPU, flash-attn installed).
        """
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"--model.policy.dtype: unknown {dtype!r}; choose from {sorted(_DTYPES)}")
        if not Path(path).is_dir():
            raise ValueError(f"--model.policy.path: {path!r} is not a folder (run `lmmr1 model tiny --out {path}`?)")
        self.path = path
        config = AutoConfig.from_pretrained(path)
        model_class = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        self.model = model_class.from_pretrained(path, dtype=_DTYPES[dtype], attn_implementation=attn_implementation)
        self.freeze = list(freeze or [])
        frozen = [n for n, p in self.model.named_parameters() if _matches(n, self.freeze)]
        if self.freeze and not frozen:
            raise ValueError(f"--model.policy.freeze: {self.freeze} matches no parameter of {path}")
        for name, param in self.model.named_parameters():
            param.requires_grad_(not _matches(name, self.freeze))
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def is_multimodal(self) -> bool:
        return hasattr(self.model.config, "vision_config")

    def logprobs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_len: int,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        temperature: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """Log-probabilities and entropy of the last `response_len` tokens.

        Args:
            input_ids: (N, P+T) left-padded prompt followed by the right-padded response.
            attention_mask: (N, P+T).
            response_len: T.
            pixel_values / image_grid_thw: flat image patches and grids of the images in these N rows.
            temperature: the sampling temperature; logits are divided by it so ratios match the sampler.
        Returns:
            (logprobs, entropy), each (N, T), float32.
        """
        extra = {}
        if pixel_values is not None:
            extra = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=response_len + 1,
                         use_cache=False, **extra)
        logits = out.logits[:, :-1].float() / temperature  # position t predicts token t+1
        logp_all = torch.log_softmax(logits, dim=-1)  # (N, T, V)
        targets = input_ids[:, -response_len:]
        logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logprobs, entropy

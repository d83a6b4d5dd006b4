"""The critic for PPO with GAE: the policy's backbone (initialised from the same weights) plus a scalar value head."""

from __future__ import annotations

import os

from torch import Tensor, nn

from lmmr1.modules.packing import response_hidden_states
from lmmr1.modules.policy import apply_freeze, enable_sequence_parallel, load_hf_model


class Critic(nn.Module):
    """Per-token values V(s_t) of response positions, from a separately trained copy of the policy's backbone."""

    def __init__(
        self,
        path: str | None = None,
        dtype: str = "float32",
        freeze: list[str] | None = None,
        gradient_checkpointing: bool = False,
        lr: float | None = None,
        attn_implementation: str = "sdpa",
        packing: bool | None = None,
    ) -> None:
        """
        Args:
            path: model folder to initialise the backbone from; None = the policy's (filled in by the RLModule).
            dtype: float32 | bfloat16 | float16 for the backbone weights; the value head stays float32.
            freeze: parameter-name prefixes that get no gradient (e.g. ["vision"]: the family's vision tower).
            gradient_checkpointing: recompute activations in backward to save memory.
            lr: the critic's own learning rate (a separate optimizer parameter group); None = the policy's.
            attn_implementation: "sdpa" or "flash_attention_2".
            packing: padding-free forwards, as `Policy(packing=...)`; None = as the policy.
        """
        super().__init__()
        self.settings = dict(dtype=dtype, freeze=list(freeze or []), gradient_checkpointing=gradient_checkpointing,
                             attn_implementation=attn_implementation)
        self.lr, self.path, self.packing = lr, path and os.path.expanduser(path), packing
        self.sequence_parallel_size = 1  # the policy's, set by `follow_sequence_parallel`
        self.backbone: nn.Module | None = None
        if self.path is not None:
            self.build(self.path)

    def build(self, path: str) -> None:
        """Load the backbone from `path` and attach a fresh value head."""
        dtype, freeze = self.settings["dtype"], self.settings["freeze"]
        full = load_hf_model(path, dtype, self.settings["attn_implementation"], flag="--model.critic")
        self.path = path
        self.backbone = full.model  # the decoder (and vision tower) without the LM head
        self.backbone.config.use_cache = False
        hidden = full.config.get_text_config().hidden_size
        del full
        apply_freeze(self.backbone, freeze, flag="--model.critic")
        if self.settings["gradient_checkpointing"]:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))  # small values at start (as OpenRLHF)
        nn.init.zeros_(self.value_head.bias)

    def follow_sequence_parallel(self, size: int) -> None:
        """Split packed rows over `size` ranks, as the policy does (needs packing)."""
        if size > 1:
            enable_sequence_parallel(self.backbone, size, bool(self.packing), flag="--model.critic.init_args")
        self.sequence_parallel_size = size

    def values(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_len: int,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        prompt_leaders: Tensor | None = None,
    ) -> Tensor:
        """(N, P+T) sequences -> (N, T) float32 values; position t scores the state before response token t."""
        states = response_hidden_states(self.backbone, input_ids, attention_mask, response_len, pixel_values,
                                        image_grid_thw, packing=self.packing,
                                        sequence_parallel=self.sequence_parallel_size > 1,
                                        prompt_leaders=prompt_leaders)
        return self.value_head(states.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def param_group(self) -> dict:
        group: dict = {"params": [p for p in self.parameters() if p.requires_grad]}
        if self.lr is not None:
            group["lr"] = self.lr
        return group

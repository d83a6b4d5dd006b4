"""float32 master weights for a model that trains in bfloat16/float16 (outside DeepSpeed, which keeps its own).

An RL learning rate of 1e-6 moves an Adam-updated weight by about 1e-6 per step, while bfloat16's 8-bit mantissa
spaces representable values 2.4e-4 apart near 0.05: an optimizer step on bf16 weights rounds back to the same
weights, and training silently does nothing. As in mixed-precision training (Micikevicius et al., arXiv:1710.03740),
the optimizer updates float32 copies of the low-precision parameters, and the model, which keeps its bf16 weights for
every forward (rollouts, log-probs, the loss), gets the copies rounded back after each step: small updates accumulate
in the copies until they move a bf16 weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeights:
    """float32 copies of the low-precision parameters of optimizer parameter groups."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        """
        Args:
            groups: optimizer parameter groups ({"params": [...], other options}); float32 parameters stay as they are.
        """
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # (model parameter, its float32 master)
        self.groups = []
        for group in groups:
            params = []
            for param in group["params"]:
                if param.dtype in LOW_PRECISION:
                    master = nn.Parameter(param.detach().float().clone())
                    self.pairs.append((param, master))
                    param = master
                params.append(param)
            self.groups.append({**group, "params": params})

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def grads_to_master(self) -> None:
        """Move the model's gradients onto the masters (as float32), before clipping and the optimizer step."""
        for param, master in self.pairs:
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Round the updated masters into the model's weights."""
        for param, master in self.pairs:
            param.copy_(master)

    def state_dict(self) -> list[Tensor]:
        return [master.detach().clone() for _, master in self.pairs]

    @torch.no_grad()
    def load_state_dict(self, masters: list[Tensor]) -> None:
        if len(masters) != len(self.pairs):
            raise ValueError(f"checkpoint holds {len(masters)} float32 master weights, this model trains "
                             f"{len(self.pairs)} low-precision parameters (was --model.policy.init_args.dtype or "
                             f"freeze changed?)")
        for (param, master), saved in zip(self.pairs, masters):
            master.copy_(saved)
            param.copy_(saved)

"""Learning-rate schedules by name, for `--model.lr_scheduler` (stepped once per optimizer step, resumable).

`WarmupCosine` is LMM-R1's (OpenRLHF's `cosine_with_min_lr`): a linear warm-up over the first `warmup_ratio` of the
optimizer steps, then a half cosine down to `min_lr_ratio` x each parameter group's own learning rate, so a critic
with its own lr follows the same shape from its own value.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warm-up, then cosine decay to a floor."""

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None, warmup_ratio: float = 0.03,
                 min_lr_ratio: float = 0.1, last_epoch: int = -1) -> None:
        """
        Args:
            total_steps: optimizer steps of the whole run; None = filled in by the RL module from max_steps and the
                optimizer steps per rollout (data.batch_size x sampling.n / algorithm.train_batch_size x ppo_epochs).
            warmup_ratio: share of the steps spent warming up linearly from 0 (the warm-up is ceil(ratio x total)).
            min_lr_ratio: the floor, as a fraction of each group's learning rate.
        """
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"--model.lr_scheduler.total_steps must be >= 1 or null, got {total_steps}")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"--model.lr_scheduler.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"--model.lr_scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps, self.warmup_ratio, self.min_lr_ratio = total_steps, warmup_ratio, min_lr_ratio
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of every group's learning rate at optimizer step `step`."""
        if self.total_steps is None:  # at construction, before the module fills in the run's length: step 0's
            return 0.0 if self.warmup_ratio > 0 else 1.0  # factor is the same for every length
        warmup = math.ceil(self.warmup_ratio * self.total_steps)
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

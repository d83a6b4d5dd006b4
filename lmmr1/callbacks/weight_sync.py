"""Keeps a rollout engine that holds its own weights (vLLM) in step with the policy, around the training phase.

Before each batch's rollout: wake the engine and push the policy's weights if an optimizer step changed them. The
module then only calls `engine.generate`; the engine can sleep again while the trainer computes gradients.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class WeightSync(L.Callback):
    """Wake + sync before the rollout (the module puts the engine to sleep after it); no-ops for the HF engine."""

    def __init__(self) -> None:
        self._synced_step: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        engine = pl_module.engine
        engine.wake()
        if self._synced_step == trainer.global_step:
            return
        start = time.perf_counter()
        if trainer.global_step > 0 or self._synced_step is not None:  # the engine loaded the initial weights itself
            engine.update_weights(pl_module.policy.weights_for_sync().items())
        self._synced_step = trainer.global_step
        pl_module.log("rollout/weight_sync_s", time.perf_counter() - start, batch_size=1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.engine.wake()

"""Logs the curriculum stage each step (`train/stage`) and announces stage switches on the console."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class CurriculumStage(L.Callback):
    """Reads the stage from the DataModule's stream (the data layer owns the curriculum) and logs it."""

    def __init__(self) -> None:
        self.last: str | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "stage_at"):
            return
        step = min(row["_position"] for row in batch.rows) // datamodule.batch_size
        stage = datamodule.stage_at(step)
        if stage.name != self.last:
            rank_zero_info(f"curriculum: step {step} starts stage {stage.name!r}")
            self.last = stage.name
        index = datamodule.stages.index(stage)
        pl_module.log("train/stage", float(index), batch_size=len(batch.rows))
        pl_module.log("stage", float(index), prog_bar=True, logger=False, batch_size=len(batch.rows))

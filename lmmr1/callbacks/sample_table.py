"""Writes the step's prompts' responses, reward components and advantages to `<log dir>/samples.jsonl`.

Reading what the model actually wrote is the fastest way to spot reward hacking or format collapse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from lmmr1.distributed import all_gather_objects


class SampleTable(L.Callback):
    """Every `every_n_steps` training steps, append the step's samples (one JSON object per line)."""

    def __init__(self, every_n_steps: int = 1, max_samples: int = 64, filename: str = "samples.jsonl") -> None:
        self.every_n_steps, self.max_samples, self.filename = every_n_steps, max_samples, filename

    def path(self, trainer: L.Trainer) -> Path:
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / self.filename

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not outputs or "samples" not in outputs or batch_idx % self.every_n_steps:
            return
        # every rank takes part: the samples are gathered in rank order and `log_dir` is itself a broadcast
        samples = [s for rank_samples in all_gather_objects(outputs["samples"]) for s in rank_samples]
        path = self.path(trainer)
        if not trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for sample in samples[: self.max_samples]:
                f.write(json.dumps({"step": trainer.global_step, "batch": batch_idx, **sample}) + "\n")

"""SIGTERM / SIGINT finish the current RL step, write a checkpoint, and end training cleanly.

A preempted or Ctrl-C'd run then resumes with `lmmr1 fit -c ... --ckpt_path <dirpath>/last.ckpt`. The checkpoint is
written by Lightning's `trainer.save_checkpoint`, which writes to a temporary file and renames it, so a kill during the
write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class GracefulStop(L.Callback):
    """Turns SIGTERM/SIGINT into "stop after this step and checkpoint" instead of dying mid-update."""

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        """
        Args:
            dirpath: where to write the checkpoint (default: the ModelCheckpoint's folder, else <root>/checkpoints).
            filename: checkpoint file name; `last.ckpt` is what `--ckpt_path last` looks for.
        """
        self.dirpath, self.filename = dirpath, filename
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.signal = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signal = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / self.filename
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            return Path(trainer.checkpoint_callback.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.signal is None:
            return
        path = self.checkpoint_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(path)
        rank_zero_info(f"received {signal.Signals(self.signal).name}: saved {path} after step {trainer.global_step}; "
                       f"resume with --ckpt_path {path}")
        trainer.should_stop = True

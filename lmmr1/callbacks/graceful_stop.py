"""SIGTERM / SIGINT finish the current RL step, write a checkpoint, and end training cleanly; a reward server that
stays unreachable after its retries also leaves a checkpoint to resume from.

A preempted or Ctrl-C'd run then resumes with `lmmr1 fit -c ... --ckpt_path <dirpath>/last.ckpt`. The checkpoint is
written by Lightning's `trainer.save_checkpoint`, which writes to a temporary file and renames it, so a kill during the
write leaves the previous checkpoint intact.

With several processes a signal may reach only some ranks (a scheduler that signals one process, a Ctrl-C in one
terminal). `trainer.save_checkpoint` is collective (a barrier; under DeepSpeed a broadcast and every rank writing its
shard), so a rank that stopped alone would hang the others in their next step. Every rank therefore asks, at the end of
every step, whether any rank was signalled (one small all-reduce; nothing in a single process), and all ranks save and
stop after the same step.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lmmr1.distributed import data_parallel
from lmmr1.distributed.reductions import all_gather_objects, any_rank
from lmmr1.rewards.remote import RewardServerError


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
        self._position = getattr(trainer.datamodule, "consumed", None)  # the stream position after the last step
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

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """The reward server failed mid-step (after the client's retries): the step made no update, so the state after
        the last finished step is saved, with the prompt stream rewound to the failed step's first prompt. In one
        process only: with several, the other ranks may not have failed, and a save is collective."""
        if not isinstance(exception, RewardServerError) or data_parallel().active or trainer.global_step == 0:
            return
        datamodule = trainer.datamodule
        if datamodule is not None and self._position is not None:
            datamodule.consumed = self._position
        path = self.checkpoint_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(path)
        rank_zero_info(f"the reward server failed during step {trainer.global_step + 1}: saved {path} after step "
                       f"{trainer.global_step}; resume with --ckpt_path {path} once it is back")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._position = getattr(trainer.datamodule, "consumed", None)
        # every rank takes part every step, signalled or not: the decision (and the collective save) must be common
        if not any_rank(self.signal is not None):
            return
        received = all_gather_objects(self.signal)  # which rank got what, for the log line (only once, at the stop)
        path = self.checkpoint_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(path)
        rank_zero_info(f"received {_describe(received)}: saved {path} after step {trainer.global_step}; "
                       f"resume with --ckpt_path {path}")
        trainer.should_stop = True


def _describe(received: list[int | None]) -> str:
    """'SIGTERM' in one process; 'SIGTERM on rank 1 (stop agreed across 2 ranks)' when several take part."""
    names = sorted({signal.Signals(s).name for s in received if s is not None})
    if len(received) == 1:
        return names[0]
    ranks = ", ".join(str(r) for r, s in enumerate(received) if s is not None)
    return (f"{'/'.join(names)} on rank{'s' if ',' in ranks else ''} {ranks} "
            f"(stop agreed across {len(received)} ranks)")

"""Write the policy as a plain Hugging Face folder during and after training (LMM-R1's `--save_hf_ckpt`).

    trainer: {callbacks: [{class_path: lmmr1.callbacks.hf_checkpoint.HFCheckpoint, init_args: {every_n_steps: 100}}]}

The folders (`<dirpath>/step_<N>`, `<dirpath>/final`) hold what `lmmr1 model export` writes: LoRA merged, tokenizer
and processor files, so the next stage (FRE -> MGT) or vLLM starts from them directly, without a Lightning checkpoint
or a conversion step. Under DeepSpeed ZeRO-3 every rank takes part in gathering the partitioned weights (a collective)
and rank 0 writes; each folder is written under a temporary name and renamed, so a crash never leaves a half-written
folder under its final name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lmmr1.callbacks.weight_sync import zero3_weights
from lmmr1.distributed import zero3_partitioned
from lmmr1.models.export import save_hf_folder


class HFCheckpoint(L.Callback):
    """Saves the policy as a Hugging Face folder every `every_n_steps` RL steps and at the end of fit."""

    def __init__(self, every_n_steps: int = 0, dirpath: str | None = None, save_last: bool = True) -> None:
        """
        Args:
            every_n_steps: write `<dirpath>/step_<N>` after every N-th RL step (`trainer.global_step`); 0 = never.
            dirpath: where the folders go (default: `<trainer.default_root_dir>/hf`).
            save_last: write `<dirpath>/final` when training ends.
        """
        if every_n_steps < 0:
            raise ValueError(f"HFCheckpoint.every_n_steps: {every_n_steps} must be >= 0 (0 = never)")
        self.every_n_steps, self.dirpath, self.save_last = every_n_steps, dirpath, save_last
        self._saved_step: int | None = None

    def folder(self, trainer: L.Trainer, name: str) -> Path:
        root = Path(self.dirpath) if self.dirpath is not None else Path(trainer.default_root_dir) / "hf"
        return root / name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._saved_step:
            self._saved_step = step  # a batch that took no optimizer step must not write the same folder again
            self.save(trainer, pl_module, self.folder(trainer, f"step_{step}"))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last:
            self.save(trainer, pl_module, self.folder(trainer, "final"))

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Path) -> None:
        """Gather the policy's full HF-named weights (LoRA merged; all ranks, as ZeRO-3 requires) and write them on
        rank 0."""
        policy = pl_module.policy
        if zero3_partitioned(policy.model):  # a collective: every rank runs the stream to its end, rank 0 keeps it
            state_dict = {name: tensor for name, tensor in zero3_weights(policy.model) if trainer.is_global_zero}
        elif trainer.is_global_zero:  # full weights on every rank (single process, DDP, ZeRO-1/2)
            # LoRA: the same stream (gathering is a no-op here) adds the adapters to a copy of the base weights;
            # merging them into the live model and back (weights_for_sync) would round the frozen base weights
            state_dict = dict(zero3_weights(policy.model)) if policy.lora is not None else policy.weights_for_sync()
        if trainer.is_global_zero:
            _share_tied(policy.model, state_dict)
            save_hf_folder(policy.model, policy.path, out, state_dict=state_dict)
            rank_zero_info(f"HFCheckpoint: wrote {out} (step {trainer.global_step})")


def _share_tied(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Names of one tied parameter (lm_head + embeddings) get one tensor, so `save_pretrained` stores it once, as it
    does for the model itself; the ZeRO-3 stream yields each name as its own copy."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name.replace(".base_layer", ""))
    for tied in names.values():
        present = [n for n in tied if n in state_dict]
        for name in present[1:]:
            state_dict[name] = state_dict[present[0]]

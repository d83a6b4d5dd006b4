"""Lightning's DeepSpeed strategy, made to run on CPU too.

DeepSpeed itself trains on CPU (its CPU accelerator, gloo when oneCCL is absent), but Lightning's `DeepSpeedStrategy`
refuses any accelerator but CUDA. On CUDA this subclass is Lightning's strategy unchanged; on CPU it lifts exactly the
three things measured to stand in the way (DESIGN.md): the CUDA-only check in `setup_environment`, the device-index
check in `setup_distributed`, and `root_device`, which must carry the local rank as its index because DeepSpeed reads
it as the process's device rank (tensors moved to `cpu:1` stay on plain `cpu`).

Importing this module re-registers Lightning's `deepspeed*` strategy names with this class, so
`--trainer.strategy deepspeed_stage_3` works on CPU and GPU alike.
"""

from __future__ import annotations

import os

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeed


class DeepSpeedStrategy(_LightningDeepSpeed):
    """`lightning.pytorch.strategies.DeepSpeedStrategy` that also accepts `accelerator: cpu` (gloo)."""

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's accelerator must agree with Lightning's
        return DDPStrategy.setup_environment(self)  # skips only the CUDA check of DeepSpeedStrategy

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        reset_seed()  # as the parent does, minus _validate_device_index_selection (CPU devices carry no index list)
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        if device.type == "cpu":
            return torch.device("cpu", self.local_rank)
        return device


def _register() -> None:
    for name, entry in list(StrategyRegistry.items()):
        if entry["strategy"] is _LightningDeepSpeed:
            StrategyRegistry.register(name, DeepSpeedStrategy, description=entry["description"], override=True,
                                      **entry["init_params"])


_register()


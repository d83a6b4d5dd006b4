"""WarmupCosine: LMM-R1's warm-up + cosine-to-a-floor schedule, against transformers' implementation of the same
schedule, per parameter group, filled in from the run's length, and resumed exactly."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from lmmr1.modules.schedules import WarmupCosine


def _optimizer() -> torch.optim.Optimizer:
    policy, critic = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [policy], "lr": 1e-6}, {"params": [critic], "lr": 9e-6}])


def _lrs(scheduler, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("total,warmup_ratio", [(100, 0.03), (37, 0.1), (10, 0.0)])
def test_equals_transformers_cosine_with_min_lr(total, warmup_ratio):
    ours = WarmupCosine(_optimizer(), total_steps=total, warmup_ratio=warmup_ratio, min_lr_ratio=0.1)
    reference = get_cosine_with_min_lr_schedule_with_warmup(_optimizer(), math.ceil(warmup_ratio * total), total,
                                                            min_lr_rate=0.1)
    torch.testing.assert_close(torch.tensor(_lrs(ours, total + 3)), torch.tensor(_lrs(reference, total + 3)))


def test_each_group_decays_from_its_own_lr_to_a_tenth_of_it():
    lrs = _lrs(WarmupCosine(_optimizer(), total_steps=50, warmup_ratio=0.04, min_lr_ratio=0.1), 52)
    assert lrs[0] == [0.0, 0.0]  # warm-up starts at 0
    assert lrs[2] == pytest.approx([1e-6, 9e-6])  # the peak after ceil(0.04 * 50) = 2 warm-up steps
    assert lrs[50] == pytest.approx([1e-7, 9e-7]) and lrs[51] == pytest.approx([1e-7, 9e-7])  # the floor, then flat


def test_resumes_from_its_state_dict():
    first = WarmupCosine(_optimizer(), total_steps=40)
    _lrs(first, 17)
    resumed = WarmupCosine(_optimizer(), total_steps=40)
    resumed.load_state_dict(first.state_dict())
    resumed.optimizer.param_groups[0]["lr"], resumed.optimizer.param_groups[1]["lr"] = first.get_last_lr()
    assert _lrs(resumed, 10) == _lrs(first, 10)


def test_bad_settings_name_the_option():
    with pytest.raises(ValueError, match=r"--model.lr_scheduler.warmup_ratio must be in \[0, 1\), got 1.5"):
        WarmupCosine(_optimizer(), total_steps=10, warmup_ratio=1.5)


def test_the_run_length_is_filled_in_from_max_steps_and_the_rollout(tiny_vl_path, tmp_path):
    from lmmr1.data.datamodule import DatasetSpec, PromptDataModule
    from lmmr1.data.synthetic import make
    from lmmr1.modules.algorithm_config import AlgorithmConfig
    from lmmr1.modules.policy import Policy
    from lmmr1.modules.rl_module import RLModule
    from lmmr1.rollout.base import SamplingConfig
    from tests.test_fit_e2e import LengthReward

    module = RLModule(policy=Policy(str(tiny_vl_path)), reward=LengthReward(),
                      sampling=SamplingConfig(n=2, max_new_tokens=4),
                      algorithm=AlgorithmConfig(kl={"coef": 0.0}, train_batch_size=2),  # 2 x 2 samples: 2 steps each
                      lr_scheduler=lambda optimizer: WarmupCosine(optimizer, warmup_ratio=0.2))
    data = PromptDataModule(datasets=[DatasetSpec(str(make("arith", n=8, seed=0, out=tmp_path)))], batch_size=2,
                            processor_path=str(tiny_vl_path))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 6 and scheduler.last_epoch == 6  # 3 rollouts x 2 optimizer steps
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * 1e-6)  # the end of the run sits on the floor

"""Worker for tests/test_scale_out.py, started by torchrun: one RL step on a fixed global experience batch.

Each rank takes its contiguous share of the batch saved by the test (whole prompt groups), runs the RLModule's real
training step (old/reference log-probs, advantages with global whitening, loss shares, clipping, optimizer step) under
the given strategy, and rank 0 writes the updated policy weights and the clipping numbers. A 1-process run of the same
script is the reference.

    torchrun --nproc_per_node 2 tests/workers/one_step.py MODEL EXPERIENCE OUT STRATEGY ADVANTAGE:AGGREGATION ...
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from lmmr1.callbacks.weight_sync import policy_weights
from lmmr1.distributed import DeepSpeedStrategy, data_parallel
from lmmr1.modules.algorithm_config import AlgorithmConfig
from lmmr1.modules.policy import Policy
from lmmr1.modules.rl_module import RLModule, Rollout
from lmmr1.rollout.base import SamplingConfig


def run(model: str, experience: str, out: str, strategy: str | L.pytorch.strategies.Strategy, advantage: str,
        aggregation: str) -> None:
    exp, scores = torch.load(experience, weights_only=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    L.seed_everything(0)
    module = RLModule(policy=Policy(model), sampling=SamplingConfig(n=exp.group_size, max_new_tokens=8),
                      algorithm=AlgorithmConfig(advantage=advantage, loss={"aggregation": aggregation},
                                                kl={"coef": 0.01}, micro_batch_size=3,
                                                grad_clip={"mode": "adaptive", "max_norm": 0.05}),
                      optimizer=lambda groups: torch.optim.SGD(groups, lr=0.5))

    def fixed_rollout(batch: object) -> Rollout:
        dp = data_parallel()
        share = len(exp) // dp.size
        rows = list(range(dp.rank * share, (dp.rank + 1) * share))
        picked = type(scores)([scores.total[i] for i in rows], {}, {})
        mine = exp.select(rows).to(module.device)
        return Rollout(mine, picked, picked, generated_groups=share // exp.group_size, rounds=1,
                       first_row=mine.select([0]))

    module._rollout = fixed_rollout
    if strategy.startswith("deepspeed_stage_"):  # a batch size for DeepSpeed's logging: this loader has none
        strategy = DeepSpeedStrategy(stage=int(strategy[-1]), logging_batch_size_per_gpu=1)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module, DataLoader(["batch"], batch_size=None))
    weights = {name: tensor.float().clone() for name, tensor in policy_weights(module.policy)}  # gathers ZeRO-3
    clip = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/grad")}
    if trainer.is_global_zero:
        torch.save({"weights": weights, "clip": clip}, out)
        print(json.dumps({"out": out, **clip}))


def main(argv: list[str]) -> None:
    model, experience, out_dir, strategy, *cases = argv
    for case in cases:
        advantage, aggregation = case.split(":")
        run(model, experience, os.path.join(out_dir, f"{strategy}-{advantage}-{aggregation}.pt"), strategy,
            advantage, aggregation)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo aborts at exit otherwise


if __name__ == "__main__":
    main(sys.argv[1:])

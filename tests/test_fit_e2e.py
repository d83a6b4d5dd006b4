"""End to end on CPU: two RL steps on the tiny Qwen2.5-VL (one image batch, one text batch) really train."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lmmr1.callbacks.sample_table import SampleTable
from lmmr1.data.processor import PromptProcessor
from lmmr1.modules.algorithm_config import AlgorithmConfig
from lmmr1.modules.critic import Critic
from lmmr1.modules.policy import Policy
from lmmr1.modules.rl_module import RLModule
from lmmr1.rewards import Reward, RewardOutput
from lmmr1.rollout.base import SamplingConfig


class LengthReward(Reward):
    """Rewards longer responses (characters / 20): varied within a group, so GRPO has a signal on a random model."""

    name = "length"

    def __call__(self, responses: Sequence[str], rows: Sequence[dict[str, Any]]) -> RewardOutput:
        scores = [len(r) / 20 for r in responses]
        return RewardOutput(total=scores, components={"length": scores})


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)  # big lr: tiny-model gradients must move weights


def _fit(tiny_vl_path, mixed_rows, tmp_path, critic=None, optimizer=_adam, packing=False, share_prompts=False,
         **algorithm):
    proc = PromptProcessor(tiny_vl_path)
    batches = [proc(mixed_rows[:2]), proc(mixed_rows[2:])]  # step 1: images, step 2: text only
    module = RLModule(
        policy=Policy(str(tiny_vl_path), packing=packing, share_prompts=share_prompts),
        reward=LengthReward(),
        sampling=SamplingConfig(n=4, max_new_tokens=8),
        algorithm=AlgorithmConfig(**algorithm),
        optimizer=optimizer,
        critic=critic,
    )
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"),
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[SampleTable()],
                        log_every_n_steps=1,
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return module, before, trainer


def test_two_steps_change_every_trainable_policy_parameter_and_not_the_reference(tiny_vl_path, mixed_rows, tmp_path):
    module, before, trainer = _fit(tiny_vl_path, mixed_rows, tmp_path, kl={"coef": 1e-3})
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    unchanged = [n for n, p in module.policy.named_parameters()
                 if n in trainable and torch.equal(before[f"policy.{n}"], p)]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    assert any("visual" in n for n in trainable)  # the vision tower trained too (step 1 had images)
    assert module.reference is not None
    for n, p in module.reference.named_parameters():
        assert torch.equal(before[f"reference.{n}"], p), n

    # the logged reward equals the reward recomputed from the logged samples
    samples = [json.loads(line) for line in (tmp_path / "run" / "version_0" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 * 2  # 2 steps x 2 prompts x 4 samples
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        logged = [float(r["train/reward/total"]) for r in csv.DictReader(f) if r.get("train/reward/total")]
    assert len(logged) == 2
    for step, value in enumerate(logged):
        responses = [s["response"] for s in samples if s["batch"] == step]
        recomputed = LengthReward()(responses, [{}] * len(responses)).total
        assert value == pytest.approx(sum(recomputed) / len(recomputed), rel=1e-6)
        assert [s["reward"] for s in samples if s["batch"] == step] == pytest.approx(recomputed)


@pytest.mark.parametrize("algorithm", [
    {"advantage": "rloo"},
    {"advantage": "reinforce_baseline"},
    {"advantage": "reinforce_pp", "kl": {"coef": 1e-2, "placement": "reward"}},
    {"advantage": "dr_grpo", "loss": {"aggregation": "seq-mean-token-sum-norm", "max_len": 8}},
    {"advantage": "grpo", "loss": {"name": "gspo", "clip_low": 3e-4, "clip_high": 4e-4,
                                   "aggregation": "seq-mean-token-mean"}},
    {"advantage": "grpo", "dynamic_sampling": {"enabled": True}, "overlong": {"buffer": 4}},
    {"advantage": "grpo", "tis_cap": 2.0},
], ids=lambda a: "-".join(str(v) if not isinstance(v, dict) else "+".join(map(str, v.values())) for v in a.values()))
def test_each_algorithm_option_trains(tiny_vl_path, mixed_rows, tmp_path, algorithm):
    algorithm = {"kl": {"coef": 0.0}, **algorithm}
    module, before, _ = _fit(tiny_vl_path, mixed_rows, tmp_path, **algorithm)
    assert (module.reference is None) == (algorithm["kl"]["coef"] == 0)  # no KL: no reference forward at all
    changed = [not torch.equal(before[f"policy.{n}"], p) for n, p in module.policy.named_parameters()]
    assert sum(changed) > 0.9 * len(changed)


def test_gae_trains_policy_and_critic(tiny_vl_path, mixed_rows, tmp_path):
    module, before, trainer = _fit(tiny_vl_path, mixed_rows, tmp_path, critic=Critic(lr=1e-3), advantage="gae",
                                   kl={"coef": 0.0}, lam=0.95)
    assert not torch.equal(before["critic.value_head.weight"], module.critic.value_head.weight)
    assert any(not torch.equal(before[f"policy.{n}"], p) for n, p in module.policy.named_parameters())
    assert "train/value_loss" in trainer.logged_metrics


def test_gae_without_critic_fails_before_any_rollout(tiny_vl_path):
    with pytest.raises(ValueError, match="'gae' needs a critic"):
        RLModule(policy=Policy(str(tiny_vl_path)), reward=LengthReward(), algorithm=AlgorithmConfig(advantage="gae"))


def test_engine_logprobs_can_stand_in_for_the_recompute(tiny_vl_path, mixed_rows, tmp_path):
    """With the HF engine sampling from the live policy, skipping the old-logprob recompute changes nothing (fp32)."""
    def sgd(params):  # linear in the gradient (Adam would amplify 1e-7 differences in near-zero gradients)
        return torch.optim.SGD(params, lr=1.0)

    recomputed, before, _ = _fit(tiny_vl_path, mixed_rows, tmp_path / "a", optimizer=sgd, kl={"coef": 0.0})
    reused, _, _ = _fit(tiny_vl_path, mixed_rows, tmp_path / "b", optimizer=sgd, kl={"coef": 0.0},
                        recompute_old_logprobs=False)
    for (name, p), q in zip(recomputed.policy.named_parameters(), reused.policy.parameters()):
        step = (p - before[f"policy.{name}"]).abs().max()
        assert (p - q).abs().max() <= 1e-4 * step + 1e-9, name  # the updates agree to 1e-4 of their size


def test_packing_with_token_budget_micro_batches_gives_the_padded_update(tiny_vl_path, mixed_rows, tmp_path):
    """Packed forwards in micro-batches of <= 60 real tokens (policy, reference and critic), with and without shared
    prompts, step the weights as padded forwards in micro-batches of 4 rows do."""
    def sgd(params):
        return torch.optim.SGD(params, lr=1.0)

    def fit(path, **kwargs):
        torch.manual_seed(0)  # the critic's fresh value head
        return _fit(tiny_vl_path, mixed_rows, tmp_path / path, optimizer=sgd, kl={"coef": 1e-2},
                    critic=Critic(lr=1e-3), advantage="gae", lam=0.95, **kwargs)

    padded, before, _ = fit("padded")
    packed, _, trainer = fit("packed", packing=True, micro_batch_tokens=60)
    assert packed.critic.packing and packed.reference.packing
    # each prompt once per micro-batch, its samples after it (the 60-token budget cuts groups: leaders re-form)
    shared, _, _ = fit("shared", packing=True, share_prompts=True, micro_batch_tokens=60)
    assert shared.reference.share_prompts
    for other in (packed, shared):
        for (name, p), q in zip(padded.named_parameters(), other.parameters()):
            if name.startswith("reference."):
                continue
            step = (p - before[name]).abs().max()
            assert (p - q).abs().max() <= 1e-4 * step + 1e-7, name


def test_token_budget_micro_batches():
    from lmmr1.modules.experience import Experience

    mask = torch.tensor([[1] * 5 + [0] * 5, [1] * 10, [1] * 3 + [0] * 7, [1] * 2 + [0] * 8])
    exp = Experience(input_ids=torch.zeros(4, 10, dtype=torch.long), attention_mask=mask,
                     response_mask=torch.ones(4, 2), rollout_logprobs=torch.zeros(4, 2), truncated=torch.zeros(4),
                     pixel_values=[None] * 4, image_grid_thw=[None] * 4, responses=[""] * 4, rows=[{}] * 4,
                     group_size=2)
    sizes = lambda parts: [len(p) for p in parts]  # noqa: E731
    assert sizes(exp.micro_batches(3)) == [3, 1]
    assert sizes(exp.micro_batches(99, max_tokens=8, packed=True)) == [1, 1, 2]  # 5 | 10 (alone, over) | 3+2
    assert sizes(exp.micro_batches(99, max_tokens=19, packed=True)) == [3, 1]  # 5+10+3 | 2
    assert sizes(exp.micro_batches(99, max_tokens=20, packed=False)) == [2, 2]  # 10 padded columns per row
    assert exp.micro_batches(99, max_tokens=19, packed=True)[1].attention_mask.tolist() == [[1] * 2 + [0] * 8]


def test_lr_scheduler_is_stepped_once_per_optimizer_step(tiny_vl_path, mixed_rows, tmp_path):
    from torch.optim.lr_scheduler import LinearLR

    module = RLModule(policy=Policy(str(tiny_vl_path)), reward=LengthReward(),
                      sampling=SamplingConfig(n=2, max_new_tokens=4),
                      algorithm=AlgorithmConfig(kl={"coef": 0.0}, ppo_epochs=2),
                      optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
                      lr_scheduler=lambda opt: LinearLR(opt, start_factor=0.5, end_factor=1.0, total_iters=8))
    batches = [PromptProcessor(tiny_vl_path)(mixed_rows[2:])] * 2
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    # 2 RL steps (global_step counts rollouts) x 2 PPO epochs = 4 optimizer steps: factor 0.5 + 4 * (0.5 / 8) = 0.75
    assert trainer.global_step == 2
    assert module.lr_schedulers().get_last_lr()[0] == pytest.approx(0.75)

"""AlgorithmConfig: defaults work, every name resolves in its registry, jsonargparse parses it, and impossible
settings or combinations fail with an error naming the flag."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from jsonargparse import ArgumentParser

from lmmr1.modules.algorithm_config import (
    NAME_TYPES,
    AlgorithmConfig,
    GradClipConfig,
    KLConfig,
    LossConfig,
)
from lmmr1.modules.algorithms import POLICY_LOSSES, AdaptiveKLController, FixedKLController, build_kl_controller
from lmmr1.modules.grad_clip import DynamicGradClip


def test_yaml_name_types_equal_the_registries():
    # the Literal types jsonargparse validates against must list exactly the registered names
    for literal, registry in NAME_TYPES.items():
        assert set(get_args(literal)) == set(registry), literal


def test_defaults_are_valid_and_consistent():
    cfg = AlgorithmConfig()
    cfg.check(has_critic=False, group_size=4, max_new_tokens=256)
    assert not cfg.uses_critic and cfg.needs_reference
    assert not AlgorithmConfig(kl=KLConfig(coef=0.0)).needs_reference
    assert AlgorithmConfig(advantage="gae").uses_critic


def test_jsonargparse_parses_nested_flags():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--algorithm", type=AlgorithmConfig)
    cfg = parser.parse_args(["--algorithm.kl.coef", "0.01", "--algorithm.advantage", "rloo",
                             "--algorithm.loss.dual_clip", "3.0", "--algorithm.grad_clip.mode", "zscore"])
    algorithm = parser.instantiate(cfg).algorithm
    assert isinstance(algorithm, AlgorithmConfig)
    assert (algorithm.advantage, algorithm.kl.coef, algorithm.loss.dual_clip) == ("rloo", 0.01, 3.0)
    assert algorithm.grad_clip.mode == "zscore" and algorithm.loss.clip_high == 0.28  # untouched defaults survive
    with pytest.raises(Exception, match=r'(?s)algorithm\.advantage.*Got value: nope'):
        parser.parse_args(["--algorithm.advantage", "nope"])  # a typo fails at parse time, naming the key


def test_jsonargparse_add_class_arguments_and_range_errors_name_the_flag():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(AlgorithmConfig, "algorithm")
    cfg = parser.parse_args(["--algorithm.gamma", "1.5"])
    with pytest.raises(ValueError, match=r"--model\.algorithm\.gamma: must be in \[0, 1\], got 1.5"):
        parser.instantiate(cfg)


@pytest.mark.parametrize("kwargs,message", [
    (dict(advantage="foo"), r"--model.algorithm.advantage: unknown 'foo'; choose from \['dr_grpo', 'gae', "),
    (dict(kl={"estimator": "k4"}), r"--model.algorithm.kl.estimator: unknown 'k4'"),
    (dict(kl={"placement": "advantage"}), r"--model.algorithm.kl.placement: unknown 'advantage'"),
    (dict(kl={"coef": -1}), r"--model.algorithm.kl.coef: must be >= 0"),
    (dict(kl={"coef": 0.0, "target": 0.1}), r"--model.algorithm.kl.coef: must be > 0 with an adaptive target"),
    (dict(loss={"name": "trpo"}), r"--model.algorithm.loss.name: unknown 'trpo'; choose from \['gspo', 'ppo'\]"),
    (dict(loss={"clip_low": 1.0}), r"--model.algorithm.loss.clip_low: must be in \[0, 1\)"),
    (dict(loss={"dual_clip": 1.0}), r"--model.algorithm.loss.dual_clip: must be > 1"),
    (dict(loss={"aggregation": "seq-mean-token-sum-norm"}), r"--model.algorithm.loss.max_len: is required"),
    (dict(grad_clip={"percentile": 0}), r"--model.algorithm.grad_clip.percentile: must be in \(0, 100\]"),
    (dict(grad_clip={"mode": "auto"}), r"--model.algorithm.grad_clip.mode: unknown 'auto'"),
    (dict(ppo_epochs=0), r"--model.algorithm.ppo_epochs: must be >= 1"),
    (dict(micro_batch_size=0), r"--model.algorithm.micro_batch_size: must be >= 1"),
    (dict(overlong={"buffer": -1}), r"--model.algorithm.overlong.buffer: must be >= 0"),
    (dict(dynamic_sampling={"max_extra_rounds": -1}), r"--model.algorithm.dynamic_sampling.max_extra_rounds"),
    # Dr. GRPO with a length-normalising loss brings the bias back it removes
    (dict(advantage="dr_grpo"), r"--model.algorithm.loss.aggregation: advantage 'dr_grpo' needs "
                                r"'seq-mean-token-sum-norm'.*got 'token-mean'"),
    # combinations that would run and silently not do what the option says
    (dict(tis_cap=2.0, recompute_old_logprobs=False), r"--model.algorithm.tis_cap: has no effect with "
                                                      r"recompute_old_logprobs: false"),
    (dict(advantage="reinforce_pp", kl={"coef": 0.01, "placement": "loss"}),
     r"--model.algorithm.kl.placement: advantage 'reinforce_pp' is defined with the KL penalty in the per-token "
     r"reward"),
    (dict(loss={"name": "gspo"}), r"--model.algorithm.loss.aggregation: loss 'gspo' .* only with "
                                  r"'seq-mean-token-mean'.*got 'token-mean'"),
])
def test_bad_values_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlgorithmConfig(**kwargs)


@pytest.mark.parametrize("kwargs,context,message", [
    (dict(advantage="gae"), dict(has_critic=False), r"--model.algorithm.advantage: 'gae' needs a critic"),
    (dict(advantage="grpo"), dict(group_size=1), r"'grpo' compares samples of the same prompt and needs sampling.n"),
    (dict(advantage="rloo"), dict(group_size=1), r"'rloo' compares samples"),
    (dict(advantage="reinforce_baseline"), dict(group_size=1), r"'reinforce_baseline' compares samples"),
    (dict(advantage="reinforce_pp", kl={"placement": "reward"}, dynamic_sampling={"enabled": True}),
     dict(group_size=1),
     r"--model.algorithm.dynamic_sampling.enabled: dynamic sampling drops groups"),
    (dict(overlong={"buffer": 64}), dict(max_new_tokens=32), r"--model.algorithm.overlong.buffer: 64 is longer"),
])
def test_impossible_combinations_fail_before_any_rollout(kwargs, context, message):
    cfg = AlgorithmConfig(**kwargs)
    full = dict(has_critic=True, group_size=4, max_new_tokens=None) | context
    with pytest.raises(ValueError, match=message):
        cfg.check(**full)


def test_possible_combinations_pass_check():
    AlgorithmConfig(advantage="gae").check(has_critic=True, group_size=1)
    AlgorithmConfig(advantage="reinforce_pp", kl={"coef": 0.0}).check(has_critic=False, group_size=1)
    AlgorithmConfig(advantage="reinforce_pp", kl={"placement": "reward"}).check(has_critic=False, group_size=1)
    AlgorithmConfig(loss={"name": "gspo", "aggregation": "seq-mean-token-mean"}).check(has_critic=False, group_size=4)
    AlgorithmConfig(tis_cap=2.0).check(has_critic=False, group_size=4)
    AlgorithmConfig(advantage="dr_grpo", loss={"aggregation": "seq-mean-token-sum-norm", "max_len": 64}).check(
        has_critic=False, group_size=8, max_new_tokens=64)


@pytest.mark.parametrize("name", ["ppo", "gspo"])
def test_loss_kwargs_drive_every_policy_loss(name):
    cfg = LossConfig(name=name, clip_low=0.1, clip_high=0.3, dual_clip=2.0, aggregation="seq-mean-token-sum-norm",
                     max_len=7)
    assert cfg.kwargs() == dict(clip_low=0.1, clip_high=0.3, dual_clip=2.0, aggregation="seq-mean-token-sum-norm",
                                max_len=7)
    logprobs = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = POLICY_LOSSES[cfg.name](logprobs, torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3),
                                            **cfg.kwargs())
    # on-policy, advantage 1: each token's loss is -1; (-1 * 3 tokens per row / max_len 7), mean over rows
    assert loss.item() == pytest.approx(-3 / 7) and metrics["clip_frac"] == 0


def test_builders():
    clip = GradClipConfig(mode="fixed", max_norm=2.0, percentile=80, history=7, warmup=3, factor=1.2).build()
    assert isinstance(clip, DynamicGradClip)
    assert (clip.mode, clip.max_norm, clip.percentile, clip.history, clip.warmup, clip.factor) == \
        ("fixed", 2.0, 80.0, 7, 3, 1.2)
    assert isinstance(build_kl_controller(KLConfig()), FixedKLController)
    adaptive = build_kl_controller(KLConfig(coef=0.05, target=0.02, horizon=500))
    assert isinstance(adaptive, AdaptiveKLController) and (adaptive.coef, adaptive.target, adaptive.horizon) == \
        (0.05, 0.02, 500)

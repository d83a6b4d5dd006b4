"""Truncated importance sampling: weights against a reference loop, and the loss it produces."""

from __future__ import annotations

import math

import pytest
import torch

from lmmr1.modules.algorithm_config import AlgorithmConfig
from lmmr1.modules.algorithms import POLICY_LOSSES, truncated_importance_weights


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_match_a_reference_loop(seed):
    g = torch.Generator().manual_seed(seed)
    old, rollout = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    old[mask == 0] = 1e6  # garbage in padding must not leak (exp overflow)
    weights = truncated_importance_weights(old, rollout, mask, cap=2.0)
    for i in range(4):
        for t in range(6):
            expected = min(math.exp(old[i, t] - rollout[i, t]), 2.0) if mask[i, t] else 0.0
            assert weights[i, t].item() == pytest.approx(expected, rel=1e-6)
    assert not weights.requires_grad


def test_weighting_the_advantages_weights_each_token_loss():
    """-w * min(r A, clip(r) A) == -min(r (wA), clip(r) (wA)) for w >= 0: scaling advantages is exact."""
    g = torch.Generator().manual_seed(0)
    logp, old, rollout = (torch.randn(3, 5, generator=g) * 0.3 for _ in range(3))
    adv, mask = torch.randn(3, 5, generator=g), torch.ones(3, 5)
    w = truncated_importance_weights(old, rollout, mask, cap=1.5)
    loss, _ = POLICY_LOSSES["ppo"](logp, old, adv * w, mask, clip_low=0.2, clip_high=0.2)
    ratio = (logp - old).exp()
    per_token = -w * torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    torch.testing.assert_close(loss, per_token.mean())


def test_cap_below_one_is_rejected():
    with pytest.raises(ValueError, match=r"--model.algorithm.tis_cap: must be >= 1"):
        AlgorithmConfig(tis_cap=0.5)

"""Registries, KL estimators and controllers, whitening, dynamic-sampling filter and overlong penalty."""

from __future__ import annotations

import math

import pytest
import torch

from lmmr1.modules.algorithms import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    Registry,
    build_kl_controller,
    filter_groups,
    masked_whiten,
    overlong_penalty,
)
from lmmr1.modules.algorithms.kl import K3_MAX


# ---- registry ------------------------------------------------------------------------------------------------------
def test_registry_rejects_duplicates_and_names_choices_for_unknown_keys():
    reg = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    assert reg["a"] is a
    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        reg.register("a")(lambda: 2)
    assert reg["a"] is a  # the first registration survives
    with pytest.raises(ValueError, match=r"unknown widget 'b'; choose from \['a'\]"):
        reg["b"]


# ---- KL -------------------------------------------------------------------------------------------------------------
def _logprobs(seed, shape=(5, 7), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(shape, generator=g) * 4, scale * torch.randn(shape, generator=g)


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_is_zero_when_policy_equals_reference(name):
    logprobs, _ = _logprobs(0)
    assert torch.equal(KL_ESTIMATORS[name](logprobs, logprobs.clone()), torch.zeros_like(logprobs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimators_match_formulas(seed):
    logprobs, delta = _logprobs(seed)
    ref = logprobs + delta
    for i in range(5):
        for t in range(7):
            lp, rp = float(logprobs[i, t]), float(ref[i, t])
            assert float(KL_ESTIMATORS["k1"](logprobs, ref)[i, t]) == pytest.approx(lp - rp, abs=1e-5)
            assert float(KL_ESTIMATORS["k2"](logprobs, ref)[i, t]) == pytest.approx(0.5 * (lp - rp) ** 2, rel=1e-5)
            k3 = math.exp(rp - lp) - (rp - lp) - 1  # Schulman's k3 with r = p_ref / p
            assert float(KL_ESTIMATORS["k3"](logprobs, ref)[i, t]) == pytest.approx(min(k3, K3_MAX), rel=1e-4,
                                                                                    abs=1e-6)


def test_k3_is_nonnegative_and_finite_everywhere():
    logprobs = torch.linspace(-60, 0, 4001)
    for ref in (logprobs + 1e-7, logprobs - 1e-7, torch.flip(logprobs, [0]), torch.zeros_like(logprobs)):
        k3 = KL_ESTIMATORS["k3"](logprobs, ref)
        assert (k3 >= 0).all() and torch.isfinite(k3).all() and (k3 <= K3_MAX).all()


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    # two categorical distributions; tokens sampled from the policy p; KL(p || ref) in closed form
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    true_kl = float((p * (p / q).log()).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logprobs, ref = p.log()[tokens], q.log()[tokens]
    for name in ("k1", "k3"):
        assert KL_ESTIMATORS[name](logprobs, ref).mean().item() == pytest.approx(true_kl, rel=0.03), name


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.01)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.coef == 0.01


def test_adaptive_controller_hand_worked():
    ctl = AdaptiveKLController(init_coef=0.1, target=0.05, horizon=100)
    ctl.update(current_kl=0.1, n_steps=10)  # error = clip(0.1/0.05 - 1 = 1, +-0.2) = 0.2 -> x(1 + 0.2*10/100) = x1.02
    assert ctl.coef == pytest.approx(0.102)
    ctl.update(current_kl=0.0, n_steps=10)  # error = clip(-1) = -0.2 -> x0.98
    assert ctl.coef == pytest.approx(0.102 * 0.98)
    ctl.update(current_kl=0.055, n_steps=50)  # error = 0.1 -> x(1 + 0.1 * 0.5) = x1.05
    assert ctl.coef == pytest.approx(0.102 * 0.98 * 1.05)
    ctl.update(current_kl=0.05, n_steps=50)  # on target: unchanged
    assert ctl.coef == pytest.approx(0.102 * 0.98 * 1.05)
    restored = AdaptiveKLController(init_coef=0.1, target=0.05, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.coef == ctl.coef


def test_adaptive_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="target > 0 and horizon > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_build_kl_controller_picks_by_target():
    class Settings:
        coef, target, horizon = 0.2, None, 10

    assert isinstance(build_kl_controller(Settings()), FixedKLController)
    Settings.target = 0.1
    ctl = build_kl_controller(Settings())
    assert isinstance(ctl, AdaptiveKLController) and (ctl.coef, ctl.target, ctl.horizon) == (0.2, 0.1, 10)


# ---- whitening ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_whiten_matches_reference_and_ignores_padding(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, generator=g) * 3 + 2
    mask = (torch.rand(4, 6, generator=g) < 0.6).float()
    vals = [float(x[i, t]) for i in range(4) for t in range(6) if mask[i, t]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals) + 1e-8)
    expected = torch.tensor([[(float(x[i, t]) - mean) / std if mask[i, t] else 0.0 for t in range(6)]
                             for i in range(4)])
    out = masked_whiten(x.masked_fill(~mask.bool(), 1e6), mask)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out, masked_whiten(x.masked_fill(~mask.bool(), float("nan")), mask))


def test_masked_whiten_of_a_constant_is_zero_not_nan():
    assert torch.equal(masked_whiten(torch.full((2, 3), 5.0), torch.ones(2, 3)), torch.zeros(2, 3))


# ---- dynamic sampling and overlong ----------------------------------------------------------------------------------
def test_filter_groups_keeps_groups_with_different_rewards():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 1.5, 0.5])
    # groups of 2: [1,1] same, [0,1] differ, [0,0] same, [.5,.5] same, [1.5,.5] differ
    assert filter_groups(rewards, 2).tolist() == [False, True, False, False, True]
    assert filter_groups(rewards, 5).tolist() == [True, True]
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        filter_groups(rewards, 3)


def test_overlong_penalty_ramp():
    # L_max 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 (x factor) at and beyond 10
    lengths = torch.tensor([0, 6, 7, 8, 10, 12])
    torch.testing.assert_close(overlong_penalty(lengths, max_new_tokens=10, buffer=4),
                               torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, max_new_tokens=10, buffer=4, factor=0.5),
                               torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))
    with pytest.raises(ValueError, match="overlong buffer must be in"):
        overlong_penalty(lengths, max_new_tokens=10, buffer=11)

"""Advantage estimators vs slow Python reference loops on random padded batches, plus hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from lmmr1.modules.algorithms import ADVANTAGE_ESTIMATORS

GARBAGE = 1e6


def _batch(seed: int, B: int = 3, G: int = 4, T: int = 7, holes: bool = False):
    """Random rewards (discrete and continuous), a padded mask (right padding, or random holes) with one empty row,
    per-token rewards and values; padding positions of the per-token tensors hold `GARBAGE`."""
    g = torch.Generator().manual_seed(seed)
    N = B * G
    rewards = torch.where(torch.rand(N, generator=g) < 0.5, torch.randint(0, 2, (N,), generator=g).float(),
                          torch.randn(N, generator=g))
    if holes:
        mask = (torch.rand(N, T, generator=g) < 0.7).float()
    else:
        lengths = torch.randint(1, T + 1, (N,), generator=g)
        mask = (torch.arange(T) < lengths.unsqueeze(-1)).float()
    mask[N // 2] = 0  # a response with no valid token (e.g. masked because truncated)
    token_rewards = torch.where(mask.bool(), 0.1 * torch.randn(N, T, generator=g), GARBAGE)
    values = torch.where(mask.bool(), torch.randn(N, T, generator=g), GARBAGE)
    return rewards, mask, token_rewards, values, G


# ---- slow, obviously-correct references: loops over rows and valid tokens ------------------------------------------
def _valid(mask, i):
    return [t for t in range(mask.shape[1]) if mask[i, t] > 0]


def _token_rewards(seq_reward, mask, token_rewards, i):
    """The reward sequence of row i over its valid tokens: token terms, plus the sequence reward on the last."""
    pos = _valid(mask, i)
    r = [float(token_rewards[i, t]) if token_rewards is not None else 0.0 for t in pos]
    if pos:
        r[-1] += seq_reward
    return pos, r


def _return_to_go(r, gamma):
    out, running = [0.0] * len(r), 0.0
    for k in reversed(range(len(r))):
        running = r[k] + gamma * running
        out[k] = running
    return out


def _whiten(table, mask, eps):
    vals = [table[i][t] for i in range(len(table)) for t in _valid(mask, i)]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)
    return [[(table[i][t] - mean) / math.sqrt(var + eps) if mask[i, t] > 0 else 0.0 for t in range(mask.shape[1])]
            for i in range(len(table))]


def _group_scores(rewards, G, name, eps):
    out = []
    for b in range(len(rewards) // G):
        grp = [float(x) for x in rewards[b * G:(b + 1) * G]]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))  # unbiased, as torch.std
        for x in grp:
            if name == "grpo":
                out.append((x - mean) / (std + eps))
            elif name == "rloo":
                out.append(x - (sum(grp) - x) / (G - 1))
            elif name in ("dr_grpo", "reinforce_baseline"):
                out.append(x - mean)
            else:  # reinforce_pp: no baseline
                out.append(x)
    return out


def reference(name, rewards, mask, token_rewards, values, G, gamma, lam, eps):
    N, T = mask.shape
    adv = [[0.0] * T for _ in range(N)]
    ret = [[0.0] * T for _ in range(N)]
    if name == "gae":
        for i in range(N):
            pos, r = _token_rewards(float(rewards[i]), mask, token_rewards, i)
            v = [float(values[i, t]) for t in pos]
            a_next = 0.0
            for k in reversed(range(len(pos))):
                v_next = v[k + 1] if k + 1 < len(pos) else 0.0
                a_next = r[k] + gamma * v_next - v[k] + gamma * lam * a_next
                adv[i][pos[k]], ret[i][pos[k]] = a_next, a_next + v[k]
        return _whiten(adv, mask, eps), ret
    scores = _group_scores(rewards, G, name, eps)
    for i in range(N):
        pos, r = _token_rewards(scores[i], mask, token_rewards, i)
        for t, g in zip(pos, _return_to_go(r, gamma)):
            ret[i][t] = g
    if name in ("reinforce_pp", "reinforce_baseline"):
        return _whiten(ret, mask, eps), ret
    return ret, ret


NAMES = ["gae", "reinforce_pp", "reinforce_baseline", "rloo", "grpo", "dr_grpo"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("gamma,lam,with_token_rewards", [(1.0, 1.0, False), (0.9, 0.8, True)])
def test_estimator_matches_reference_loop(name, seed, holes, gamma, lam, with_token_rewards):
    rewards, mask, token_rewards, values, G = _batch(seed, holes=holes)
    token_rewards = token_rewards if with_token_rewards else None
    adv, ret = ADVANTAGE_ESTIMATORS[name](rewards, mask, group_size=G, values=values, token_rewards=token_rewards,
                                          gamma=gamma, lam=lam)
    ref_adv, ref_ret = reference(name, rewards, mask, token_rewards, values, G, gamma, lam, 1e-6)
    torch.testing.assert_close(adv, torch.tensor(ref_adv), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ret, torch.tensor(ref_ret), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_padding_never_changes_any_result(name):
    rewards, mask, token_rewards, values, G = _batch(5, holes=True)
    pad = ~mask.bool()
    results = []
    for garbage in (GARBAGE, -7.0, float("nan")):
        out = ADVANTAGE_ESTIMATORS[name](rewards, mask, group_size=G, values=values.masked_fill(pad, garbage),
                                         token_rewards=token_rewards.masked_fill(pad, garbage), gamma=0.9, lam=0.9)
        results.append(out)
        assert all(torch.isfinite(x).all() for x in out)
        assert all((x[pad] == 0).all() for x in out)  # zero wherever response_mask == 0
    for adv, ret in results[1:]:
        torch.testing.assert_close(adv, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(ret, results[0][1], rtol=0, atol=0)


def test_grpo_hand_worked_group():
    # one group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.8660
    adv, _ = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.ones(4, 2), group_size=4)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.8660, -0.8660, -0.8660, 0.8660]), atol=1e-4, rtol=0)
    torch.testing.assert_close(adv[:, 1], adv[:, 0])  # gamma = 1, no token rewards: same on every token


def test_group_with_equal_rewards_has_zero_advantage():
    # group 1 all correct, group 2 all wrong: no signal under any group baseline (and no NaN from std = 0)
    rewards, mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), torch.ones(6, 3)
    for name in ("grpo", "dr_grpo", "rloo"):
        adv, _ = ADVANTAGE_ESTIMATORS[name](rewards, mask, group_size=3)
        assert torch.equal(adv, torch.zeros(6, 3)), name


def test_rloo_hand_worked():
    # G = 3, rewards [1, 0, 2]: leave-one-out baselines (0+2)/2 = 1, (1+2)/2 = 1.5, (1+0)/2 = 0.5
    adv, _ = ADVANTAGE_ESTIMATORS["rloo"](torch.tensor([1.0, 0.0, 2.0]), torch.ones(3, 1), group_size=3)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.0, -1.5, 1.5]))


def test_gae_three_token_sequence():
    # values [0.5, 0.6, 0.7], reward 1 on the last token, gamma 0.9, lambda 0.8, then two padding tokens:
    # delta2 = 1 - 0.7 = 0.3                   A2 = 0.3
    # delta1 = 0.9 * 0.7 - 0.6 = 0.03          A1 = 0.03 + 0.72 * 0.3   = 0.246
    # delta0 = 0.9 * 0.6 - 0.5 = 0.04          A0 = 0.04 + 0.72 * 0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    values = torch.tensor([[0.5, 0.6, 0.7, GARBAGE, GARBAGE]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    adv, ret = ADVANTAGE_ESTIMATORS["gae"](torch.tensor([1.0]), mask, group_size=1, values=values, gamma=0.9, lam=0.8,
                                           whiten=False)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0, 0.0, 0.0]]))


def test_reinforce_pp_folds_token_rewards_into_discounted_returns():
    # per-token KL penalty -0.1, reward 1 at the end, gamma 0.5: r = [-0.1, -0.1, 0.9]
    # G2 = 0.9, G1 = -0.1 + 0.5 * 0.9 = 0.35, G0 = -0.1 + 0.5 * 0.35 = 0.075
    mask = torch.ones(1, 3)
    adv, ret = ADVANTAGE_ESTIMATORS["reinforce_pp"](torch.tensor([1.0]), mask, group_size=1,
                                                    token_rewards=torch.full((1, 3), -0.1), gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[0.075, 0.35, 0.9]]))
    expected = torch.tensor([0.075, 0.35, 0.9])
    expected = (expected - expected.mean()) / (expected.var(unbiased=False) + 1e-6).sqrt()  # batch-whitened
    torch.testing.assert_close(adv[0], expected)


def test_user_errors():
    mask = torch.ones(4, 2)
    with pytest.raises(ValueError, match="needs per-token values from a critic"):
        ADVANTAGE_ESTIMATORS["gae"](torch.zeros(4), mask, group_size=1)
    with pytest.raises(ValueError, match="needs group_size >= 2"):
        ADVANTAGE_ESTIMATORS["grpo"](torch.zeros(4), mask, group_size=1)
    with pytest.raises(ValueError, match="4 rewards do not split into groups of 3"):
        ADVANTAGE_ESTIMATORS["rloo"](torch.zeros(4), mask, group_size=3)
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'; choose from \['dr_grpo', 'gae'"):
        ADVANTAGE_ESTIMATORS["ppo"]

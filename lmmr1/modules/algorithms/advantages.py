"""Advantage estimators: sequence rewards (+ optional per-token terms) -> per-token advantages and returns.

All six share one signature so the trainer can switch them from YAML:

    ADVANTAGE_ESTIMATORS[name](rewards, response_mask, *, group_size, values=None, token_rewards=None,
                               gamma=1.0, lam=1.0, eps=1e-6, reduce=None) -> (advantages (N, T), returns (N, T))

`reduce` sums the whitening statistics over data-parallel ranks (`lmmr1.distributed.global_sum`), so the estimators
that whiten over the batch (gae, reinforce_pp, reinforce_baseline) whiten the global batch; the group estimators need
nothing (a prompt's G samples are always on one rank).

Layout: `rewards` (N,) holds B contiguous groups of G = group_size samples of the same prompt. The sequence reward
is placed on the last valid response token; `token_rewards` (N, T), e.g. `-kl_coef * kl` when the KL penalty lives
in the reward, is added on every valid token. Discounting runs over valid tokens only: padding (and any hole in the
mask) is skipped, never read, and comes back as 0 in both outputs.

Every estimator except `gae` turns the (shaped) sequence reward into a token-level return-to-go
G_t = r_t + gamma * G_{t+1} as OpenRLHF does, so with gamma = 1 and no token rewards the advantage is the same
for every token of a response. `returns` is that return (pre-whitening); for `gae` it is A_t + V_t (critic target).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmmr1.modules.algorithms.aggregation import Reduce, _masked, masked_whiten
from lmmr1.modules.algorithms.registry import ADVANTAGE_ESTIMATORS

GROUP_ESTIMATORS = frozenset({"grpo", "dr_grpo", "rloo", "reinforce_baseline"})
"""Estimators whose baseline comes from the other samples of the same prompt: they need group_size >= 2."""


def _groups(rewards: Tensor, group_size: int, name: str) -> Tensor:
    """(N,) -> (B, G) view, with user-facing errors for a bad layout."""
    if rewards.dim() != 1:
        raise ValueError(f"advantage {name!r}: rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"advantage {name!r}: {rewards.numel()} rewards do not split into groups of {group_size}")
    if name in GROUP_ESTIMATORS and group_size < 2:
        raise ValueError(f"advantage {name!r} needs group_size >= 2 (sampling.n), got {group_size}")
    return rewards.view(-1, group_size)


def _place_rewards(rewards: Tensor, mask: Tensor, token_rewards: Tensor | None) -> Tensor:
    """(N,) sequence rewards on the last valid token of each row, plus per-token terms; 0 on padding. (N, T)."""
    valid = mask.bool()
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    last = torch.where(valid, positions, -1).max(-1).values  # (N,), -1 for an empty row (its reward is dropped)
    placed = (positions == last.unsqueeze(-1)) & valid
    out = torch.where(placed, rewards.to(torch.float32).unsqueeze(-1), 0.0)
    if token_rewards is not None:
        assert token_rewards.shape == mask.shape, f"token_rewards {tuple(token_rewards.shape)} vs {tuple(mask.shape)}"
        out = out + _masked(token_rewards.to(torch.float32), mask)
    return out


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Return-to-go G_t = r_t + gamma * G_{t'} over valid tokens (t' = next valid token), 0 on padding. (N, T)."""
    r = _masked(token_rewards, mask)
    if gamma == 1.0:  # reverse cumulative sum; padding contributes 0 so holes need no special care
        return _masked(r.flip(-1).cumsum(-1).flip(-1), mask)
    valid = mask.bool()
    running = torch.zeros_like(r[:, 0])
    out = torch.zeros_like(r)
    for t in reversed(range(r.shape[-1])):
        running = torch.where(valid[:, t], r[:, t] + gamma * running, running)
        out[:, t] = torch.where(valid[:, t], running, 0.0)
    return out


def _broadcast_returns(seq_scores: Tensor, mask: Tensor, token_rewards: Tensor | None, gamma: float) -> Tensor:
    return discounted_returns(_place_rewards(seq_scores, mask, token_rewards), mask, gamma)


@ADVANTAGE_ESTIMATORS.register("gae")
def gae(rewards: Tensor, response_mask: Tensor, *, group_size: int = 1, values: Tensor | None = None,
        token_rewards: Tensor | None = None, gamma: float = 1.0, lam: float = 1.0, eps: float = 1e-6,
        whiten: bool = True, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (GAE, arXiv:1506.02438) for PPO (arXiv:1707.06347) with a critic.

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0), A_t = delta_t + gamma * lam * A_{t+1};
    returns R_t = A_t + V_t (the critic's target). Advantages are then whitened over the batch, as PPO implementations
    (verl, OpenRLHF) do; `whiten=False` gives the raw estimate.

    Args:
        rewards: (N,) sequence rewards. response_mask: (N, T). values: (N, T) critic values (required).
        token_rewards: optional (N, T) per-token rewards (e.g. KL penalty). gamma, lam: discount and GAE lambda.
    """
    _groups(rewards, group_size, "gae")
    if values is None:
        raise ValueError("advantage 'gae' needs per-token values from a critic; use a critic-free estimator "
                         "(grpo, rloo, reinforce_baseline, ...) or configure a critic")
    assert values.shape == response_mask.shape, f"values {tuple(values.shape)} vs mask {tuple(response_mask.shape)}"
    r = _place_rewards(rewards, response_mask, token_rewards)
    v = _masked(values.detach().to(torch.float32), response_mask)
    valid = response_mask.bool()
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    advantages = torch.zeros_like(r)
    for t in reversed(range(r.shape[-1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        next_adv = torch.where(valid[:, t], adv_t, next_adv)  # padding: carry the chain through unchanged
        next_value = torch.where(valid[:, t], v[:, t], next_value)
        advantages[:, t] = torch.where(valid[:, t], adv_t, 0.0)
    returns = _masked(advantages + v, response_mask)
    if whiten:
        advantages = masked_whiten(advantages, response_mask, eps=eps, reduce=reduce)
    return advantages, returns


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp(rewards: Tensor, response_mask: Tensor, *, group_size: int = 1, values: Tensor | None = None,
                 token_rewards: Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
                 eps: float = 1e-6, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (arXiv:2501.03262): token-level discounted return of (sequence reward + per-token KL penalty),
    whitened over all valid tokens of the batch; no critic, no group baseline."""
    _groups(rewards, group_size, "reinforce_pp")
    returns = _broadcast_returns(rewards, response_mask, token_rewards, gamma)
    return masked_whiten(returns, response_mask, eps=eps, reduce=reduce), returns


@ADVANTAGE_ESTIMATORS.register("reinforce_baseline")
def reinforce_baseline(rewards: Tensor, response_mask: Tensor, *, group_size: int, values: Tensor | None = None,
                       token_rewards: Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
                       eps: float = 1e-6, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """LMM-R1's default (OpenRLHF `reinforce_baseline`, arXiv:2501.03262 sec. on baselines): subtract the group mean
    reward, take the token-level return, then whiten over the batch (robust to reward scale, unlike GRPO's per-group
    std that blows up nearly-uniform groups)."""
    grouped = _groups(rewards, group_size, "reinforce_baseline").to(torch.float32)
    centred = (grouped - grouped.mean(-1, keepdim=True)).flatten()
    returns = _broadcast_returns(centred, response_mask, token_rewards, gamma)
    return masked_whiten(returns, response_mask, eps=eps, reduce=reduce), returns


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo(rewards: Tensor, response_mask: Tensor, *, group_size: int, values: Tensor | None = None,
         token_rewards: Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
         eps: float = 1e-6, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """REINFORCE Leave-One-Out (RLOO, arXiv:2402.14740): baseline of sample i is the mean reward of the other G-1
    samples of its prompt, A_i = r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) * (r_i - mean)."""
    grouped = _groups(rewards, group_size, "rloo").to(torch.float32)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    advantages = _broadcast_returns((grouped - baseline).flatten(), response_mask, token_rewards, gamma)
    return advantages, advantages


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo(rewards: Tensor, response_mask: Tensor, *, group_size: int, values: Tensor | None = None,
         token_rewards: Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
         eps: float = 1e-6, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """GRPO outcome supervision (arXiv:2402.03300 sec. 4.1.2): A_i = (r_i - mean(group)) / (std(group) + eps), with
    the unbiased (G-1) std as verl/OpenRLHF/TRL. A group whose rewards are all equal gets advantage 0."""
    grouped = _groups(rewards, group_size, "grpo").to(torch.float32)
    normalised = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + eps)
    advantages = _broadcast_returns(normalised.flatten(), response_mask, token_rewards, gamma)
    return advantages, advantages


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo(rewards: Tensor, response_mask: Tensor, *, group_size: int, values: Tensor | None = None,
            token_rewards: Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
            eps: float = 1e-6, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """Dr. GRPO (arXiv:2503.20783): A_i = r_i - mean(group), no std division (which up-weights too-easy / too-hard
    prompts); pair it with the constant-length aggregation "seq-mean-token-sum-norm" in the loss."""
    grouped = _groups(rewards, group_size, "dr_grpo").to(torch.float32)
    centred = (grouped - grouped.mean(-1, keepdim=True)).flatten()
    advantages = _broadcast_returns(centred, response_mask, token_rewards, gamma)
    return advantages, advantages

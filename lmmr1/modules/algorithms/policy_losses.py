"""Policy losses (PPO clip with clip-higher and dual-clip, GSPO), the clipped value loss, and the entropy bonus.

Each loss maps per-token log-probs to a 0-dim loss through `aggregate` (it never normalises on its own) and returns
`(loss, metrics)`; metrics are detached 0-dim tensors averaged over valid tokens, whatever the loss aggregation:

    clip_frac       tokens where a clipped branch is active (their gradient is exactly 0)
    clip_frac_low   ... the lower clip (ratio < 1 - clip_low, advantage < 0)
    clip_frac_high  ... the upper clip (ratio > 1 + clip_high, advantage > 0)
    dual_clip_frac  tokens held by the dual-clip bound (advantage < 0, ratio > dual_clip)
    approx_kl       KL(old || current) by the k3 estimator (r - 1) - log r, r = pi / pi_old

"Gradient exactly 0 where clipped" is implemented with `torch.where` on the branch choice, so a token whose clipped
branch is active contributes a constant (not a subgradient mix of both branches).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmmr1.modules.algorithms.aggregation import _masked, aggregate, masked_mean
from lmmr1.modules.algorithms.registry import POLICY_LOSSES

LOG_RATIO_CLAMP = 20.0


def _check_clip(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (a multiple of the advantage, e.g. 3.0), got {dual_clip}")


def _per_token(advantages: Tensor, mask: Tensor) -> Tensor:
    """Accept (N,) sequence advantages as well as (N, T) token advantages."""
    return advantages.unsqueeze(-1).expand_as(mask) if advantages.dim() == 1 else advantages


def _clipped_surrogate(ratio: Tensor, log_ratio: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float,
                       clip_high: float, dual_clip: float | None, aggregation: str,
                       max_len: int | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Shared PPO/GSPO core: pessimistic min of the unclipped and clipped surrogate, optional dual clip."""
    _check_clip(clip_low, clip_high, dual_clip)
    advantages = _per_token(advantages, mask).detach()
    unclipped = -advantages * ratio
    # Clip-higher: asymmetric range [1 - clip_low, 1 + clip_high] (DAPO, arXiv:2503.14476) keeps low-probability
    # tokens able to grow, against entropy collapse; clip_low == clip_high is the PPO clip (arXiv:1707.06347 eq. 7).
    # (a clip_high beyond the dtype's range means no upper clip; torch refuses a bound it cannot represent)
    clipped = -advantages * ratio.clamp(1.0 - clip_low, min(1.0 + clip_high, torch.finfo(ratio.dtype).max))
    use_clipped = clipped > unclipped  # max of the two losses == min of the two objectives
    loss = torch.where(use_clipped, clipped, unclipped)
    use_dual = torch.zeros_like(use_clipped)
    if dual_clip is not None:
        # Dual-clip PPO (arXiv:1912.09729 eq. 5): for A < 0 the loss -A*r grows without bound in r; cap it at -A*c.
        bound = -advantages * dual_clip
        use_dual = (advantages < 0) & (loss > bound)
        loss = torch.where(use_dual, bound, loss)
    valid = mask.bool()
    with torch.no_grad():
        ratio_d, log_ratio_d = ratio.detach(), log_ratio.detach()
        metrics = {
            "clip_frac": masked_mean((use_clipped | use_dual).float(), valid),
            "clip_frac_low": masked_mean((use_clipped & (ratio_d < 1.0 - clip_low)).float(), valid),
            "clip_frac_high": masked_mean((use_clipped & (ratio_d > 1.0 + clip_high)).float(), valid),
            "dual_clip_frac": masked_mean(use_dual.float(), valid),
            "approx_kl": masked_mean(torch.expm1(log_ratio_d) - log_ratio_d, valid),
        }
    return aggregate(loss, mask, aggregation, max_len=max_len), metrics


@POLICY_LOSSES.register("ppo")
def ppo(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, *, clip_low: float = 0.2,
        clip_high: float = 0.2, dual_clip: float | None = None, aggregation: str = "token-mean",
        max_len: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level PPO clipped surrogate (arXiv:1707.06347) with clip-higher and optional dual clip.

    loss_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high)), r_t = exp(logprobs_t - old_logprobs_t);
    with dual_clip c: loss_t = min(loss_t, -A_t c) where A_t < 0. Reduced with `aggregation`.

    Args:
        logprobs: (N, T) current policy log-probs of the sampled tokens (with grad).
        old_logprobs: (N, T) log-probs of the policy that sampled them (no grad).
        advantages: (N, T) or (N,). response_mask: (N, T).
        clip_low, clip_high: the clip range. dual_clip: constant c > 1, or None.
        aggregation, max_len: see `aggregate`.
    """
    log_ratio = _masked(logprobs - old_logprobs.detach(), response_mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _clipped_surrogate(log_ratio.exp(), log_ratio, advantages, response_mask, clip_low=clip_low,
                              clip_high=clip_high, dual_clip=dual_clip, aggregation=aggregation, max_len=max_len)


@POLICY_LOSSES.register("gspo")
def gspo(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, *, clip_low: float = 0.2,
         clip_high: float = 0.2, dual_clip: float | None = None, aggregation: str = "token-mean",
         max_len: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Group Sequence Policy Optimization (GSPO, arXiv:2507.18071): one importance ratio per sequence,
    s_i = exp(mean_t(logprobs - old_logprobs)), clipped as a whole sequence.

    Implemented in the paper's token form ("GSPO-token", eq. 13): s_{i,t} = sg(s_i) * exp(logp_t - sg(logp_t)) has
    value s_i and gradient s_i * grad(logp_t), so with aggregation "seq-mean-token-mean" (the paper's) value and
    gradient equal the sequence-level objective exactly, and per-token advantages also work. The paper's clip ranges
    are much smaller than PPO's (about 3e-4 / 4e-4), because a sequence ratio moves far less than a token ratio.
    Args as `ppo`.
    """
    token_log_ratio = _masked(logprobs - old_logprobs.detach(), response_mask)
    seq_log_ratio = masked_mean(token_log_ratio, response_mask, dim=-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_ratio = _masked(logprobs - logprobs.detach(), response_mask) + seq_log_ratio.detach().unsqueeze(-1)
    return _clipped_surrogate(log_ratio.exp(), log_ratio, advantages, response_mask, clip_low=clip_low,
                              clip_high=clip_high, dual_clip=dual_clip, aggregation=aggregation, max_len=max_len)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, *,
               clip: float | None = 0.2, aggregation: str = "token-mean",
               max_len: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic loss for `gae`: 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -c, c)
    (value clipping as in the PPO baselines implementation, arXiv:1707.06347 / OpenAI baselines ppo2).

    Args:
        values: (N, T) current critic values (with grad). old_values: (N, T) values at rollout time.
        returns: (N, T) targets from the estimator. response_mask: (N, T).
        clip: the value clip range; None disables clipping. aggregation, max_len: see `aggregate`.

    Returns:
        (loss, {"value_clip_frac", "value_error"}) where value_error is the token-mean |V - R|.
    """
    valid = response_mask.bool()
    err = _masked(values - returns.detach(), valid)
    loss = 0.5 * err**2
    clip_used = torch.zeros_like(valid)
    if clip is not None:
        clipped_values = old_values.detach() + (values - old_values.detach()).clamp(-clip, clip)
        clipped_loss = 0.5 * _masked(clipped_values - returns.detach(), valid) ** 2
        clip_used = clipped_loss > loss
        loss = torch.where(clip_used, clipped_loss, loss)
    metrics = {"value_clip_frac": masked_mean(clip_used.float(), valid).detach(),
               "value_error": masked_mean(err.detach().abs(), valid)}
    return aggregate(loss, response_mask, aggregation, max_len=max_len), metrics


def entropy_bonus(entropy: Tensor, response_mask: Tensor, *, coef: float, aggregation: str = "token-mean",
                  max_len: int | None = None) -> Tensor:
    """Loss term -coef * aggregate(entropy): subtracting it rewards keeping the policy stochastic (PPO,
    arXiv:1707.06347 eq. 9). entropy: (N, T) per-token entropy of the current policy, with grad. 0-dim."""
    return -coef * aggregate(entropy, response_mask, aggregation, max_len=max_len)

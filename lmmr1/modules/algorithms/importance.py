"""Truncated importance sampling (TIS) for the rollout/training mismatch.

The engine that samples (vLLM: other kernels, other precision) and the policy that trains assign slightly different
probabilities to the same tokens, so the samples are slightly off-policy. TIS (Yao et al. 2025, "Your efficient RL
framework secretly brings you off-policy RL training"; verl's `tis_imp_ratio_cap`) reweights each token by
min(pi_train / pi_rollout, cap), detached. With a weight w >= 0, -w * min(r A, clip(r) A) = -min(r (wA), clip(r) (wA)),
so the correction is applied by scaling the advantages token by token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def truncated_importance_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *,
                                 cap: float) -> Tensor:
    """(N, T) detached weights min(exp(old - rollout), cap), zero where mask is 0.

    Args:
        old_logprobs: (N, T) log-probs of the sampled tokens under the training policy before the update.
        rollout_logprobs: (N, T) log-probs the rollout engine reported for the same tokens.
        mask: (N, T) 1 for response tokens.
        cap: upper bound of the weight (e.g. 2.0).
    """
    assert old_logprobs.shape == rollout_logprobs.shape == mask.shape
    ratio = torch.exp((old_logprobs - rollout_logprobs).clamp(max=20.0)).detach()  # clamp: exp overflow on padding
    return torch.where(mask.bool(), ratio.clamp(max=cap), torch.zeros_like(ratio))

"""Masked reductions: the four loss-aggregation modes, masked mean/whitening, and micro-batch weights.

Every loss in lmmr1 reduces its per-token terms through `aggregate`, so the choice "average over tokens or over
sequences, and how to normalise length" is one config value instead of a detail hidden in each loss.

Mask semantics: `mask` (N, T) is 1/True for response tokens that count and 0/False for padding; values at padding
positions are never read (they are selected away with `torch.where`, so even inf/NaN garbage there is harmless).

Micro-batch invariance (gradient accumulation). Split a batch of N rows into micro-batches and accumulate
`w_k * aggregate(micro_k)`. Which weights reproduce the full-batch loss (and so its gradient) exactly?

| mode                    | full-batch normaliser     | plain mean of equal-size micro-batches | exact weight        |
|-------------------------|---------------------------|----------------------------------------|---------------------|
| token-mean              | all valid tokens in batch | NOT invariant (token counts differ)    | tokens_k / tokens   |
| seq-mean-token-mean     | N rows                    | invariant                              | rows_k / N          |
| seq-mean-token-sum      | N rows                    | invariant                              | rows_k / N          |
| seq-mean-token-sum-norm | N rows x max_len          | invariant                              | rows_k / N          |

`micro_batch_share` returns the exact weight for each mode. Rows with no valid token count as a zero-loss row in the
seq-mean modes (they stay in the denominator N), which is what keeps those modes invariant.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lmmr1.modules.algorithms.registry import LOSS_AGGREGATIONS

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor statistic over every holder of a batch (identity in one process)."""


def _identity(x: Tensor) -> Tensor:
    return x


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x with padding positions replaced by 0 (select, not multiply, so inf/NaN padding cannot leak)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


@LOSS_AGGREGATIONS.register("token-mean")
def token_mean(x: Tensor, mask: Tensor, *, max_len: int | None = None) -> Tensor:
    """Mean over every valid token of the batch: long responses weigh more (DAPO's choice, arXiv:2503.14476)."""
    return _masked(x, mask).sum() / mask.bool().sum().clamp(min=1)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(x: Tensor, mask: Tensor, *, max_len: int | None = None) -> Tensor:
    """Per-sequence token mean, then mean over sequences (original GRPO, arXiv:2402.03300; carries the length bias
    Dr. GRPO points out: short wrong answers are punished more per token)."""
    per_seq = _masked(x, mask).sum(-1) / mask.bool().sum(-1).clamp(min=1)
    return per_seq.mean()


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(x: Tensor, mask: Tensor, *, max_len: int | None = None) -> Tensor:
    """Per-sequence token sum, then mean over sequences (the REINFORCE sequence log-likelihood form)."""
    return _masked(x, mask).sum(-1).mean()


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(x: Tensor, mask: Tensor, *, max_len: int | None = None) -> Tensor:
    """Per-sequence token sum divided by a constant `max_len`, then mean over sequences: removes the length bias
    without rewarding length (Dr. GRPO, arXiv:2503.20783). `max_len` must be a constant such as max_new_tokens;
    the padded width T changes from batch to batch and would reintroduce a batch-dependent scale."""
    if max_len is None or max_len <= 0:
        raise ValueError("aggregation 'seq-mean-token-sum-norm' needs a positive max_len (set "
                         "--model.algorithm.loss.max_len, e.g. to sampling.max_new_tokens)")
    return _masked(x, mask).sum(-1).mean() / max_len


def aggregate(x: Tensor, mask: Tensor, mode: str, *, max_len: int | None = None) -> Tensor:
    """Reduce per-token values to a scalar with a named mode (see the module docstring's table).

    Args:
        x: (N, T) per-token values (loss terms, KL, entropy, ...).
        mask: (N, T) 1/True where the token counts.
        mode: a key of LOSS_AGGREGATIONS.
        max_len: the constant length for "seq-mean-token-sum-norm"; ignored by the other modes.

    Returns:
        0-dim tensor, differentiable w.r.t. x.
    """
    assert x.shape == mask.shape, f"x {tuple(x.shape)} vs mask {tuple(mask.shape)}"
    return LOSS_AGGREGATIONS[mode](x, mask, max_len=max_len)


def loss_units(mask: Tensor, mode: str) -> Tensor:
    """What a batch contributes to its aggregation's normaliser: valid tokens for token-mean, rows for the seq-mean
    modes (rows with no valid token included). 0-dim float tensor."""
    LOSS_AGGREGATIONS[mode]  # unknown modes fail here, with the list of choices
    if mode == "token-mean":
        return mask.bool().sum().float()
    return torch.tensor(float(mask.shape[0]), device=mask.device)


def micro_batch_share(micro_mask: Tensor, total_units: Tensor, mode: str) -> Tensor:
    """Weight of one micro-batch's aggregated loss so that the weighted sum over micro-batches equals the full-batch
    loss exactly: its `loss_units` over those of the whole batch (`total_units`, e.g. summed over ranks). 0-dim."""
    return loss_units(micro_mask, mode) / total_units.clamp(min=1)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over valid positions (all of them, or along `dim`)."""
    if dim is None:
        return _masked(x, mask).sum() / mask.bool().sum().clamp(min=1)
    return _masked(x, mask).sum(dim) / mask.bool().sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8, reduce: Reduce | None = None) -> Tensor:
    """Shift and scale x to zero mean and unit variance over the valid positions of the whole batch.

    The variance is the population (biased) variance of the valid entries, as OpenRLHF's advantage normalisation;
    padding positions come back as 0. A constant input whitens to all zeros (not NaN) thanks to `eps`.

    Args:
        x: (N, T) values, e.g. advantages.
        mask: (N, T) 1/True where valid.
        eps: added to the variance before the square root.
        reduce: sums a statistic over the other holders of the batch (data-parallel ranks, e.g.
            `lmmr1.distributed.global_sum`), so the whole global batch is whitened as one; None = this batch alone.
    """
    reduce = reduce or _identity
    count = reduce(mask.bool().sum().to(torch.float64)).clamp(min=1)
    mean = (reduce(_masked(x, mask).to(torch.float64).sum()) / count).to(x.dtype)
    centred = _masked(x - mean, mask)
    var = (reduce((centred.to(torch.float64) ** 2).sum()) / count).to(x.dtype)
    return centred * torch.rsqrt(var + eps)

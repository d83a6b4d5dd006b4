"""Soft overlong punishment (DAPO, arXiv:2503.14476 sec. 3.4, eq. 13).

A response cut off at `max_new_tokens` is not necessarily wrong, so a hard 0 reward for truncation is noise. DAPO
instead ramps a penalty linearly over the last `buffer` tokens of the budget: 0 up to max_new_tokens - buffer, then
down to -factor at max_new_tokens (and -factor beyond). The other half of overlong handling, dropping truncated
responses from the loss (`overlong.mask_truncated`), is a mask edit done by the trainer.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(response_lengths: Tensor, *, max_new_tokens: int, buffer: int, factor: float = 1.0) -> Tensor:
    """Length-dependent reward term, added to the sequence reward.

    Args:
        response_lengths: (N,) number of generated tokens of each response.
        max_new_tokens: the generation budget L_max.
        buffer: L_cache, the length of the ramp (0 < buffer <= max_new_tokens).
        factor: penalty at (and beyond) the budget, as a positive magnitude.

    Returns:
        (N,) float tensor in [-factor, 0]:
        0 if len <= L_max - buffer; (L_max - buffer - len) / buffer * factor on the ramp; -factor past L_max.
    """
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"overlong buffer must be in (0, max_new_tokens={max_new_tokens}], got {buffer}")
    expected = max_new_tokens - buffer
    over = (response_lengths.to(torch.float32) - expected).clamp(0.0, float(buffer))
    return -factor * over / buffer

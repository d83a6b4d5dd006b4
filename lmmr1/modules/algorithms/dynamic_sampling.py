"""Dynamic sampling (DAPO, arXiv:2503.14476 sec. 3.2): which prompt groups carry a learning signal.

A group whose G rewards are all equal (all right or all wrong) has zero advantage under every group baseline, so it
adds no gradient but still dilutes the batch. DAPO drops such groups and draws new prompts from the stream until the
batch holds as many kept groups as it should (at most `dynamic_sampling.max_extra_rounds` extra batches), then keeps
the first ones in stream order.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

from torch import Tensor


def filter_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Which groups to keep.

    Args:
        rewards: (N,) sequence rewards, B contiguous groups of `group_size`.
        group_size: G.

    Returns:
        (B,) bool, True where the group's rewards are not all equal (exact comparison: rule rewards are discrete).
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    return grouped.amax(-1) != grouped.amin(-1)


def first_in_stream(positions: list[Any], every_rank: list[list[Any]], target: int) -> list[bool]:
    """Which of this rank's kept groups (`positions`: sortable, unique stream positions of their prompts) are among
    the `target` earliest kept groups of all ranks (`every_rank`: each rank's positions): the batch is cut to its size
    the same way whatever the number of ranks."""
    ordered = sorted(chain.from_iterable(every_rank))
    if len(ordered) <= target:
        return [True] * len(positions)
    cutoff = ordered[target - 1] if target > 0 else -1
    return [p <= cutoff for p in positions]

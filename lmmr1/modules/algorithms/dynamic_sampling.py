"""Dynamic sampling (DAPO, arXiv:2503.14476 sec. 3.2): which prompt groups carry a learning signal.

A group whose G rewards are all equal (all right or all wrong) has zero advantage under every group baseline, so it
adds no gradient but still dilutes the batch. DAPO drops such groups and samples more prompts until the batch is
full; the trainer re-samples the dropped prompts up to `dynamic_sampling.max_extra_rounds` times and logs how many
were dropped in the end (`rollout/dropped_groups`).
"""

from __future__ import annotations

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

"""Global reductions over the data-parallel group, as plain functions that are the identity in a single process.

Batch statistics (advantage whitening, token-mean denominators, the KL controller's input, logged means) must be
computed over the global batch, or N ranks compute N different normalisations of one batch. These helpers are what
`lmmr1.modules.algorithms` receives as its `reduce` argument and what the RLModule calls for its metrics.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lmmr1.distributed.groups import data_parallel, world_size


def all_reduce(tensor: Tensor, op: str = "sum", world: bool = False) -> Tensor:
    """A reduced copy of `tensor` over the data-parallel replicas, or over every process with `world` (op: sum | max
    | min); autograd does not flow through it (statistics only). The input is left untouched."""
    dp = data_parallel()
    out = tensor.detach().clone()
    if world and world_size() > 1:
        dp = replace(dp, group=None)  # the default group: every process
    elif not dp.active:
        return out
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    # gloo reduces float64/float32/int64 on CPU; keep the caller's dtype on the way back
    work = out.to(torch.float64) if out.is_floating_point() else out.to(torch.int64)
    dist.all_reduce(work, op=ops[op], group=dp.group)
    return work.to(out.dtype)


def global_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks (the `reduce` of the pure algorithm functions)."""
    return all_reduce(tensor, "sum")


def global_max(value: int | float) -> int | float:
    """The largest of every process's Python numbers (e.g. micro-batch counts every rank must agree on)."""
    out = all_reduce(torch.tensor(value, dtype=torch.float64), "max", world=True).item()
    return int(out) if isinstance(value, int) else out


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank (e.g. a stop signal that reached only one process)."""
    return bool(global_max(int(flag)))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order ([obj] in a single process)."""
    dp = data_parallel()
    if not dp.active:
        return [obj]
    out: list[Any] = [None] * dp.size
    dist.all_gather_object(out, obj, group=dp.group)
    return out


def global_stats(means: dict[str, tuple[float, float]], sums: dict[str, float] | None = None,
                 maxima: dict[str, float] | None = None) -> dict[str, float]:
    """Merge every rank's statistics in one collective: `means` maps a name to (sum, count) and becomes the global
    count-weighted mean; `sums` are added, `maxima` take the largest. Ranks may hold different names (a reward
    component only one rank's rows have); every rank gets the same merged dict."""
    merged_means: dict[str, list[float]] = {}
    merged_sums: dict[str, float] = {}
    merged_max: dict[str, float] = {}
    for rank_means, rank_sums, rank_max in all_gather_objects((means, sums or {}, maxima or {})):
        for name, (total, count) in rank_means.items():
            into = merged_means.setdefault(name, [0.0, 0.0])
            into[0] += float(total)
            into[1] += float(count)
        for name, value in rank_sums.items():
            merged_sums[name] = merged_sums.get(name, 0.0) + float(value)
        for name, value in rank_max.items():
            merged_max[name] = max(merged_max.get(name, float("-inf")), float(value))
    out = {name: total / count for name, (total, count) in merged_means.items() if count}
    return {**out, **merged_sums, **merged_max}

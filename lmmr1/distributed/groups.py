"""The data-parallel view of the process world: which share of every global batch this rank holds.

Every rank is its own data-parallel replica (rank r of W), unless sequence parallelism groups k ranks that share
samples (lmmr1/distributed/sequence_parallel.py): then there are W / k replicas, and the prompt stream and the global
reductions see rank r // k of W / k. They ask this module instead of `torch.distributed` directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from lmmr1.distributed.sequence_parallel import data_parallel_view


@dataclass(frozen=True)
class DataParallel:
    """Rank `rank` of `size` data-parallel replicas; `group` is the process group to reduce over (None = world)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @property
    def active(self) -> bool:
        """True when there is more than one replica (collectives needed)."""
        return self.size > 1


def data_parallel() -> DataParallel:
    """This process's data-parallel position; a single process outside any process group is rank 0 of 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return DataParallel()
    view = data_parallel_view()
    if view is not None:
        return DataParallel(*view)
    return DataParallel(rank=dist.get_rank(), size=dist.get_world_size())


def world_size() -> int:
    """Every process of the job (data- x sequence-parallel); 1 outside a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def zero3_partitioned(module: Any) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned `module`'s parameters (every forward is then a collective)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())

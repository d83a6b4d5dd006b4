"""The data-parallel view of the process world: which share of every global batch this rank holds.

Today every rank is its own data-parallel replica (rank r of W). Sequence parallelism will group ranks that share
samples; the prompt stream and the global reductions ask this module instead of `torch.distributed` directly, so only
this file changes then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


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
    return DataParallel(rank=dist.get_rank(), size=dist.get_world_size())


def zero3_partitioned(module: Any) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned `module`'s parameters (every forward is then a collective)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())

"""Distributed glue: who this process is (data-parallel rank and world), global reductions over the data-parallel
group, and the DeepSpeed strategy that also runs on CPU. The RL loop itself stays one loop for every topology: it asks
these helpers for global statistics and they return local ones in a single process."""

from lmmr1.distributed.groups import DataParallel, data_parallel, world_size, zero3_partitioned
from lmmr1.distributed.reductions import all_gather_objects, all_reduce, any_rank, global_max, global_stats, global_sum
from lmmr1.distributed.strategy import DeepSpeedStrategy

__all__ = [
    "DataParallel",
    "DeepSpeedStrategy",
    "all_gather_objects",
    "all_reduce",
    "any_rank",
    "data_parallel",
    "global_max",
    "global_stats",
    "global_sum",
    "world_size",
    "zero3_partitioned",
]

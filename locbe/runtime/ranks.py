"""This process's place among torchrun's processes, one record for training and evaluation.

``RankInfo`` holds the rank and world size (and their per-node counterparts, for the CUDA device
and the CPU cores a rank may use). ``join_process_group`` joins torchrun's process group (NCCL for
CUDA, gloo on CPU) when the process was launched with ``WORLD_SIZE > 1``; ``current_ranks`` reads
the record of the group already joined, or one process when there is none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_ranks() -> RankInfo:
    """The process group's rank and world size when one is up (torchrun), else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return RankInfo(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")),
                        int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    return RankInfo()


def join_process_group(cuda: bool) -> RankInfo:
    """Join torchrun's process group (NCCL when ``cuda``, else gloo) if launched by torchrun and not joined yet."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current_ranks()

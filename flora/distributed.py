"""torchrun's environment, read in one place: this process's rank, the world size, its local rank.

Leaves out: process groups and DDP (training/loop.py), how loaders cut an epoch by rank (loaders/).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def torchrun_env(rank: int | None = None, world_size: int | None = None) -> TorchrunEnv:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun sets them (0 / 1 / rank when unset);
    explicit ``rank`` / ``world_size`` win. A rank outside ``[0, world_size)`` is a ValueError."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return TorchrunEnv(rank, world_size, local_rank)

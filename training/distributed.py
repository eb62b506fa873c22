"""The distributed set-up of a run: torchrun's process group, collectives, and DDP.

Owns ``Dist`` (this process's rank, world size and local rank, with the few collectives the loop
needs: gather, mean, barrier), ``init_distributed`` (NCCL on GPUs, gloo on the CPU, from torchrun's
environment), ``wrap_ddp`` (the one DDP call every rank makes) and ``destroy_distributed``.

Leaves out: reading torchrun's variables (flora.distributed), what is trained (loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from flora.distributed import torchrun_env


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def gather(self, obj):
        """Every rank's ``obj``, in rank order (one element when not distributed)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_distributed(device_kind: str) -> Dist:
    """The process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)."""
    env = torchrun_env()
    rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    if world_size > 1 and not dist.is_initialized():
        use_nccl = device_kind != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return Dist(rank, world_size, local_rank)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """``model`` in DDP as every rank runs it: on a GPU one device per process (``device_ids``, output
    on it); on the CPU (gloo) the same call without them. Gradients are views of DDP's all-reduce
    buckets (no second copy of every gradient: less memory, one copy fewer per step)."""
    ids = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None
    )
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, output_device=ids[0] if ids else None, gradient_as_bucket_view=True
    )


def destroy_distributed() -> None:
    """Ends the process group, if one was started (entry points call it on the way out)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Data-parallel training on PyTorch's own engine: under ``torchrun`` the trainer joins the process group that
torchrun describes in the environment (NCCL on GPUs, gloo on CPUs) and wraps the model in DistributedDataParallel.
Outside torchrun every call here is a cheap no-op, so the loop has one code path."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process started the group, so it ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        backend_device = "cuda" if td.get_backend() == "nccl" else "cpu"
        out = t.to(backend_device)
        td.all_reduce(out)
        return out.cpu()

    def any(self, flag: bool) -> bool:
        """True on every process when any process raised the flag (a Ctrl-C seen by one stops all together)."""
        if self.world == 1:
            return flag
        return bool(self.sum(torch.tensor([1.0 if flag else 0.0]))[0] > 0)

    def gather(self, items: list) -> list:
        """Every process's ``items`` (picklable), concatenated in rank order, on every process."""
        if self.world == 1:
            return items
        parts: list = [None] * self.world
        td.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def barrier(self) -> None:
        if self.world > 1:
            td.barrier()

    def close(self) -> None:
        if self.owns_group and td.is_initialized():
            td.destroy_process_group()
            self.owns_group = False


def setup() -> Dist:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1), else a single-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        td.init_process_group(backend)
        owns = True
    return Dist(rank=td.get_rank(), world=td.get_world_size(), local_rank=local_rank, owns_group=owns)

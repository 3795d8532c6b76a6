"""`World`: this process's place in a torchrun job (rank, world size, device, process group)
with the collectives the trainer and the indexer need, on `fitclip_ext.distributed.all_gather`."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .distributed import all_gather


class World:
    """This process's place in a torchrun job (world 1 when not launched by torchrun)."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def gather(self, x: torch.Tensor, with_grad: bool) -> torch.Tensor:
        """All ranks' x concatenated in rank order; with_grad: gradients flow back to every rank."""
        if self.world == 1:
            return x
        return all_gather(x, self.rank, self.world, with_grad, keep_local_grad=False)

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def min(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MIN) if self.world > 1 else value

    def max(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MAX) if self.world > 1 else value

    def _reduce(self, value: int, op) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=op)
        return int(t.item())

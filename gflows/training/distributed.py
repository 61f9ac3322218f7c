"""Multi-process training through ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=N train.py ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; each
process then takes an equal slice of every global batch, DDP averages the gradients, and rank 0
alone logs and writes checkpoints. Backend: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Dist", "LogProb", "reseed_for_step", "setup", "wrap"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, x: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch."""
        if len(x) % self.world:
            raise ValueError(f"global batch {len(x)} does not split over {self.world} processes")
        n = len(x) // self.world
        return x[self.rank * n : (self.rank + 1) * n]

    def all_finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every rank (all skip a step together, or none does)."""
        ok = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (so that all ranks stop together)."""
        t = torch.tensor([float(flag)])
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(device: str = "cpu") -> Dist:
    """Join the process group that torchrun describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


class LogProb(nn.Module):
    """``forward(x) = flow.log_prob(x)``, so that DDP's gradient hooks see the training call."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor) -> Tensor:
        return self.flow.log_prob(x)


def wrap(flow: nn.Module, d: Dist, device: torch.device | None = None) -> nn.Module:
    """The module to call for the training loss: ``LogProb`` under DDP when ``d.world > 1``."""
    module = LogProb(flow)
    if d.world == 1:
        return module
    ids = [device.index] if device is not None and device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


def reseed_for_step(seed: int, step: int, d: Dist, local_numel: int) -> None:
    """Seed every rank alike for ``step``, then skip the noise the lower ranks draw for their slices,
    so that the dequantisation noise of each sample is the same for any number of processes."""
    torch.manual_seed(step_seed(seed, step))
    if d.rank:
        torch.rand(d.rank * local_numel)

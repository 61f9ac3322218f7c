"""Data parallelism through ``torchrun``, for every objective.

``torchrun --nproc_per_node=N train.py ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; each
process then computes the loss of an equal slice of every global batch, the engine averages the
gradients over the processes (so the step is the one-process step on the whole batch, up to
rounding), and rank 0 alone logs and writes checkpoints. Backend: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Dist", "device_of", "reseed_for_step", "setup", "step_seed"]


def device_of(name: str) -> torch.device:
    """``cpu`` or ``cuda``; under torchrun each process takes the GPU of its ``LOCAL_RANK``."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}: expected 'cpu' or 'cuda'")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group (``rank`` of ``world``); one process by default."""

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

    def gather(self, x: Tensor) -> Tensor:
        """The global batch from every rank's slice (the inverse of :meth:`shard`)."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def all_finite(self, values: Tensor) -> bool:
        """Whether ``values`` are finite on every rank (all skip a step together, or none does)."""
        ok = torch.isfinite(values.detach()).all().to(torch.float32).reshape(1)
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (so that all ranks stop together)."""
        t = torch.tensor([float(flag)])
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def max(self, value: float) -> float:
        """The largest ``value`` over the ranks (so that all ranks share one clock)."""
        t = torch.tensor([float(value)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def average_gradients(self, params: list[Tensor]) -> None:
        """Replace the gradient of every parameter in ``params`` by its mean over the ranks (one
        all-reduce of a flat buffer)."""
        if self.world == 1:
            return
        # every rank runs the same model, so the same parameters have gradients on each
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p))

    def broadcast(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        if self.world == 1:
            return
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)

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


def step_seed(seed: int, step: int) -> int:
    """The seed of training step ``step``: the same on every rank, and on resume."""
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


def reseed_for_step(seed: int, step: int, d: Dist, local_numel: int) -> None:
    """Seed every rank alike for ``step``, then skip the uniform noise the lower ranks draw for their
    slices, so that the dequantisation noise of each sample is the same for any number of processes."""
    torch.manual_seed(step_seed(seed, step))
    if d.rank:
        torch.rand(d.rank * local_numel)

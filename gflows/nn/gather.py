"""Weights shared by index: ``weights[index]`` with a backward pass that is cheap on CPU."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather"]


class _Gather(torch.autograd.Function):
    """``weights[index]`` as one ``index_select`` of the flat index (advanced indexing with a
    shaped index is slower on CPU: ``benchmarks/profile_image_step.py --gathers``), with the backward
    pass as one ``index_add_`` (autograd's accumulating ``index_put_`` costs several times more on
    CPU)."""

    @staticmethod
    def forward(ctx, weights: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.n = weights.shape[0]
        return weights.index_select(0, index.reshape(-1)).view(index.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.n).index_add_(0, index.reshape(-1), grad.reshape(-1)), None


def gather(weights: Tensor, index: Tensor) -> Tensor:
    """``weights[index]`` for a 1-D ``weights`` and an integer ``index`` of any shape: the tied
    entries of a filter or matrix from its free parameters (one per orbit), differentiable in
    ``weights``."""
    return _Gather.apply(weights, index)

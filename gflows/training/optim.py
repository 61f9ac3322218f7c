"""Adam's parameter groups: optionally the learning rate of each steerable filter's basis weights
scaled so that its filter moves per step as a plain convolution's does.

Adam moves every coordinate by about the learning rate per step, whatever its gradient's size, so
the step in *filter* space depends on the coordinates. escnn's basis filters are normalised over
whole orbits: for D4 on regular fields a unit step of every basis weight moves each filter entry by
about 0.4 (:meth:`~gflows.nn.equivariant.GConv2d.filter_step`), against 1 for a plain filter or the
orbit basis, and at one learning rate a D4 conditioner trains as if at 0.4x of it
(benchmarks/RESULTS.md, the lattice's "does D4 pay" section). ``equalise_filter_lr`` divides the
learning rate of those weights by their layer's ``filter_step``.
"""

from __future__ import annotations

import torch
from torch import nn

from gflows.nn.equivariant import GConv2d

__all__ = ["param_groups"]


def param_groups(model: nn.Module, equalise_filter_lr: bool = False) -> list[dict]:
    """Parameter groups of ``model`` for a ``torch.optim`` optimiser, each with an ``lr_multiple`` (the
    multiple of the scheduled learning rate that the trainer gives it).

    Args:
        model: any module.
        equalise_filter_lr: false: one group of all parameters at scale 1. True: the basis weights
            of each :class:`~gflows.nn.equivariant.GConv2d` in escnn's basis at ``1 / filter_step()``
            (layers of equal steps share a group), everything else at 1.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not equalise_filter_lr:
        return [{"params": params, "lr_multiple": 1.0}]
    scales: dict[int, float] = {}
    for m in model.modules():
        if isinstance(m, GConv2d) and m.basis == "escnn":
            scales[id(m.basis_weights)] = round(1.0 / m.filter_step(), 6)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault(scales.get(id(p), 1.0), []).append(p)
    return [{"params": ps, "lr_multiple": s} for s, ps in sorted(groups.items())]

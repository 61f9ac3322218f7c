r"""Plain-PyTorch copies of trained flows, for inference and for ``torch.export``.

:func:`export` deep-copies a flow (or transform) and replaces every equivariant convolution by a
:class:`PlainConv2d` holding its materialised filter: the orbit gather or escnn expansion, and for
the residual family the spectral normalisation :math:`W / \max(1, \sigma / c)` with the certified
:math:`\sigma`, are evaluated once. The copy computes the same maps, inverses and log-dets (it is the
same code minus the filter construction), has no escnn objects, and skips the layers' input checks
(shape, dtype, finiteness), whose data-dependent branches ``torch.export`` cannot trace. Its filters
are buffers: the copy is for inference, not training.

Coupling, autoregressive, butterfly, 1x1 and lattice flows pass ``torch.export`` in both directions
(:class:`Direction` names one for it). Residual blocks keep their log-det estimators and fixed-point
inverse, which differentiate and loop in Python: their copies run eagerly, but ``torch.export``
refuses them.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gflows.flow import Flow, Transform
from gflows.nn.equivariant import GConv2d, circular_pad

__all__ = ["Direction", "PlainConv2d", "export"]


class PlainConv2d(nn.Module):
    """A fixed convolution with the filter, bias, kernel size and padding of an equivariant one."""

    def __init__(self, weight: Tensor, bias: Tensor | None, padding_mode: str):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.padding_mode = padding_mode
        self.padding = weight.shape[-1] // 2

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode == "circular" and self.padding:
            return F.conv2d(circular_pad(x, self.padding), self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


def _plain(conv: GConv2d) -> PlainConv2d:
    with torch.no_grad():
        weight, bias = conv.normalised() if hasattr(conv, "normalised") else conv.expanded()
    return PlainConv2d(weight, bias, conv.padding_mode)


def export(flow: Flow | Transform) -> Flow | Transform:
    """A plain-PyTorch copy of ``flow`` for inference (see the module docstring).

    The copy is in evaluation mode; so that the spectral-norm bounds are the certified ones,
    ``flow`` is evaluated once in evaluation mode first.
    """
    original_mode = flow.training
    flow.eval()
    try:
        copied = copy.deepcopy(flow)
        convs = [(name, m) for name, m in copied.named_modules() if isinstance(m, GConv2d)]
        for name, conv in convs:
            parent_name, _, child = name.rpartition(".")
            parent = copied.get_submodule(parent_name) if parent_name else copied
            setattr(parent, child, _plain(conv))
    finally:
        flow.train(original_mode)
    for m in copied.modules():
        if hasattr(m, "checks"):
            m.checks = False
    return copied.eval()


class Direction(nn.Module):
    """One direction of a transform as a module whose ``forward`` is that direction, for
    ``torch.export`` (which exports ``forward``): ``Direction(t, inverse=True)(z) = t.inverse(z)``."""

    def __init__(self, transform: Transform, inverse: bool = False):
        super().__init__()
        self.transform, self.inverted = transform, bool(inverse)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x) if self.inverted else self.transform(x)

"""Adapters that let gflows layers live inside nflows and zuko flows.

Both libraries use the same direction as gflows (data -> noise), so the adapters only translate
the calling conventions: ``to_nflows(t)`` is an ``nflows.transforms.Transform`` and ``to_zuko(t)``
a ``zuko.lazy.LazyTransform`` whose ``torch.distributions.Transform`` acts on whole events
(``event_dim = len(t.event_shape)``) with ``log_abs_det_jacobian`` of shape ``[batch]``.
The wrapped layer's parameters are the adapter's parameters.
"""

from __future__ import annotations

import torch
from nflows.transforms.base import Transform as NflowsTransform
from torch import Tensor
from torch.distributions import constraints
from zuko.lazy import LazyTransform

from gflows.flow import Transform

__all__ = ["NflowsAdapter", "ZukoAdapter", "to_nflows", "to_zuko"]


class NflowsAdapter(NflowsTransform):
    """A gflows transform as an ``nflows.transforms.Transform``."""

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self, inputs: Tensor, context: Tensor | None = None):
        return self.transform(inputs, context)

    def inverse(self, inputs: Tensor, context: Tensor | None = None):
        return self.transform.inverse(inputs, context)


def to_nflows(transform: Transform) -> NflowsAdapter:
    """Wrap a gflows transform as an ``nflows.transforms.Transform``."""
    return NflowsAdapter(transform)


class _ZukoTransform(torch.distributions.Transform):
    """A ``torch.distributions.Transform`` view of a gflows transform, in one direction."""

    bijective = True

    def __init__(self, module: Transform, context: Tensor | None, inverse: bool = False):
        super().__init__(cache_size=0)
        self.module, self.context, self.inverted = module, context, inverse
        event_dim = len(module.event_shape)
        self.domain = constraints.independent(constraints.real, event_dim)
        self.codomain = constraints.independent(constraints.real, event_dim)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    @property
    def inv(self) -> _ZukoTransform:
        return _ZukoTransform(self.module, self.context, not self.inverted)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        fn = self.module.inverse if self.inverted else self.module.forward
        # Flatten any sample shape into the single batch axis gflows layers expect.
        event = len(self.module.event_shape)
        lead = x.shape[: x.dim() - event]
        y, ladj = fn(x.reshape(-1, *x.shape[x.dim() - event :]), self.context)
        return y.reshape(*lead, *y.shape[1:]), ladj.reshape(lead)

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inv.call_and_ladj(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]


class ZukoAdapter(LazyTransform):
    """A gflows transform as a ``zuko.lazy.LazyTransform``."""

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self, c: Tensor | None = None) -> torch.distributions.Transform:
        return _ZukoTransform(self.transform, c)


def to_zuko(transform: Transform) -> ZukoAdapter:
    """Wrap a gflows transform as a ``zuko.lazy.LazyTransform``."""
    return ZukoAdapter(transform)

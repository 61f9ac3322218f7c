r"""A map's derivative at a point, kept from its forward pass: :math:`J = \partial f / \partial x (x)`.

Layers that know their derivative (:class:`~gflows.nn.equivariant.GConv2d`,
:class:`~gflows.nn.equivariant.LipSwish`, and stacks of them, :class:`~gflows.nn.equivariant.GConvNet`)
give it from ``module.linearise(x)`` next to their output, as two maps:

* ``vjp(w) = J^T w``, without a graph: the adjoints of the layers in reverse order (a convolution's
  is a convolution, an activation's a product with its derivative at the input, kept from the forward
  pass). A residual block's log-det series applies it several times per forward pass; autograd's
  vector-Jacobian product recomputes each activation's derivative from several recorded operators
  in every call.
* ``jvp(t) = J t``, differentiable in ``x`` and in the parameters: ``u^T J v`` for fixed ``u`` and
  ``v`` is the Neumann-series surrogate of the log-det gradient. Its graph is the forward chain of
  the layers' linear maps, where autograd's ``u^T J`` would record a vector-Jacobian product
  (backward operators) and then differentiate it a second time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Linearised", "chain", "linearise"]


class Linearised(NamedTuple):
    """The Jacobian ``J`` of a map at one input, applied both ways (see the module docstring)."""

    #: ``w -> J^T w`` without a graph
    vjp: Callable[[Tensor], Tensor]
    #: ``t -> J t``, differentiable in the input and the parameters of the map
    jvp: Callable[[Tensor], Tensor]


def chain(parts: Sequence[Linearised]) -> Linearised:
    """The Jacobian of a composition ``f_n o ... o f_1`` from those of its layers, first layer first."""

    def vjp(w: Tensor) -> Tensor:
        with torch.no_grad():
            for part in reversed(parts):
                w = part.vjp(w)
        return w

    def jvp(t: Tensor) -> Tensor:
        for part in parts:
            t = part.jvp(t)
        return t

    return Linearised(vjp, jvp)


def linearise(module: nn.Module, x: Tensor) -> tuple[Tensor, Linearised | None]:
    """``module(x)`` and, where the module gives it (a ``linearisable`` attribute that is true), its
    Jacobian at ``x`` (``module.linearise(x)``); else ``None`` in its place."""
    if getattr(module, "linearisable", False):
        return module.linearise(x)
    return module(x), None

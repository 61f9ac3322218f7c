r"""A map's derivative at a point, kept from its forward pass: :math:`J = \partial f / \partial x (x)`.

Layers that know their derivative (:class:`~gflows.nn.equivariant.GConv2d`,
:class:`~gflows.nn.lipschitz.LipschitzLinear`, :class:`~gflows.nn.equivariant.LipSwish`,
:class:`~gflows.nn.equivariant.Tanh`, reshapes, and what is built of them:
:class:`~gflows.nn.equivariant.GConvNet`, :class:`Sequential`, group averages and the un-squeezed
grid) give it from ``module.linearise(x)`` next to their output, as two maps:

* ``vjp(w) = J^T w``, without a graph: the adjoints of the layers in reverse order (a convolution's
  is a convolution, an activation's a product with its derivative at the input, kept from the forward
  pass). A residual block's log-det series applies it several times per forward pass; autograd's
  vector-Jacobian product recomputes each activation's derivative from several recorded operators
  in every call.
* ``jvp(t) = J t``, differentiable in ``x`` and in the parameters: ``u^T J v`` for fixed ``u`` and
  ``v`` is the Neumann-series surrogate of the log-det gradient. Its graph is the forward chain of
  the layers' linear maps, where autograd's ``u^T J`` would record a vector-Jacobian product
  (backward operators) and then differentiate it a second time.

A Jacobian of a map that treats batch entries independently is block-diagonal over the batch; where
every layer can say so (``rows``), the blocks of a few entries are applied on their own, at the cost
of those entries only: a log-det series that probes a random part of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

__all__ = ["Linearised", "Sequential", "chain", "conjugated", "is_linearisable", "linear", "linearise",
           "linearise_layers"]

# reshapes of the entries: their Jacobian is a relabelling, applied by reshaping back and forth
_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)


class Linearised(NamedTuple):
    """The Jacobian ``J`` of a map at one input, applied both ways (see the module docstring)."""

    #: ``w -> J^T w`` without a graph
    vjp: Callable[[Tensor], Tensor]
    #: ``t -> J t``, differentiable in the input and the parameters of the map
    jvp: Callable[[Tensor], Tensor]
    #: ``index -> `` the Jacobian at the batch entries ``index`` only (a 1-D integer tensor, or a
    #: slice of consecutive entries), applied to vectors of that many entries; ``None`` where the
    #: map cannot restrict itself
    rows: Callable[[Tensor | slice], Linearised] | None = None


def linear(vjp: Callable[[Tensor], Tensor], jvp: Callable[[Tensor], Tensor]) -> Linearised:
    """The Jacobian of a map that is linear in each batch entry with the same matrix for every
    entry (a convolution, a dense layer, a reshape of the entries): its rows are itself."""
    jac = Linearised(vjp, jvp, lambda index: jac)
    return jac


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

    if any(part.rows is None for part in parts):
        return Linearised(vjp, jvp)
    return Linearised(vjp, jvp, lambda index: chain([part.rows(index) for part in parts]))


def conjugated(jac: Linearised, into: Callable[[Tensor], Tensor], out: Callable[[Tensor], Tensor],
               rows_of: Callable[[Tensor | slice], Tensor | slice] | None = None) -> Linearised:
    """The Jacobian ``out J into`` of a map run between two linear maps, where ``out`` is a multiple of
    ``into``'s transpose (a permutation and its inverse, or stacking copies and averaging them):
    its transpose ``into^T J^T out^T`` then has the same form, ``out J^T into``. ``rows_of``: the
    rows of ``J`` that batch entries ``index`` take (``into`` of ``len(index)`` entries gives them in
    that order); then the rows of the product are those of ``J`` between the same maps (once: the
    restricted product does not restrict itself again)."""
    rows = None
    if rows_of is not None and jac.rows is not None:
        def rows(index: Tensor | slice) -> Linearised:
            return conjugated(jac.rows(rows_of(index)), into, out)

    return Linearised(lambda w: out(jac.vjp(into(w))), lambda t: out(jac.jvp(into(t))), rows)


def is_linearisable(module: nn.Module) -> bool:
    """Whether :func:`linearise` takes ``module``'s Jacobian from its layers: it says so (a true
    ``linearisable`` attribute) or is a reshape, and no forward hook would be bypassed (``linearise``
    does not call ``forward``)."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        return False
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    return isinstance(module, _RESHAPES) or bool(getattr(module, "linearisable", False))


def linearise(module: nn.Module, x: Tensor) -> tuple[Tensor, Linearised | None]:
    """``module(x)`` and, where :func:`is_linearisable`, its Jacobian at ``x``; else ``None`` in its
    place."""
    if not is_linearisable(module):
        return module(x), None
    if isinstance(module, _RESHAPES):
        y = module(x)
        return y, linear(lambda w: w.reshape(-1, *x.shape[1:]), lambda t: t.reshape(-1, *y.shape[1:]))
    return module.linearise(x)


def linearise_layers(layers: Iterable[nn.Module], x: Tensor) -> tuple[Tensor, Linearised]:
    """``layers`` applied to ``x`` in order (with their graph) and the Jacobian of their composition;
    ``TypeError`` naming the first layer that cannot give its own."""
    parts = []
    for layer in layers:
        x, part = linearise(layer, x)
        if part is None:
            raise TypeError(f"layer {type(layer).__name__} cannot give its Jacobian")
        parts.append(part)
    return x, chain(parts)


class Sequential(nn.Sequential):
    """``torch.nn.Sequential`` that gives its Jacobian when every layer does (:func:`is_linearisable`);
    the same parameters and ``state_dict`` keys."""

    @property
    def linearisable(self) -> bool:
        return all(is_linearisable(layer) for layer in self)

    def linearise(self, x: Tensor) -> tuple[Tensor, Linearised]:
        """:meth:`forward` (with its graph) and its Jacobian at ``x``. Needs :attr:`linearisable`."""
        return linearise_layers(self, x)

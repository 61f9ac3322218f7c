"""Networks on squeezed tensors that are equivariant for the tensors' true representation
(:func:`~gflows.representations.squeezed_representation`): on the coarse grid where every element
maps the grid onto itself, else on the un-squeezed grid (:class:`AtFineGrid`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from gflows.groups import get_group
from gflows.nn.linearised import Linearised, conjugated, is_linearisable, linearise
from gflows.representations import squeeze, unsqueeze

__all__ = ["AtFineGrid", "squeezed_net"]


class AtFineGrid(nn.Module):
    """Run ``net`` on the un-squeezed (depth-to-space) input and squeeze its output(s) back.

    For a tensor squeezed ``levels`` times, ``net`` then sees scalar fields on the fine grid, where
    the group only moves pixels, so an equivariant ``net`` gives a map that is equivariant for the
    squeezed tensors' true representation. Squeezing permutes entries: Lipschitz constants are
    unchanged. A tuple output (for example a conditioner's ``(s, t)``) is squeezed entry by entry.
    """

    def __init__(self, net: nn.Module, levels: int):
        super().__init__()
        self.net, self.levels = net, int(levels)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = self.net(unsqueeze(x, self.levels))
        if isinstance(out, tuple):
            return tuple(squeeze(o, self.levels) for o in out)
        return squeeze(out, self.levels)

    @property
    def linearisable(self) -> bool:
        """Whether ``net`` gives its Jacobian (:func:`~gflows.nn.linearised.is_linearisable`)."""
        return is_linearisable(self.net)

    def linearise(self, x: Tensor) -> tuple[Tensor, Linearised]:
        """:meth:`forward` for a tensor-valued ``net``, and its Jacobian ``S J_net S^-1`` (``S``, the
        squeeze, is a permutation, so the transpose has the same form). Needs :attr:`linearisable`."""
        out, jac = linearise(self.net, unsqueeze(x, self.levels))
        if jac is None or not isinstance(out, Tensor):
            raise TypeError(f"{type(self.net).__name__} cannot give its Jacobian")
        return squeeze(out, self.levels), conjugated(jac, lambda t: unsqueeze(t, self.levels),
                                                     lambda t: squeeze(t, self.levels), rows_of=lambda i: i)


def squeezed_net(group, levels: int, make: Callable[[int], nn.Module]) -> nn.Module:
    """A network on a tensor squeezed ``levels`` times, equivariant for its true representation.

    ``make(L)`` builds the network for scalar fields squeezed ``L`` times. Where every element of
    ``group`` maps the grid onto itself it runs on the coarse grid, ``make(levels)`` (kernels for
    :func:`squeezed_representation`); otherwise ``make(0)`` runs on the un-squeezed grid inside
    :class:`AtFineGrid`.
    """
    if levels and not get_group(group).grid_exact:
        return AtFineGrid(make(0), levels)
    return make(levels)

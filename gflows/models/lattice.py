"""Flows for periodic lattice fields ``[1, L, L]``."""

from __future__ import annotations

from gflows.flow import Compose, Flow
from gflows.groups import Group
from gflows.transforms.coupling import GCoupling

__all__ = ["lattice_flow"]


def lattice_flow(L: int, n_layers: int = 8, hidden_fields: int = 4, group: str | Group = "d4",
                 sign_symmetric: bool = True, kernel_sizes=(3, 3, 3), scale_bound: float = 3.0) -> Flow:
    """Checkerboard affine couplings with circular padding and G-equivariant conditioners.

    Exact symmetries of every layer, hence of ``log q``: ``phi -> -phi`` (with ``sign_symmetric``),
    translations that keep the checkerboard (``di + dj`` even) and the elements of ``group`` that
    map the checkerboard onto itself (for :meth:`~gflows.groups.Group.act` on an even lattice: the
    half turn and the diagonal reflections; see :func:`~gflows.transforms.coupling.parity_preserving`).
    The standard-normal base has all of them.
    """
    layers = [
        GCoupling(group, (1, L, L), mask="checkerboard", parity=i % 2, sign_symmetric=sign_symmetric,
                  hidden_fields=hidden_fields, kernel_sizes=kernel_sizes, padding_mode="circular",
                  scale_bound=scale_bound)
        for i in range(n_layers)
    ]
    return Flow(Compose(layers))

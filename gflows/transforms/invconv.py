r"""G-equivariant invertible 1x1 convolution (Glow's channel mixing, Kingma & Dhariwal 2018).

Map:      ``y[:, :, i, j] = W x[:, :, i, j]`` at every pixel, ``W = I + A``.
Inverse:  ``x[:, :, i, j] = W^{-1} y[:, :, i, j]``.
Log-det:  ``H W log|det W|``.

Group action: a grid-exact element moves pixels, which any 1x1 convolution commutes with, and after
``L`` squeezes permutes the ``4^L`` sub-pixel channels of each field by ``pi_g``
(:func:`~gflows.representations.squeezed_representation`). ``W`` commutes with that permutation
representation exactly when each of its ``4^L x 4^L`` blocks is constant on the orbits of ``G`` on
pairs of sub-pixels, ``A[a, b] = A[pi_g(a), pi_g(b)]``; so ``A`` is parametrised by one weight per
orbit and pair of fields, which spans the whole commutant (dimension ``(1/|G|) sum_g fix(g)^2`` per
pair, Burnside). On unsqueezed scalar fields ``W`` is any matrix: Glow's 1x1 convolution, as for the
trivial group. ``A`` starts at zero (the identity); ``W`` is at most ``C x C`` with ``C = 3 * 4^L``
for images, so its determinant and inverse are computed directly (no LU parametrisation needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor, nn

from gflows.flow import Transform
from gflows.groups import Group, get_group
from gflows.nn.gather import gather
from gflows.representations import orbit_labels, permutation, squeezed_representation

__all__ = ["GInvConv1x1", "pair_orbits"]


@cache
def pair_orbits(group: Group, levels: int) -> Tensor:
    """``[n, n]`` index of the orbit of each pair of the ``n = 4^levels`` sub-pixels under ``group``
    (cached: callers must not modify it)."""
    n = 4**levels
    if not levels:
        return torch.zeros(1, 1, dtype=torch.long)

    rep = squeezed_representation(group, levels)
    ids = torch.arange(n * n).view(n, n)
    maps = []
    for g in group.elements:
        p = permutation(rep, group.escnn_element(g))
        maps.append(ids[p][:, p].reshape(-1))  # pair (a, b) -> (p[a], p[b])
    return orbit_labels(maps, n * n).view(n, n)


class GInvConv1x1(Transform):
    """Invertible 1x1 convolution commuting with ``group`` (see the module docstring).

    Args:
        group: symmetry group; after a squeeze only subgroups of D4 (grid-exact groups).
        event_shape: ``(C, H, W)``; ``C`` a multiple of ``4^squeeze_levels``.
        squeeze_levels: how many times the input has been squeezed.
    """

    def __init__(self, group: str | Group, event_shape: Sequence[int], squeeze_levels: int = 0):
        super().__init__()
        self.group = get_group(group)
        if len(event_shape) != 3:
            raise ValueError(f"event_shape must be (C, H, W), got {tuple(event_shape)}")
        self.event_shape = tuple(int(s) for s in event_shape)
        self.group.check_grid(*self.event_shape[1:], "GInvConv1x1")
        c, self.field_size = self.event_shape[0], 4**squeeze_levels
        if c % self.field_size:
            raise ValueError(f"{c} channels are not whole fields of {self.field_size} squeezed sub-pixels")
        self.fields = c // self.field_size
        orbit = pair_orbits(self.group, int(squeeze_levels))
        self.register_buffer("orbit", orbit.clone(), persistent=False)
        self.weights = nn.Parameter(torch.zeros(self.fields, self.fields, int(orbit.max()) + 1))
        self._register_index()

    def _register_index(self) -> None:
        # A[(f, a), (g, b)] = weights[f, g, orbit[a, b]], as one flat index into the weights
        fields, orbits, n = self.fields, self.weights.shape[2], self.field_size
        f = torch.arange(fields, device=self.orbit.device).view(fields, 1, 1, 1)
        g = torch.arange(fields, device=self.orbit.device).view(1, 1, fields, 1)
        index = (f * fields + g) * orbits + self.orbit.view(1, n, 1, n)
        c = self.event_shape[0]
        self.register_buffer("_index", index.reshape(c, c), persistent=False)

    def __setstate__(self, state: dict) -> None:
        # layers pickled before the matrix was one gather
        super().__setstate__(state)
        if "_index" not in self._buffers:
            self._register_index()

    def weight(self) -> Tensor:
        """The matrix ``W = I + A`` (``[C, C]``)."""
        a = gather(self.weights.reshape(-1), self._index)
        return torch.eye(a.shape[0], dtype=a.dtype, device=a.device) + a

    def _mix(self, m, x: Tensor, sign: float) -> tuple[Tensor, Tensor]:
        w = self.weight()
        h, wd = self.event_shape[1:]
        ld = sign * h * wd * torch.linalg.slogdet(w).logabsdet
        return torch.einsum("ij,bjhw->bihw", m(w), x), ld.expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        return self._mix(lambda w: w, x, 1.0)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z, "inverse input")
        return self._mix(torch.linalg.inv, z, -1.0)

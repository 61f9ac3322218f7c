r"""A learned circulant Gaussian layer for periodic lattices: one scale per lattice-momentum orbit.

:class:`MomentumScale` rescales each Fourier mode :math:`\hat x(k) = \sum_x e^{-2\pi i k\cdot x/L}
x_x` of a field on the periodic ``L x L`` lattice by :math:`e^{-s(k)}`.

* Map: :math:`z = \mathcal F^{-1}\big[e^{-s(k)} \hat x(k)\big]`, a circular convolution with a
  real symmetric kernel (:math:`s(k) = s(-k)`, so ``z`` is real).
* Inverse: :math:`x = \mathcal F^{-1}\big[e^{s(k)} \hat z(k)\big]`.
* Log-det: :math:`\log|\det \partial z/\partial x| = -C \sum_k s(k)` over the :math:`L^2` momenta
  (the map is diagonal in the unitary Fourier basis with eigenvalues :math:`e^{-s(k)}`), ``C`` the
  channels.

On the sampling side it turns the standard normal base into a Gaussian with any translation- and
D4-invariant two-point function (the free field's :math:`1/(\hat p^2 + m^2)` among them), as the
Gaussian prior of lattice flow samplers does (Albergo et al. 2019; Del Debbio et al. 2021 learn such
a layer), leaving the couplings only the non-Gaussian part.

Symmetries: every circulant map commutes with *all* lattice translations (odd ones too, unlike
checkerboard couplings); ``s`` is shared over each orbit of ``k`` under the lattice rotations and
reflections (``k -> (k_2, k_1)``, ``k_1 -> -k_1``, ...), so the map commutes with D4 about any
site; being linear, it commutes with :math:`x \to -x`. That is the whole symmetry group of the
:math:`\phi^4` action.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gflows.flow import Transform

__all__ = ["MomentumScale", "momentum_orbits"]


def momentum_orbits(L: int) -> Tensor:
    """``[L, L]`` orbit index of each momentum ``(k_1, k_2)`` under the lattice rotations and
    reflections (which include ``k -> -k``): orbits are labelled by the sorted pair
    ``min(k_i, L - k_i)``, numbered in lexicographic order."""
    k = torch.arange(L)
    folded = torch.minimum(k, L - k)
    a, b = torch.meshgrid(folded, folded, indexing="ij")
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    key = lo * (L + 1) + hi
    return torch.unique(key, return_inverse=True)[1]


class MomentumScale(Transform):
    """One learned scale per D4 orbit of lattice momenta (see the module docstring).

    Args:
        event_shape: ``(C, L, L)``; the channels share the scales.
    """

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        if len(self.event_shape) != 3 or self.event_shape[1] != self.event_shape[2]:
            raise ValueError(f"MomentumScale needs an event (C, L, L) on a square lattice, "
                             f"got {self.event_shape}")
        orbits = momentum_orbits(self.event_shape[1])
        self.register_buffer("orbits", orbits, persistent=False)
        self.log_scale = nn.Parameter(torch.zeros(int(orbits.max()) + 1))  # zero: the identity

    def _scale(self, x: Tensor, sign: float) -> tuple[Tensor, Tensor]:
        s = self.log_scale[self.orbits]
        y = torch.fft.ifft2(torch.fft.fft2(x) * torch.exp(sign * s)).real
        return y, (sign * self.event_shape[0] * s.sum()).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        return self._scale(x, -1.0)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        return self._scale(z, 1.0)

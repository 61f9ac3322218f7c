r"""A learned odd map of a field's zero mode (its mean), for bimodal lattice distributions.

Map:      with :math:`m = \frac1V \sum_x x_x` (the mean over all ``V`` entries of the event),
          :math:`y = x + (f(m) - m)\,\mathbf 1`, i.e. the mean becomes :math:`f(m)` and every
          fluctuation about it is kept.
Inverse:  :math:`m = f^{-1}(\bar y)`, :math:`x = y + (m - \bar y)\,\mathbf 1`.
Log-det:  :math:`\log f'(m)`: the Jacobian :math:`I + (f'(m) - 1)\,\mathbf 1 \mathbf 1^\top / V` has
          eigenvalue :math:`f'(m)` on :math:`\mathbf 1` and 1 on its complement.

:math:`f` is a monotonic rational-quadratic spline (Durkan et al. 2019, via zuko) on
``[-bound, bound]`` (identity outside) whose bins, heights and knot slopes are mirrored about 0, so
:math:`f` is odd. The mean is invariant under every permutation of the entries, so the layer
commutes with all lattice translations, rotations and reflections, and, ``f`` being odd, with
:math:`x \to -x`. Local couplings struggle to split a Gaussian's zero mode into the two peaks of
a theory near its broken phase; this layer does it in one scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gflows.flow import Transform

__all__ = ["OddZeroModeSpline"]


class OddZeroModeSpline(Transform):
    """Odd monotonic spline of the mean of the event (see the module docstring).

    Args:
        event_shape: e.g. ``(1, L, L)``.
        bins: spline bins on each side of 0.
        bound: the spline acts on ``[-bound, bound]``.
    """

    def __init__(self, event_shape: Sequence[int], bins: int = 8, bound: float = 1.0):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.bound = float(bound)
        # Zero parameters: equal bins and unit slopes, the identity.
        self.widths = nn.Parameter(torch.zeros(bins))
        self.heights = nn.Parameter(torch.zeros(bins))
        self.slopes = nn.Parameter(torch.zeros(bins))  # the knot at 0 and the bins - 1 on each side

    def spline(self):
        from zuko.transforms import MonotonicRQSTransform

        w, h, d = self.widths, self.heights, self.slopes
        return MonotonicRQSTransform(
            torch.cat([w.flip(0), w]), torch.cat([h.flip(0), h]),
            torch.cat([d[1:].flip(0), d[:1], d[1:]]), bound=self.bound,
        )

    def _mean(self, x: Tensor) -> Tensor:
        return x.flatten(1).mean(1)

    def _shift(self, x: Tensor, delta: Tensor) -> Tensor:
        return x + delta.view(-1, *([1] * (x.dim() - 1)))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        m = self._mean(x)
        fm, ladj = self.spline().call_and_ladj(m)
        return self._shift(x, fm - m), ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        spline = self.spline()
        mz = self._mean(z)
        m = spline.inv(mz)
        _, ladj = spline.call_and_ladj(m)
        return self._shift(z, m - mz), -ladj

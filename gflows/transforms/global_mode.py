r"""Learned odd monotonic splines for lattice fields: of a field's zero mode, or of every site.

Both use one monotonic rational-quadratic spline :math:`f` (Durkan et al. 2019;
:class:`~gflows.transforms.spline.RQSpline`) on ``[-bound, bound]`` (identity outside) whose bins,
heights and knot slopes are mirrored about 0, so :math:`f` is odd; zero parameters give the identity.

:class:`OddZeroModeSpline` maps the mean :math:`m = \frac1V \sum_x x_x` of the event.

* Map: :math:`y = x + (f(m) - m)\,\mathbf 1` (the mean becomes :math:`f(m)`, every fluctuation
  about it is kept).
* Inverse: :math:`m = f^{-1}(\bar y)`, :math:`x = y + (m - \bar y)\,\mathbf 1`.
* Log-det: :math:`\log f'(m)`; the Jacobian :math:`I + (f'(m) - 1)\,\mathbf 1 \mathbf 1^\top / V`
  has eigenvalue :math:`f'(m)` on :math:`\mathbf 1` and 1 on its complement.

Local couplings struggle to split a Gaussian's zero mode into the two peaks of a theory near its
broken phase; this layer does it in one scalar.

:class:`OddSiteSpline` maps every entry by the same :math:`f`.

* Map: :math:`y_x = f(x_x)`; inverse :math:`x_x = f^{-1}(y_x)`; log-det
  :math:`\sum_x \log f'(x_x)`.

It turns a Gaussian marginal into the non-Gaussian one of a quartic on-site potential (at the
lattice review's point ``m2 = -4`` the on-site term is a pure :math:`\lambda\phi^4`), which affine
couplings can only approximate through conditional shifts.

Symmetries: the mean is invariant, and the site-wise map equivariant, under every permutation of
the entries, so both layers commute with all lattice translations, rotations and reflections, and,
:math:`f` being odd, with :math:`x \to -x`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gflows.flow import Transform
from gflows.transforms.spline import RQSpline

__all__ = ["OddSiteSpline", "OddZeroModeSpline"]


class _OddSpline(Transform):
    def __init__(self, event_shape: Sequence[int], bins: int, bound: float):
        super().__init__()
        if bins < 1 or bound <= 0:
            raise ValueError(f"need bins >= 1 and bound > 0, got bins={bins}, bound={bound}")
        self.event_shape = tuple(int(s) for s in event_shape)
        self.bound = float(bound)
        # Zero parameters: equal bins and unit slopes, the identity.
        self.widths = nn.Parameter(torch.zeros(bins))
        self.heights = nn.Parameter(torch.zeros(bins))
        self.slopes = nn.Parameter(torch.zeros(bins))  # the knot at 0 and the bins - 1 on each side

    def spline(self) -> RQSpline:
        w, h, d = self.widths, self.heights, self.slopes
        return RQSpline(
            torch.cat([w.flip(0), w]), torch.cat([h.flip(0), h]),
            torch.cat([d[1:].flip(0), d[:1], d[1:]]), bound=self.bound,
        )


class OddZeroModeSpline(_OddSpline):
    """Odd monotonic spline of the mean of the event (see the module docstring).

    Args:
        event_shape: e.g. ``(1, L, L)``.
        bins: spline bins on each side of 0.
        bound: the spline acts on ``[-bound, bound]``.
    """

    def __init__(self, event_shape: Sequence[int], bins: int = 8, bound: float = 1.0):
        super().__init__(event_shape, bins, bound)

    def _shift(self, x: Tensor, delta: Tensor) -> Tensor:
        return x + delta.view(-1, *([1] * (x.dim() - 1)))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        m = x.flatten(1).mean(1)
        fm, ladj = self.spline()(m)
        return self._shift(x, fm - m), ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        spline = self.spline()
        mz = z.flatten(1).mean(1)
        m = spline.inverse(mz)
        _, ladj = spline(m)
        return self._shift(z, m - mz), -ladj


class OddSiteSpline(_OddSpline):
    """The same odd monotonic spline on every entry (see the module docstring).

    Args:
        event_shape: e.g. ``(1, L, L)``.
        bins: spline bins on each side of 0.
        bound: the spline acts on ``[-bound, bound]``.
    """

    def __init__(self, event_shape: Sequence[int], bins: int = 8, bound: float = 3.0):
        super().__init__(event_shape, bins, bound)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        y, ladj = self.spline()(x)
        return y, ladj.flatten(1).sum(1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        spline = self.spline()
        x = spline.inverse(z)
        _, ladj = spline(x)
        return x, -ladj.flatten(1).sum(1)

r"""Monotonic rational-quadratic splines (Durkan et al. 2019, Neural Spline Flows; Gregory and
Delbourgo 1982), numerically safe for any parameter values.

Map: on ``[-B, B]``, ``K`` bins with knots :math:`(x_k, y_k)` and knot derivatives :math:`d_k`; in
bin ``k``, with :math:`\xi = (x - x_k) / w_k` and :math:`s_k = h_k / w_k`,

.. math:: y = y_k + h_k \frac{s_k \xi^2 + d_k \xi (1 - \xi)}{s_k + (d_k + d_{k+1} - 2 s_k)\xi(1 - \xi)},

the identity outside (``d = 1`` at both ends, so the map is :math:`C^1`).
Inverse: the root in :math:`[0, 1]` of the quadratic :math:`a\xi^2 + b\xi + c = 0` that the map gives
for :math:`r = (y - y_k) / h_k`, in the form :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})`, which does not
cancel (Durkan et al. 2019, appendix). Log-det: :math:`\log dy/dx` of the formula above, entry-wise.

Conditioning. Reconstruction in finite precision is limited by the smallest slope of the map
(an error :math:`\epsilon |y|` in ``y`` becomes :math:`\epsilon |y| / \min f'` in ``x``), and inside a
bin the slope can fall far below :math:`s_k` when the knot derivatives are large (about
:math:`s_k^2 / d_k`). So the
parameters are bounded where they enter, not only floored: every bin's slope :math:`s_k` and every
knot derivative lie in :math:`[e^{-2A}, e^{2A}]` (``A = log_slope_bound``), widths are at least
``min_width`` of the range, the knots are found by a search clamped to valid bins (an entry on a knot
or rounded across it lands in a neighbouring bin, where :math:`\xi` is clamped to ``[0, 1]``), and
with slopes and derivatives in :math:`[a, 1/a]`, :math:`a = e^{-2A}`, the smallest slope of the map is
about :math:`1.72 a^3` (at :math:`s = a, d_k = 1/a, d_{k+1} = a`, found by a search over that box).
With the default ``A = 1.15`` every slope is above :math:`1.7 \cdot 10^{-3}`, so float32 round trips
hold to about ``1e-5`` relative.
Zero parameters give the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RQSpline"]


class RQSpline:
    """A batch of monotonic rational-quadratic splines on ``[-bound, bound]``, identity outside.

    Args:
        widths: unconstrained bin widths ``[..., K]`` (softmax, at least ``min_width`` each).
        heights: unconstrained bin log-slopes ``[..., K]`` (bounded, then normalised to the range).
        derivatives: unconstrained interior knot log-derivatives ``[..., K - 1]`` (bounded).
        bound: the range ``B``.
        log_slope_bound: ``A``: bin slopes and knot derivatives lie in ``[e^{-2A}, e^{2A}]``.
        min_width: smallest bin width as a fraction of the range.
    """

    def __init__(self, widths: Tensor, heights: Tensor, derivatives: Tensor, bound: float = 3.0,
                 log_slope_bound: float = 1.15, min_width: float = 1e-3):
        k = widths.shape[-1]
        if heights.shape[-1] != k or derivatives.shape[-1] != k - 1:
            raise ValueError(f"a spline of {k} bins needs {k} widths, {k} heights and {k - 1} derivatives, "
                             f"got {widths.shape[-1]}, {heights.shape[-1]}, {derivatives.shape[-1]}")
        a = float(log_slope_bound)
        w = min_width + (1 - k * min_width) * F.softmax(widths, -1)
        log_s = a * torch.tanh(heights / a)
        h = w * torch.exp(log_s)
        h = h / h.sum(-1, keepdim=True)  # total within [e^-A, e^A]: slopes within [e^-2A, e^2A]
        d = torch.exp(2 * a * torch.tanh(derivatives / (2 * a)))
        self.bound, self.bins = float(bound), k
        two_b = 2 * self.bound
        self.x = F.pad(torch.cumsum(w, -1), (1, 0)) * two_b - self.bound
        self.y = F.pad(torch.cumsum(h, -1), (1, 0)) * two_b - self.bound
        self.x[..., -1], self.y[..., -1] = self.bound, self.bound  # exact end knots despite rounding
        self.w, self.h = w * two_b, h * two_b
        self.d = F.pad(d, (1, 1), value=1.0)

    def _bin(self, knots: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        inside = (v > -self.bound) & (v < self.bound)
        k = torch.searchsorted(knots.expand(*v.shape, -1).contiguous(), v[..., None].contiguous())
        k = (k.squeeze(-1) - 1)
        k = k.clamp(0, self.bins - 1)

        def at(t: Tensor, i: Tensor) -> Tensor:
            return t.expand(*v.shape, -1).gather(-1, i[..., None]).squeeze(-1)

        return (inside, at(self.x[..., :-1], k), at(self.y[..., :-1], k), at(self.w, k), at(self.h, k),
                at(self.d[..., :-1], k), at(self.d[..., 1:], k))

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(x), log f'(x))``, entry-wise."""
        inside, x0, y0, w, h, d0, d1 = self._bin(self.x, x)
        s = h / w
        xi = ((x - x0) / w).clamp(0, 1)
        om = xi * (1 - xi)
        denom = s + (d0 + d1 - 2 * s) * om
        y = y0 + h * (s * xi**2 + d0 * om) / denom
        numerator = d1 * xi**2 + 2 * s * om + d0 * (1 - xi) ** 2
        ladj = 2 * torch.log(s) + torch.log(numerator) - 2 * torch.log(denom)
        return torch.where(inside, y, x), torch.where(inside, ladj, torch.zeros_like(ladj))

    def inverse(self, y: Tensor) -> Tensor:
        """``f^{-1}(y)``, entry-wise."""
        inside, x0, y0, w, h, d0, d1 = self._bin(self.y, y)
        s = h / w
        r = ((y - y0) / h).clamp(0, 1)  # the position in the bin's height, in [0, 1]
        # y - y0 = h (s xi^2 + d0 xi (1 - xi)) / (s + (d0 + d1 - 2 s) xi (1 - xi)), as a xi^2 + b xi + c = 0
        a = s - d0 + r * (d0 + d1 - 2 * s)
        b = d0 - r * (d0 + d1 - 2 * s)
        c = -s * r
        disc = (b * b - 4 * a * c).clamp_min(0)
        # c <= 0 < s and a + b + c = 0 (xi = 1 at r = 1): the root in [0, 1] without cancellation
        xi = (2 * -c / (b + torch.sqrt(disc))).clamp(0, 1)
        return torch.where(inside, x0 + w * xi, y)

    @staticmethod
    def n_parameters(bins: int) -> int:
        """Parameters per entry: ``K`` widths, ``K`` heights, ``K - 1`` derivatives."""
        return 3 * bins - 1


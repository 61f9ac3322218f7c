r"""Invertible butterfly linear layers (Dao et al. 2019; Meng et al. 2022, Butterfly Flow).

A butterfly matrix on ``n = 2^m`` coordinates is a product of ``m`` factors. Factor ``k``
(``k = 1..m``) pairs index ``i`` with ``i + n / 2^k`` inside consecutive blocks of size
``n / 2^(k-1)`` and mixes each pair by its own 2x2 matrix ``[[a, b], [c, d]]``:

Map:      ``(y_i, y_j) = (a x_i + b x_j, c x_i + d x_j)`` for every pair, factor after factor
          (``B = B_m ... B_1``); O(n) work per factor, O(n log n) in all.
Inverse:  the closed-form 2x2 inverse ``[[d, -b], [-c, a]] / (ad - bc)``, factors in reverse order.
Log-det:  ``sum over factors and pairs of log|ad - bc|``, times the number of positions it is
          applied at (pixels, for channel mixing).

For ``n`` not a power of two the first ``2^floor(log2 n)`` coordinates are mixed and the rest are
left to an identity block.

Group action: the layer mixes the channel axis identically at every pixel, so it commutes with
any group action that only moves pixels, i.e. with every grid element acting on scalar channels.
It does not commute with actions that also permute channels (regular fields, or the sub-pixel
channels after a squeeze) unless the matrix commutes with that permutation, which a generic
butterfly matrix does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gflows.flow import Transform

__all__ = ["Butterfly"]


class Butterfly(Transform):
    """Butterfly mixing of the first axis of the event (channels of images, or a flat vector).

    Args:
        event_shape: ``(n,)`` for vectors or ``(C, H, W)`` for images (mixes ``C``).
        init: ``'identity'`` or ``'orthogonal'`` (random rotations in every 2x2 block).
    """

    def __init__(self, event_shape: Sequence[int], init: str = "orthogonal"):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        n = self.event_shape[0]
        if n < 1:
            raise ValueError(f"Butterfly needs at least one coordinate, got {n}")
        self.n = n
        self.m = int(math.floor(math.log2(n))) if n > 1 else 0
        self.n_mixed = 2**self.m if n > 1 else 0
        half = self.n_mixed // 2
        if init == "identity":
            abcd = torch.tensor([1.0, 0.0, 0.0, 1.0]).expand(self.m, half, 4).clone()
        elif init == "orthogonal":
            theta = 2 * math.pi * torch.rand(self.m, half)
            c, s = torch.cos(theta), torch.sin(theta)
            abcd = torch.stack([c, -s, s, c], -1)
        else:
            raise ValueError(f"unknown init {init!r}: expected 'identity' or 'orthogonal'")
        # One [a, b, c, d] per factor and pair: 2n parameters per factor.
        self.weight = nn.Parameter(abcd)

    def _rows(self, x: Tensor) -> Tensor:
        # Move the mixed axis last, flatten everything else into rows.
        return x.movedim(1, -1).reshape(-1, self.n)

    def _unrows(self, r: Tensor, like: Tensor) -> Tensor:
        shape = (like.shape[0], *like.shape[2:], self.n)
        return r.reshape(shape).movedim(-1, 1)

    def _logdet(self, batch: int, like: Tensor) -> Tensor:
        a, b, c, d = self.weight.unbind(-1)
        per_position = torch.log(torch.abs(a * d - b * c)).sum()
        return (per_position * math.prod(self.event_shape[1:])).expand(batch).to(like.dtype)

    def _coefficients(self, inverse: bool) -> Tensor:
        """``[m, 4, n/2]``: per factor, the rows ``a, b, c, d`` of every pair's 2x2 block."""
        a, b, c, d = self.weight.unbind(-1)
        if inverse:
            det = a * d - b * c
            a, b, c, d = d / det, -b / det, -c / det, a / det
        return torch.stack([a, b, c, d], 1)

    def _mix(self, r: Tensor, inverse: bool) -> Tensor:
        if self.m == 0:
            return r
        mixed, rest = r[:, : self.n_mixed], r[:, self.n_mixed :]
        coef = self._coefficients(inverse)
        for k in (range(self.m, 0, -1) if inverse else range(1, self.m + 1)):
            blocks, width = 2 ** (k - 1), self.n_mixed // 2**k
            a, b, c, d = coef[k - 1].view(4, blocks, width).unbind(0)
            v = mixed.view(r.shape[0], blocks, 2, width)
            x0, x1 = v[:, :, 0], v[:, :, 1]
            mixed = torch.stack([torch.addcmul(a * x0, b, x1), torch.addcmul(c * x0, d, x1)], 2)
            mixed = mixed.view(r.shape[0], -1)
        return torch.cat([mixed, rest], 1) if rest.shape[1] else mixed

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        return self._unrows(self._mix(self._rows(x), False), x), self._logdet(x.shape[0], x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        return self._unrows(self._mix(self._rows(z), True), z), -self._logdet(z.shape[0], z)

    def matrix(self) -> Tensor:
        """The dense ``n x n`` matrix ``B`` with ``forward(x) = B x`` (for tests and inspection)."""
        eye = torch.eye(self.n, dtype=self.weight.dtype, device=self.weight.device)
        return self._mix(eye, False).T

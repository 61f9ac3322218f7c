r"""Variational dequantisation (Ho et al. 2019, Flow++, section 3.1), with G-equivariant couplings.

Uniform dequantisation (:class:`~gflows.transforms.elementwise.Dequantize`) fits a density ``p`` to
``y = (x + u) / L``, ``u ~ U[0, 1)^D``, and ``-log p(y) + D log L`` bounds the code length of the
integer image ``x``. A learned noise density ``q(u | x)`` on the unit cube makes the bound tighter:

.. math:: \log P(x) \ge \mathbb{E}_{u \sim q(\cdot | x)}\big[\log p((x + u) / L) - D \log L
          - \log q(u | x)\big],

with equality when ``q(. | x)`` is ``p`` restricted to the bin of ``x``, so the model no longer has to
spread its density evenly over each bin. One sample ``u`` gives an unbiased estimate of the bound,
which is what ``log_prob`` returns (as Flow++ reports it).

Map:      ``y = (x + u) / L``, ``u = sigmoid(v)``, ``v = h(e; x)``: ``e`` standard logistic noise (drawn
          afresh each call), ``h`` a stack of affine :class:`~gflows.transforms.coupling.GCoupling`
          layers of ``e`` whose conditioners also see ``x`` scaled to ``[-1, 1]``.
Log-det:  what the layer returns is ``-D log L - log q(u | x)``, so that a flow's ``log_prob`` is the
          one-sample bound above, with ``log q(u | x) = log p_e(e) - log|det dh/de| - sum log
          sigmoid'(v)`` and ``log p_e(e) = sum log sigmoid'(e)``.
Inverse:  ``x = floor(L y)``, as for uniform dequantisation.

The couplings start at the identity (zero-initialised last layers), where ``u = sigmoid(e)`` is
uniform and ``log q = 0``: training starts from uniform dequantisation exactly.

Group action: the couplings use the mirrored checkerboard, which every element of D4 maps onto
itself, and G-equivariant conditioners on ``(e, x)`` together, so ``h(g e; g x) = g h(e; x)`` for the
group's grid elements acting on pixels; the logistic noise is i.i.d. So ``q(g u | g x) = q(u | x)``
and the bound's estimate at ``g x`` has the distribution it has at ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gflows.groups import Group, get_group
from gflows.representations import squeeze, unsqueeze
from gflows.transforms.coupling import GCoupling
from gflows.transforms.elementwise import Dequantize

__all__ = ["VariationalDequantize"]


def _log_sigmoid_slope(v: Tensor) -> Tensor:
    """``log sigmoid'(v) = log sigmoid(v) + log sigmoid(-v)``, entry-wise."""
    return F.logsigmoid(v) + F.logsigmoid(-v)


class VariationalDequantize(Dequantize):
    """Learned dequantisation noise ``q(u | x)`` for integer data in ``{0, ..., levels - 1}`` (see the
    module docstring).

    Args:
        group: symmetry group of the conditioners (grid elements act on pixels).
        event_shape: ``(C, H, W)``, at least ``3 x 3`` pixels before the squeezes (mirrored
            checkerboard).
        levels: number of integer levels ``L``.
        n_blocks: couplings of the noise, alternating the checkerboard's two sides.
        hidden_fields, kernel_sizes, activation, basis, scale_bound: of each coupling's conditioner
            (:class:`~gflows.transforms.coupling.GCoupling`).
        squeeze_levels: the couplings run on the noise and the image squeezed this many times
            (fewer pixels, more channels: cheaper convolutions; a squeeze is a permutation, so the
            density is the same function of the couplings).
    """

    def __init__(self, group: str | Group, event_shape: Sequence[int], levels: int = 256,
                 n_blocks: int = 4, hidden_fields: int = 4, kernel_sizes: Sequence[int] = (3, 1, 3),
                 activation: str = "silu", basis: str = "auto", scale_bound: float = 3.0,
                 squeeze_levels: int = 0):
        super().__init__(event_shape, levels)
        if len(self.event_shape) != 3:
            raise ValueError(f"VariationalDequantize needs event_shape (C, H, W), got {self.event_shape}")
        if n_blocks < 1:
            raise ValueError(f"VariationalDequantize needs n_blocks >= 1, got {n_blocks}")
        c, h, w = self.event_shape
        self.squeeze_levels = int(squeeze_levels)
        f = 2**self.squeeze_levels
        if self.squeeze_levels < 0 or h % f or w % f:
            raise ValueError(f"squeeze_levels={squeeze_levels} needs height and width divisible by {f}, "
                             f"got {h} x {w}")
        shape = (c * f * f, h // f, w // f)
        self.group = get_group(group)
        self.couplings = nn.ModuleList(
            GCoupling(self.group, shape, mask="mirrored", parity=i % 2, squeeze_levels=self.squeeze_levels,
                      context_channels=shape[0], hidden_fields=hidden_fields, kernel_sizes=kernel_sizes,
                      activation=activation, basis=basis, scale_bound=scale_bound)
            for i in range(n_blocks))

    def noise(self, x: Tensor) -> Tensor:
        """A draw of the standard logistic noise ``e`` for ``x`` (``logit`` of a uniform draw)."""
        u = torch.rand(x.shape, dtype=x.dtype, device=x.device)
        return torch.special.logit(u, eps=torch.finfo(x.dtype).eps)

    def noise_logits(self, x: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """``(v, log|det dh/de|)``: the couplings' map ``v = h(e; x)`` of the noise, before the sigmoid."""
        self.check_levels(x)
        context = x * (2 / (self.levels - 1)) - 1 if self.levels > 1 else torch.zeros_like(x)
        v, context = squeeze(e, self.squeeze_levels), squeeze(context, self.squeeze_levels)
        log_det = torch.zeros(e.shape[0], dtype=e.dtype, device=e.device)
        for coupling in self.couplings:
            v, ld = coupling(v, context)
            log_det = log_det + ld
        return unsqueeze(v, self.squeeze_levels), log_det

    def dequantize(self, x: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """``(u, log q(u | x))`` for the noise ``e`` (see the module docstring)."""
        v, log_det = self.noise_logits(x, e)
        log_q = _log_sigmoid_slope(e).flatten(1).sum(1) - log_det - _log_sigmoid_slope(v).flatten(1).sum(1)
        return torch.sigmoid(v), log_q

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        u, log_q = self.dequantize(x, self.noise(x))
        d = math.prod(self.event_shape)
        return (x + u) / self.levels, -d * math.log(self.levels) - log_q

r"""Elementwise layers: ActNorm, the logit transform and uniform dequantisation.

All three act on every pixel alike (ActNorm with one scale per field), so they commute with any
group action that permutes pixels, and with permutations inside a field when the field's channels
share their parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gflows.flow import Transform

__all__ = ["ActNorm", "Dequantize", "Logit"]


class ActNorm(Transform):
    r"""Per-field affine normalisation (Kingma and Dhariwal 2018, Glow).

    Map: :math:`y = (x + b_c) e^{s_c}`; inverse :math:`x = y e^{-s_c} - b_c`;
    log-det :math:`\sum_c n_c s_c` with :math:`n_c` the entries sharing field ``c``'s parameters.
    The first call in training mode sets :math:`b, s` so that the batch has zero mean and unit
    variance per field (data-dependent initialisation).

    Group action: pixel permutations commute with it; with ``field_size > 1`` consecutive channels
    (for example the four sub-pixels of a squeezed channel) share one ``(b, s)``, so it also
    commutes with permutations inside those fields.

    Args:
        event_shape: ``(C, ...)``; parameters are per channel, broadcast over the rest.
        field_size: consecutive channels sharing one scale and bias.
    """

    def __init__(self, event_shape: Sequence[int], field_size: int = 1):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        c = self.event_shape[0]
        if c % field_size:
            raise ValueError(f"{c} channels do not split into fields of {field_size}")
        self.field_size = field_size
        self.bias = nn.Parameter(torch.zeros(c // field_size))
        self.log_scale = nn.Parameter(torch.zeros(c // field_size))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def _fields(self, x: Tensor) -> Tensor:
        # [B, fields, field_size, ...]: one (b, s) per field broadcasts, with no repeated copy of them
        return x.view(x.shape[0], -1, self.field_size, *x.shape[2:])

    def _expand(self, p: Tensor) -> Tensor:
        return p.view(-1, *([1] * len(self.event_shape)))

    @torch.no_grad()
    def _initialise(self, x: Tensor) -> None:
        fields = x.transpose(0, 1).reshape(self.bias.shape[0], -1)
        self.bias.copy_(-fields.mean(1))
        self.log_scale.copy_(-torch.log(fields.std(1).clamp_min(1e-6)))
        self.initialised.fill_(True)

    def _logdet(self, x: Tensor) -> Tensor:
        per_entry = math.prod(self.event_shape[1:]) * self.field_size
        return (self.log_scale.sum() * per_entry).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        if self.training and not bool(self.initialised):
            self._initialise(x)
        y = (self._fields(x) + self._expand(self.bias)) * self._expand(torch.exp(self.log_scale))
        return y.reshape(x.shape), self._logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        x = self._fields(z) * self._expand(torch.exp(-self.log_scale)) - self._expand(self.bias)
        return x.reshape(z.shape), -self._logdet(z)


class Logit(Transform):
    r"""Logit transform of data in (0, 1) (Dinh et al. 2017, RealNVP).

    Map: :math:`y = \mathrm{logit}(s)`, :math:`s = \alpha + (1 - 2\alpha) x`;
    inverse :math:`x = (\sigma(y) - \alpha) / (1 - 2\alpha)`;
    log-det :math:`\sum [\log(1 - 2\alpha) - \log s - \log(1 - s)]`. Elementwise, so it commutes
    with every permutation of entries.
    """

    def __init__(self, event_shape: Sequence[int], alpha: float = 0.05):
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
        self.event_shape = tuple(int(s) for s in event_shape)
        self.alpha = float(alpha)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        if bool(((x < 0) | (x > 1)).any()):
            raise ValueError(
                f"Logit input must lie in [0, 1], got values in [{float(x.min()):.3g}, "
                f"{float(x.max()):.3g}]"
            )
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        ld = math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)
        return y, ld.reshape(x.shape[0], -1).sum(1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        s = torch.sigmoid(z)
        x = (s - self.alpha) / (1 - 2 * self.alpha)
        # log ds/dz = log s + log(1 - s) = -softplus(-z) - softplus(z).
        ld = -F.softplus(-z) - F.softplus(z) - math.log(1 - 2 * self.alpha)
        return x, ld.reshape(z.shape[0], -1).sum(1)


class Dequantize(Transform):
    r"""Uniform dequantisation of integer data in ``{0, ..., levels - 1}`` to ``[0, 1)``.

    Map: :math:`y = (x + u) / L`, :math:`u \sim U[0, 1)^D` (drawn afresh each call);
    inverse :math:`x = \lfloor L y \rfloor`; log-det :math:`-D \log L` (the scaling; the
    dequantisation noise makes ``-log_prob`` an upper bound on the discrete code length, and a
    model uniform on ``[0, 1)^D`` scores exactly ``log2(L)`` bits per dimension).
    Elementwise and i.i.d., so it commutes with every permutation of entries.
    """

    def __init__(self, event_shape: Sequence[int], levels: int = 256):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.levels = int(levels)

    def check_levels(self, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` holds integers in ``[0, levels - 1]``."""
        if bool(((x < 0) | (x > self.levels - 1) | (x != torch.round(x))).any()):
            raise ValueError(f"{type(self).__name__} input must hold integers in [0, {self.levels - 1}]")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        self.check_levels(x)
        # drawn contiguous: rand_like keeps a permuted input's strides, 9x slower to fill on the CPU
        y = (x + torch.rand(x.shape, dtype=x.dtype, device=x.device)) / self.levels
        d = math.prod(self.event_shape)
        return y, x.new_full((x.shape[0],), -d * math.log(self.levels))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        x = torch.floor(z * self.levels).clamp(0, self.levels - 1)
        d = math.prod(self.event_shape)
        return x, z.new_full((z.shape[0],), d * math.log(self.levels))

r"""G-inverse-autoregressive flows over channel blocks (Kingma et al. 2016, IAF).

The channels are cut into ``K`` consecutive blocks (fibres the group does not mix: scalar
channels, which every grid element only moves). With ``z`` the noise and ``x`` the data:

Map (data -> noise, ``forward``):  ``z_i = (x_i - t_i(z_<i)) * exp(-s_i(z_<i))``, block after
    block: *sequential*, ``K`` conditioner passes.
Inverse (noise -> data, ``inverse``):  ``x_i = z_i * exp(s_i(z_<i)) + t_i(z_<i)``: every
    conditioner sees only noise, so all blocks are computed in *one parallel pass*. Sampling and
    ``Flow.sample_and_log_prob`` take this fast direction, which is what reverse-KL training needs.
Log-det:  exact, the Jacobian is block triangular with diagonal blocks ``diag(exp(s_i))``:
    ``log|det dx/dz| = sum_i sum s_i(z_<i)``; ``forward`` returns minus that.

Each ``(s_i, t_i)`` comes from a G-equivariant :class:`~gflows.transforms.conditioner.Conditioner` on the
concatenated blocks ``z_<i``; block 0 has a learned per-channel constant shift and log-scale
(constants per channel commute with pixel permutations; with ``sign_symmetric`` the shift is
dropped). The layer commutes with every grid element of the group, and with ``x -> -x`` when
``sign_symmetric``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gflows.flow import Transform
from gflows.groups import Group, get_group
from gflows.transforms.conditioner import Conditioner

__all__ = ["GIAF"]


class GIAF(Transform):
    """G-equivariant inverse-autoregressive flow over ``n_blocks`` channel blocks.

    Args:
        group: symmetry group.
        event_shape: ``(C, H, W)``, ``C >= n_blocks``.
        n_blocks: number of channel blocks ``K``.
        sign_symmetric, scale_bound, hidden_fields, kernel_sizes, padding_mode, basis, relax, relax_to: see
            :class:`~gflows.transforms.conditioner.Conditioner` (``'odd'`` conditioners use ``tanh``,
            the others LipSwish).
    """

    def __init__(
        self,
        group: str | Group,
        event_shape: Sequence[int],
        n_blocks: int = 2,
        sign_symmetric: bool | str = False,
        scale_bound: float = 3.0,
        hidden_fields: int = 8,
        kernel_sizes: Sequence[int] = (3, 3, 3),
        padding_mode: str = "zeros",
        basis: str = "auto",
        relax: float = 0.0,
        relax_to: str | Group | None = None,
    ):
        super().__init__()
        self.group = get_group(group)
        self.event_shape = tuple(int(s) for s in event_shape)
        if len(self.event_shape) != 3:
            raise ValueError(f"event_shape must be (C, H, W), got {self.event_shape}")
        self.group.check_grid(*self.event_shape[1:], "GIAF")
        c = self.event_shape[0]
        if not 2 <= n_blocks <= c:
            raise ValueError(f"n_blocks must lie in [2, {c}] for {c} channels, got {n_blocks}")
        bounds = [round(i * c / n_blocks) for i in range(n_blocks + 1)]
        self.bounds = bounds
        self.sign_symmetric = sign_symmetric
        self.scale_bound = float(scale_bound)
        n0 = bounds[1]
        self.s0 = nn.Parameter(torch.zeros(n0))
        self.t0 = nn.Parameter(torch.zeros(n0)) if not sign_symmetric else None
        self.conditioners = nn.ModuleList(
            Conditioner(self.group, bounds[i], bounds[i + 1] - bounds[i], hidden_fields,
                        kernel_sizes, padding_mode, True, sign_symmetric, scale_bound, basis=basis,
                        relax=relax, relax_to=relax_to,
                        activation="tanh" if sign_symmetric == "odd" else "lipswish")
            for i in range(1, n_blocks)
        )

    def _block0(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1, *([1] * (like.dim() - 2)))
        s = self.scale_bound * torch.tanh(self.s0 / self.scale_bound)
        s = s.view(shape).expand_as(like)
        t = self.t0.view(shape).expand_as(like) if self.t0 is not None else torch.zeros_like(like)
        return s, t

    def _params(self, i: int, z_prev: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        return self._block0(like) if i == 0 else self.conditioners[i - 1](z_prev)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data in one parallel pass."""
        self.check(z)
        b = self.bounds
        xs, logdet = [], z.new_zeros(z.shape[0])
        for i in range(len(b) - 1):
            zi = z[:, b[i] : b[i + 1]]
            s, t = self._params(i, z[:, : b[i]], zi)
            xs.append(zi * torch.exp(s) + t)
            logdet = logdet + s.flatten(1).sum(1)
        return torch.cat(xs, 1), logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise, sequential over the blocks."""
        self.check(x)
        b = self.bounds
        zs: list[Tensor] = []
        logdet = x.new_zeros(x.shape[0])
        for i in range(len(b) - 1):
            xi = x[:, b[i] : b[i + 1]]
            s, t = self._params(i, torch.cat(zs, 1) if zs else x[:, :0], xi)
            zs.append((xi - t) * torch.exp(-s))
            logdet = logdet - s.flatten(1).sum(1)
        return torch.cat(zs, 1), logdet

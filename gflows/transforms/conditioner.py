"""The conditioners of coupling and autoregressive layers: G-equivariant networks from the
conditioning channels to the parameters of the element-wise maps.

Their outputs are scalar fields (one per entry and parameter, squeezed like the input), so a
conditioner commutes with the group when its network does (:class:`~gflows.nn.equivariant.GConvNet`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gflows.groups import Group
from gflows.nn.equivariant import GConv2d, GConvNet, LipSwish, Tanh

__all__ = ["ACTIVATIONS", "SIGN_MODES", "Conditioner", "conditioner_net"]

#: the ways a conditioner can commute with ``x -> -x`` (``False``: it need not)
SIGN_MODES = (False, True, "average", "odd")


ACTIVATIONS = {
    "lipswish": LipSwish,
    "leaky_relu": lambda n_fields, field_size: nn.LeakyReLU(),
    # x sigmoid(x): LipSwish with its slope fixed at 1, one fused pass each way
    "silu": lambda n_fields, field_size: nn.SiLU(),
    "tanh": lambda n_fields, field_size: Tanh(),
}


def conditioner_net(group: str | Group, n_in: int, n_out: int, hidden_fields: int = 8,
                    kernel_sizes: Sequence[int] = (3, 3, 3), padding_mode: str = "zeros",
                    activation: str = "lipswish", zero_init: bool = True,
                    squeeze_levels: int = 0, basis: str = "auto", relax: float = 0.0,
                    bias: bool = True, relax_to: str | Group | None = None) -> GConvNet:
    """The conditioners' network: ``n_in -> n_out`` channels of scalar fields (squeezed
    ``squeeze_levels`` times) through regular hidden fields, with ``activation`` between layers and,
    with ``zero_init``, a last convolution starting at zero; ``basis``, ``relax`` and ``relax_to``
    (relaxed equivariance) and ``bias`` of the :class:`~gflows.nn.equivariant.GConv2d` convolutions."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {sorted(ACTIVATIONS)}")
    net = GConvNet(group, n_in, n_out, hidden_fields, kernel_sizes, padding_mode,
                   activation=ACTIVATIONS[activation], squeeze_levels=squeeze_levels, bias=bias,
                   conv_kwargs={"basis": basis, "relax": relax, "relax_to": relax_to})
    if zero_init:
        net.layers[-1].zero_()
    return net


class Conditioner(nn.Module):
    """Equivariant map from ``a`` channels to ``(s, t)`` for ``n_out`` channels.

    Args:
        group: symmetry group.
        n_in, n_out: channels in and out (per ``s`` and per ``t``).
        hidden_fields, kernel_sizes, padding_mode: of the :class:`~gflows.nn.equivariant.GConvNet`.
        affine: also produce a log-scale ``s`` (else ``s = 0``).
        sign_symmetric: even ``s`` and odd ``t``, so that the coupling commutes with ``x -> -x``.
            ``True`` or ``'average'``: symmetrise any network over ``{x, -x}``,
            ``s = (n_s(x) + n_s(-x)) / 2``, ``t = (n_t(x) - n_t(-x)) / 2`` (the network runs on twice
            the batch). ``'odd'``: an odd trunk (convolutions without biases, ``tanh``) with hidden
            fields ``h(-x) = -h(x)``; ``t`` is a convolution of ``h`` without bias (odd) and ``s`` one
            of ``h * h`` (even): one pass, and needs ``activation='tanh'``.
        scale_bound: soft bound ``B`` on ``|s|``.
        shift_bound: soft bound ``T`` on ``|t|`` (``T tanh(t / T)``): the inverse subtracts ``t`` from
            ``y``, which loses the bits of ``x`` when ``|t| >> |x|``, so a bound keeps the inverse exact
            to round-off for any parameters; the default 100 is far above the shifts data need.
        activation: ``'lipswish'``, ``'silu'``, ``'leaky_relu'`` or ``'tanh'`` between convolutions
            (pointwise, hence equivariant on scalar and regular fields).
        final_tanh: ``s = tanh(s_raw)``, ``t = tanh(t_raw)`` (the lattice review's RealNVP) instead of
            the soft bound.
        zero_init: start the last convolution at zero, so the layer starts as the identity.
        squeeze_levels: the channels are scalar fields squeezed this many times (``4^L`` channels
            each); the net runs on the coarse grid (grid-exact groups, see :class:`GConvNet`).
        basis: ``'escnn'`` or ``'orbit'`` parametrisation of the filters (see
            :class:`~gflows.nn.equivariant.GConv2d`; ``'orbit'`` for subgroups of D4 only).
        relax: relaxed equivariance of the filters (:class:`~gflows.nn.equivariant.GConv2d`; 0: exact).
        relax_to: the subgroup the relaxed filters' free part keeps (``None``: none).
    """

    def __init__(
        self,
        group: str | Group,
        n_in: int,
        n_out: int,
        hidden_fields: int = 8,
        kernel_sizes: Sequence[int] = (3, 3, 3),
        padding_mode: str = "zeros",
        affine: bool = True,
        sign_symmetric: bool = False,
        scale_bound: float = 3.0,
        activation: str = "lipswish",
        final_tanh: bool = False,
        zero_init: bool = True,
        squeeze_levels: int = 0,
        basis: str = "auto",
        shift_bound: float = 100.0,
        relax: float = 0.0,
        relax_to: str | Group | None = None,
    ):
        super().__init__()
        if sign_symmetric not in SIGN_MODES:
            raise ValueError(f"unknown sign_symmetric {sign_symmetric!r}: expected one of {SIGN_MODES}")
        self.odd = sign_symmetric == "odd"
        if self.odd and activation != "tanh":
            raise ValueError(f"sign_symmetric='odd' needs an odd activation ('tanh'), got {activation!r}")
        if self.odd and final_tanh:
            raise ValueError("sign_symmetric='odd' takes the soft bounds, not final_tanh")
        self.affine, self.sign_symmetric, self.scale_bound = affine, bool(sign_symmetric), float(scale_bound)
        self.shift_bound = float(shift_bound)
        self.final_tanh = final_tanh
        self.n_out = n_out
        self._register_bounds()
        n_net = n_out if self.odd or not affine else 2 * n_out
        self.net = conditioner_net(group, n_in, n_net, hidden_fields, kernel_sizes, padding_mode, activation,
                                   zero_init, squeeze_levels, basis, relax, bias=not self.odd,
                                   relax_to=relax_to)
        self.scale_head = None
        if self.odd and affine:
            last = self.net.layers[-1]
            self.scale_head = GConv2d(self.net.group, *last._fields, last.kernel_size, padding_mode, True,
                                      basis=last.basis, relax=relax, relax_to=relax_to)
            if zero_init:
                self.scale_head.zero_()

    def _raw(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        """``(s, t)`` before their bounds."""
        if self.odd:
            h = self.net.hidden(xa)
            t = self.net.layers[-1](h)
            return (self.scale_head(h * h) if self.scale_head is not None else torch.zeros_like(t)), t
        if self.sign_symmetric:
            plus, minus = self.net(torch.cat([xa, -xa])).chunk(2)
        else:
            plus = self.net(xa)
        if self.affine:  # one split: its backward is one concatenation, two slices' build two zero tensors
            s_raw, t = plus.split(self.n_out, 1)
        else:
            t = plus
            s_raw = torch.zeros_like(t)
        if self.sign_symmetric:
            if self.affine:
                s_raw = (s_raw + minus[:, : self.n_out]) / 2
            t = (t - minus[:, -self.n_out :]) / 2
        return s_raw, t

    def _register_bounds(self) -> None:
        # both bounds as one tensor, so that the plain affine case bounds s and t in one pass
        bounds = torch.tensor([self.scale_bound] * self.n_out + [self.shift_bound] * self.n_out)
        self.register_buffer("bounds", bounds.view(-1, 1, 1), persistent=False)

    def __setstate__(self, state: dict) -> None:
        # conditioners pickled before the joint bounds existed
        super().__setstate__(state)
        if "bounds" not in self._buffers:
            self._register_bounds()

    def forward(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        if self.affine and not (self.sign_symmetric or self.final_tanh):
            # the same soft bounds on the joint output: three recorded operators instead of six
            # (plus a split), in every pass of every coupling
            return (self.bounds * torch.tanh(self.net(xa) / self.bounds)).split(self.n_out, 1)
        s_raw, t = self._raw(xa)
        if self.final_tanh:
            return torch.tanh(s_raw), torch.tanh(t)
        return (self.scale_bound * torch.tanh(s_raw / self.scale_bound),
                self.shift_bound * torch.tanh(t / self.shift_bound))

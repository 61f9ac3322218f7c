r"""G-coupling flows: affine, additive and spline coupling with G-equivariant conditioners.

Map:      ``y_a = x_a``, ``y_b = x_b * exp(s(x_a)) + t(x_a)`` (additive: ``s = 0``).
Inverse:  ``x_b = (y_b - t(y_a)) * exp(-s(y_a))``.
Log-det:  ``sum s(x_a)`` over the ``b`` entries.

Spline (``spline_bins = K > 0``): ``y_b = f_{theta(x_a)}(x_b)`` entry-wise, with ``f`` a monotonic
rational-quadratic spline of ``K`` bins on ``[-B, B]`` (identity outside; Durkan et al. 2019,
:class:`~gflows.transforms.spline.RQSpline`, whose slopes are bounded so that it inverts to round-off
for any parameters), its ``3K - 1`` parameters per entry from the conditioner; inverse
``x_b = f^{-1}(y_b)`` (closed form), log-det ``sum log f'(x_b)``. Zero conditioner output gives the
identity.

The split is a union of fibres that the group maps onto themselves, and ``s, t`` are
G-equivariant (escnn steerable convolutions between scalar fields), so the layer commutes with the
group (Dinh et al. 2017; for lattices Albergo et al. 2019 and Kanwar et al. 2020):

* ``mask='channel'``: the first ``split`` channels condition the rest; every grid element.
* ``mask='checkerboard'``: sites of parity ``(i + j) % 2 == parity`` condition the others (all
  channels). Exact for the elements that map the parity pattern onto itself (:func:`parity_preserving`):
  translations by ``(di, dj)`` with ``di + dj`` even when ``padding_mode='circular'`` on an even
  lattice, and the rotations/reflections about a site. With :meth:`~gflows.groups.Group.act`, which
  rotates about the centre of the array, on an even ``L x L`` array those are the identity, the
  half turn and the two diagonal reflections; the others swap the two sublattices.
* ``squeeze_levels = L``: the input is a ``L``-times squeezed image, on which the group also
  permutes the ``4^L`` sub-pixel channels of every original channel (see :mod:`.reshape`). The
  split then keeps each original channel's sub-pixels in one half, and the conditioner maps between
  the squeezed tensors' true representations: on the coarse grid with steerable kernels for that
  representation (:func:`~gflows.representations.squeezed_representation`) where every element is grid-exact,
  else on the un-squeezed (depth-to-space) ``a`` part (:class:`~gflows.nn.squeezed.AtFineGrid`).
* spline parameters are scalar fields like ``s`` and ``t`` (one per entry and parameter), so spline
  couplings have the same symmetries as affine ones (except ``sign_symmetric``, not offered).
* ``sign_symmetric=True``: the conditioner's output is symmetrised over ``{x, -x}``,
  ``s = (n_s(x_a) + n_s(-x_a)) / 2`` (even) and ``t = (n_t(x_a) - n_t(-x_a)) / 2`` (odd), so the layer
  also commutes with ``x -> -x`` (the Z2 symmetry of phi^4) and every even ``s`` / odd ``t`` the net
  can express is reachable (group averaging; one net call on the doubled batch).

Numerical safety: the log-scale is soft-bounded, ``s = B tanh(s_raw / B)`` with ``B = scale_bound``,
so ``|s| < B`` (as in the lattice flows), and the last convolution starts at zero (identity map).
``final_tanh=True`` instead applies ``tanh`` to both ``s`` and ``t`` as the RealNVP of the lattice
review does (Albergo et al. 2021, arXiv 2101.08176).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gflows.flow import Transform
from gflows.groups import Group, GroupElement, get_group
from gflows.nn.equivariant import GConvNet, LipSwish
from gflows.nn.squeezed import squeezed_net
from gflows.transforms.spline import RQSpline

__all__ = ["Conditioner", "GCoupling", "checkerboard", "conditioner_net", "parity_preserving"]


def checkerboard(h: int, w: int, parity: int = 0) -> Tensor:
    """``[1, 1, h, w]`` mask, 1 where ``(i + j) % 2 == parity``."""
    i = torch.arange(h)[:, None]
    j = torch.arange(w)[None, :]
    return (((i + j) % 2) == parity).float()[None, None]


def parity_preserving(group: Group, g: GroupElement, h: int, w: int) -> bool:
    """Whether ``group.act(g, .)`` maps the checkerboard pattern of an ``h x w`` grid onto itself."""
    m = checkerboard(h, w)
    return bool(torch.equal(group.act(g, m), m))


ACTIVATIONS = {
    "lipswish": LipSwish,
    "leaky_relu": lambda n_fields, field_size: nn.LeakyReLU(),
    "tanh": lambda n_fields, field_size: nn.Tanh(),
}


def conditioner_net(group: str | Group, n_in: int, n_out: int, hidden_fields: int = 8,
                    kernel_sizes: Sequence[int] = (3, 3, 3), padding_mode: str = "zeros",
                    activation: str = "lipswish", zero_init: bool = True,
                    squeeze_levels: int = 0, basis: str = "auto") -> GConvNet:
    """The conditioners' network: ``n_in -> n_out`` channels of scalar fields (squeezed
    ``squeeze_levels`` times) through regular hidden fields, with ``activation`` between layers and,
    with ``zero_init``, a last convolution starting at zero; ``basis`` of the
    :class:`~gflows.nn.equivariant.GConv2d` filters."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {sorted(ACTIVATIONS)}")
    net = GConvNet(group, n_in, n_out, hidden_fields, kernel_sizes, padding_mode,
                   activation=ACTIVATIONS[activation], squeeze_levels=squeeze_levels,
                   conv_kwargs={"basis": basis})
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
        sign_symmetric: even ``s``, odd ``t`` by symmetrising over ``{x, -x}``.
        scale_bound: soft bound ``B`` on ``|s|``.
        shift_bound: soft bound ``T`` on ``|t|`` (``T tanh(t / T)``): the inverse subtracts ``t`` from
            ``y``, which loses the bits of ``x`` when ``|t| >> |x|``, so a bound keeps the inverse exact
            to round-off for any parameters; the default 100 is far above the shifts data need.
        activation: ``'lipswish'``, ``'leaky_relu'`` or ``'tanh'`` between convolutions (pointwise,
            hence equivariant on scalar and regular fields).
        final_tanh: ``s = tanh(s_raw)``, ``t = tanh(t_raw)`` (the lattice review's RealNVP) instead of
            the soft bound.
        zero_init: start the last convolution at zero, so the layer starts as the identity.
        squeeze_levels: the channels are scalar fields squeezed this many times (``4^L`` channels
            each); the net runs on the coarse grid (grid-exact groups, see :class:`GConvNet`).
        basis: ``'escnn'`` or ``'orbit'`` parametrisation of the filters (see
            :class:`~gflows.nn.equivariant.GConv2d`; ``'orbit'`` for subgroups of D4 only).
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
    ):
        super().__init__()
        self.affine, self.sign_symmetric, self.scale_bound = affine, sign_symmetric, float(scale_bound)
        self.shift_bound = float(shift_bound)
        self.final_tanh = final_tanh
        self.n_out = n_out
        self.net = conditioner_net(group, n_in, 2 * n_out if affine else n_out, hidden_fields, kernel_sizes,
                                   padding_mode, activation, zero_init, squeeze_levels, basis)

    def forward(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        if self.sign_symmetric:
            plus, minus = self.net(torch.cat([xa, -xa])).chunk(2)
        else:
            plus = self.net(xa)
        s_raw = plus[:, : self.n_out] if self.affine else torch.zeros_like(plus[:, : self.n_out])
        t = plus[:, -self.n_out :]
        if self.sign_symmetric:
            if self.affine:
                s_raw = (s_raw + minus[:, : self.n_out]) / 2
            t = (t - minus[:, -self.n_out :]) / 2
        if self.final_tanh:
            return torch.tanh(s_raw), torch.tanh(t)
        return (self.scale_bound * torch.tanh(s_raw / self.scale_bound),
                self.shift_bound * torch.tanh(t / self.shift_bound))


class GCoupling(Transform):
    """G-equivariant affine or additive coupling layer (see the module docstring).

    Args:
        group: symmetry group, e.g. ``'d4'``.
        event_shape: ``(C, H, W)``.
        mask: ``'channel'`` or ``'checkerboard'``.
        split: with ``mask='channel'``, the number of conditioning channels (default ``C // 2``,
            rounded to whole squeezed fields); ``flip=True`` conditions the first part on the second.
        parity: with ``mask='checkerboard'``, which sublattice conditions the other.
        squeeze_levels: how many times the input has been squeezed (``mask='channel'`` only).
        affine, sign_symmetric, scale_bound, hidden_fields, kernel_sizes, padding_mode, activation,
            final_tanh, zero_init, basis: see :class:`Conditioner`.
        spline_bins: with ``K > 0``, a rational-quadratic spline coupling of ``K`` bins on
            ``[-spline_bound, spline_bound]`` instead of the affine one (see the module docstring).
    """

    def __init__(
        self,
        group: str | Group,
        event_shape: Sequence[int],
        mask: str = "channel",
        split: int | None = None,
        flip: bool = False,
        parity: int = 0,
        squeeze_levels: int = 0,
        affine: bool = True,
        sign_symmetric: bool = False,
        scale_bound: float = 3.0,
        hidden_fields: int = 8,
        kernel_sizes: Sequence[int] = (3, 3, 3),
        padding_mode: str = "zeros",
        activation: str = "lipswish",
        final_tanh: bool = False,
        zero_init: bool = True,
        spline_bins: int = 0,
        spline_bound: float = 3.0,
        basis: str = "auto",
    ):
        super().__init__()
        self.group = get_group(group)
        self.spline_bins, self.spline_bound = int(spline_bins), float(spline_bound)
        if self.spline_bins < 0 or (self.spline_bins and self.spline_bound <= 0):
            raise ValueError(f"need spline_bins >= 0 and spline_bound > 0, got {spline_bins}, {spline_bound}")
        if self.spline_bins and (sign_symmetric or final_tanh or not affine):
            raise ValueError("spline couplings take neither sign_symmetric, final_tanh nor affine=False")
        self.event_shape = tuple(int(s) for s in event_shape)
        if len(self.event_shape) != 3:
            raise ValueError(f"event_shape must be (C, H, W), got {self.event_shape}")
        c, h, w = self.event_shape
        self.group.check_grid(h, w, "GCoupling")
        self.mask_kind, self.flip, self.levels = mask, bool(flip), int(squeeze_levels)
        fibre = 4**self.levels
        if mask == "channel":
            if c % fibre:
                raise ValueError(f"{c} channels are not whole fields of {fibre} squeezed sub-pixels")
            split = split if split is not None else (c // fibre // 2) * fibre
            if split % fibre or not 0 < split < c:
                raise ValueError(
                    f"split {split} must lie strictly between 0 and {c} and keep each channel's "
                    f"{fibre} squeezed sub-pixels together"
                )
            self.split = split
            n_a, n_b = (c - split, split) if flip else (split, c - split)
            n_in, n_out = n_a // fibre, n_b // fibre
        elif mask == "checkerboard":
            if self.levels:
                raise ValueError("checkerboard masks act on unsqueezed grids: use squeeze_levels=0")
            if padding_mode == "circular" and (h % 2 or w % 2):
                raise ValueError(f"a checkerboard on a periodic {h} x {w} lattice needs even sizes: with an "
                                 "odd one, translations wrap sites onto the other parity")
            self.register_buffer("mask_b", 1 - checkerboard(h, w, parity))
            n_in, n_out = c, c
        else:
            raise ValueError(f"unknown mask {mask!r}: expected 'channel' or 'checkerboard'")
        self.n_out, self.fibre = n_out, fibre

        def make(levels: int) -> nn.Module:
            f = 4**levels
            if self.spline_bins:  # n_out * (3K - 1) fields, field-major: c * (3K - 1) + k
                return conditioner_net(self.group, n_in * f, n_out * (3 * self.spline_bins - 1) * f,
                                       hidden_fields, kernel_sizes, padding_mode, activation, zero_init,
                                       levels, basis)
            return Conditioner(self.group, n_in * f, n_out * f, hidden_fields, kernel_sizes, padding_mode,
                               affine, sign_symmetric, scale_bound, activation, final_tanh, zero_init, levels,
                               basis)

        self.conditioner = squeezed_net(self.group, self.levels, make)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x[:, : self.split], x[:, self.split :]
        return (b, a) if self.flip else (a, b)

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([b, a] if self.flip else [a, b], 1)

    def _params(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        if self.mask_kind == "checkerboard":
            s, t = self.conditioner(xa * (1 - self.mask_b))
            return s * self.mask_b, t * self.mask_b
        return self.conditioner(xa)

    def _spline(self, xa: Tensor):
        """The spline of every ``b`` entry, conditioned on ``xa``."""
        if self.mask_kind == "checkerboard":
            xa = xa * (1 - self.mask_b)
        raw = self.conditioner(xa)  # [B, n_out * P * fibre, H, W]: channel (c * P + k) * fibre + sub
        K, (n, _, h, w) = self.spline_bins, raw.shape
        p = raw.view(n, self.n_out, 3 * K - 1, self.fibre, h, w).permute(0, 1, 3, 4, 5, 2)
        p = p.reshape(n, self.n_out * self.fibre, h, w, 3 * K - 1)
        return RQSpline(p[..., :K], p[..., K : 2 * K], p[..., 2 * K :], bound=self.spline_bound)

    def _spline_map(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        if self.mask_kind == "checkerboard":
            f = self._spline(x)  # the conditioning sites are unchanged by the map
            b = self.mask_b.bool()
            xb = torch.where(b, f.inverse(x), x) if inverse else x
            y, ladj = f(xb)
            ladj = (ladj * self.mask_b).flatten(1).sum(1)
            return (xb, -ladj) if inverse else (torch.where(b, y, x), ladj)
        a, b = self._split(x)
        f = self._spline(a)
        xb = f.inverse(b) if inverse else b
        y, ladj = f(xb)
        ladj = ladj.flatten(1).sum(1)
        return (self._join(a, xb), -ladj) if inverse else (self._join(a, y), ladj)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        if self.spline_bins:
            return self._spline_map(x, inverse=False)
        if self.mask_kind == "checkerboard":
            s, t = self._params(x)
            return x * torch.exp(s) + t, s.flatten(1).sum(1)
        a, b = self._split(x)
        s, t = self._params(a)
        return self._join(a, b * torch.exp(s) + t), s.flatten(1).sum(1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        if self.spline_bins:
            return self._spline_map(z, inverse=True)
        if self.mask_kind == "checkerboard":
            s, t = self._params(z)  # the conditioning sites are unchanged by the map
            return (z - t) * torch.exp(-s), -s.flatten(1).sum(1)
        a, b = self._split(z)
        s, t = self._params(a)
        return self._join(a, (b - t) * torch.exp(-s)), -s.flatten(1).sum(1)

r"""G-coupling flows: one coupling mechanism (split, condition, map element-wise, merge) with affine,
additive and spline element-wise maps, and G-equivariant conditioners (nflows' ``CouplingTransform``
and zuko's ``GeneralCouplingTransform`` are the models of this design).

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

* ``mask='channel'``: the first ``split`` channels condition the rest (``swap=True``: the other way
  round); every grid element.
* ``mask='checkerboard'``: sites of parity ``(i + j) % 2 == parity`` condition the others (all
  channels). Exact for the elements that map the parity pattern onto itself (:func:`parity_preserving`):
  translations by ``(di, dj)`` with ``di + dj`` even when ``padding_mode='circular'`` on an even
  lattice, and the rotations/reflections about a site. With :meth:`~gflows.groups.Group.act`, which
  rotates about the centre of the array, on an even ``L x L`` array those are the identity, the
  half turn and the two diagonal reflections; the others swap the two sublattices.
* ``mask='mirrored'``: the image grid's own version, for images of one channel (or one squeezed
  field), which no channel split can divide: sites where ``(|2i - H + 1| + |2j - W + 1|) // 2`` is
  even (``parity=0``) condition the others: a checkerboard in each quadrant, mirrored across the
  centre lines, so that every element of D4 about the array's centre (:meth:`~gflows.groups.Group.act`)
  maps the pattern onto itself and the layer is exact for every grid element (:func:`mirrored_checkerboard`).
  Neighbours across a centre line share a parity. On a squeezed input (``squeeze_levels = L``) the
  pattern is laid on the un-squeezed grid and squeezed with the image, so that it splits the ``4^L``
  sub-pixel channels of each coarse site too and works down to a ``1 x 1`` coarse grid.
* ``mask='halving'``: on an input squeezed ``L >= 1`` times, the pixels that
  :class:`~gflows.transforms.reshape.HalvingSqueeze` keeps (:func:`~gflows.transforms.reshape.halving_mask`,
  laid on the un-squeezed grid and squeezed as ``'mirrored'`` is) condition the ones it lets leave
  (``parity=1``: the other way round). Exact for every grid element. Before a ``HalvingSqueeze`` and
  a :class:`~gflows.transforms.reshape.FactorOut`, with a one-convolution conditioner, it is Glow's
  learned prior of the leaving half given the kept one (``split2d``).
* ``squeeze_levels = L``: the input is a ``L``-times squeezed image, on which the group also
  permutes the ``4^L`` sub-pixel channels of every original channel (see :mod:`.reshape`). The
  split then keeps each original channel's sub-pixels in one half, and the conditioner maps between
  the squeezed tensors' true representations: on the coarse grid with steerable kernels for that
  representation (:func:`~gflows.representations.squeezed_representation`) where every element is grid-exact,
  else on the un-squeezed (depth-to-space) ``a`` part (:class:`~gflows.nn.squeezed.AtFineGrid`).
* spline parameters are scalar fields like ``s`` and ``t`` (one per entry and parameter), so spline
  couplings have the same symmetries as affine ones (except ``sign_symmetric``, not offered).
* ``context_channels = k``: the conditioner also sees ``k`` channels of scalar fields on the same
  grid (squeezed as the input is), passed as ``context`` (for example the integer image that a
  variational dequantiser conditions on): ``s, t = n([a, context])``. The map stays a coupling of
  ``x`` for each context, with the same inverse and log-det, and commutes with the group when the
  context moves with ``x``.
* ``sign_symmetric=True``: the conditioner's output is symmetrised over ``{x, -x}``,
  ``s = (n_s(x_a) + n_s(-x_a)) / 2`` (even) and ``t = (n_t(x_a) - n_t(-x_a)) / 2`` (odd), so the layer
  also commutes with ``x -> -x`` (the Z2 symmetry of phi^4) and every even ``s`` / odd ``t`` the net
  can express is reachable (group averaging; one net call on the doubled batch).
  ``sign_symmetric='odd'``: the same symmetry from an odd network in one pass at the batch itself
  (:class:`~gflows.transforms.conditioner.Conditioner`).

Score (:meth:`GCoupling.inverse_and_score`, for path gradients): with ``x = f^{-1}(z)`` and ``s_z``
the score of ``z``, ``grad_x log q(x) = J_f(x)^T s_z + grad_x log|det J_f(x)|``. The conditioning part
is the same on both sides, so the conditioner's output of the inverse pass is the one ``f`` uses at
``x``: the product is the element-wise map's own derivatives plus one vector-Jacobian product
through the conditioner's network, reusing the inverse pass's activations (no second evaluation of
the network, Vaitl et al. 2024, arXiv 2403.15881).

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
from gflows.nn.squeezed import squeezed_net
from gflows.representations import squeeze
from gflows.transforms.conditioner import Conditioner, conditioner_net
from gflows.transforms.reshape import halving_mask
from gflows.transforms.spline import RQSpline

__all__ = ["AffineMap", "GCoupling", "SplineMap", "checkerboard", "mirrored_checkerboard",
           "parity_preserving"]


def checkerboard(h: int, w: int, parity: int = 0) -> Tensor:
    """``[1, 1, h, w]`` mask, 1 where ``(i + j) % 2 == parity``."""
    i = torch.arange(h)[:, None]
    j = torch.arange(w)[None, :]
    return (((i + j) % 2) == parity).float()[None, None]


def mirrored_checkerboard(h: int, w: int, parity: int = 0) -> Tensor:
    """``[1, 1, h, w]`` mask, 1 where ``(|2i - h + 1| + |2j - w + 1|) // 2 % 2 == parity``: the
    checkerboard of each quadrant mirrored across the centre lines, invariant under the reflections
    ``i -> h - 1 - i``, ``j -> w - 1 - j`` and (square grids) the transposition, hence under D4 about
    the centre."""
    i = (2 * torch.arange(h) - h + 1).abs()[:, None]
    j = (2 * torch.arange(w) - w + 1).abs()[None, :]
    return ((((i + j) // 2) % 2) == parity).float()[None, None]


def parity_preserving(group: Group, g: GroupElement, h: int, w: int) -> bool:
    """Whether ``group.act(g, .)`` maps the checkerboard pattern of an ``h x w`` grid onto itself."""
    m = checkerboard(h, w)
    return bool(torch.equal(group.act(g, m), m))


class AffineMap:
    """``y = b exp(s) + t`` entry-wise, from the conditioner's ``(s, t)`` (additive: ``s = 0``);
    log-det ``s`` per entry."""

    def forward(self, b: Tensor, params: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        s, t = params
        return b * torch.exp(s) + t, s

    def inverse(self, y: Tensor, params: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        s, t = params
        minus_s = -s
        return (y - t) * torch.exp(minus_s), minus_s

    def pullback(self, b: Tensor, params: tuple[Tensor, Tensor],
                 score: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Gradients of ``score . y + log-det`` (entry-wise, ``score`` a constant) with respect to
        ``b`` and to ``(s, t)``: ``(score e^s, (score b e^s + 1, score))``."""
        s, _ = params
        g_b = score * torch.exp(s)
        return g_b, (g_b * b + 1, score)


class SplineMap:
    """A rational-quadratic spline per entry (:class:`~gflows.transforms.spline.RQSpline`, ``bins``
    bins on ``[-bound, bound]``), its ``3 bins - 1`` parameters per entry from the conditioner's
    channels ``(c * P + k) * field_size + sub``."""

    def __init__(self, bins: int, bound: float, n_out: int, field_size: int):
        self.bins, self.bound, self.n_out, self.field_size = bins, bound, n_out, field_size

    def spline(self, raw: Tensor) -> RQSpline:
        K, (n, _, h, w) = self.bins, raw.shape
        p = raw.view(n, self.n_out, 3 * K - 1, self.field_size, h, w).permute(0, 1, 3, 4, 5, 2)
        p = p.reshape(n, self.n_out * self.field_size, h, w, 3 * K - 1)
        return RQSpline(p[..., :K], p[..., K : 2 * K], p[..., 2 * K :], bound=self.bound)

    def forward(self, b: Tensor, raw: Tensor) -> tuple[Tensor, Tensor]:
        return self.spline(raw)(b)

    def inverse(self, y: Tensor, raw: Tensor) -> tuple[Tensor, Tensor]:
        f = self.spline(raw)
        b = f.inverse(y)
        return b, -f(b)[1]

    def pullback(self, b: Tensor, raw: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients of ``score . y + log-det`` (entry-wise, ``score`` a constant) with respect to
        ``b`` and to the raw parameters, by autograd through the spline."""
        with torch.enable_grad():
            bd, rd = b.detach().requires_grad_(True), raw.detach().requires_grad_(True)
            y, ld = self.forward(bd, rd)
            g_b, g_raw = torch.autograd.grad((y * score).sum() + ld.sum(), (bd, rd))
        return g_b, g_raw


def _fields(c: int, field_size: int) -> int:
    """How many squeezed fields of ``field_size`` sub-pixels ``c`` channels hold (whole ones only)."""
    if c % field_size:
        raise ValueError(f"{c} channels are not whole fields of {field_size} squeezed sub-pixels")
    return c // field_size


def _channel_split(c: int, field_size: int, split: int | None) -> int:
    """The number of conditioning channels: ``split``, or half the fields, in whole squeezed fields."""
    if _fields(c, field_size) < 2 and split is None:
        raise ValueError(f"a channel coupling splits whole fields and {c} channels of {field_size} "
                         "sub-pixels are one field: a one-channel image needs mask='mirrored' (which "
                         "image_flow picks there) or a residual flow")
    split = split if split is not None else (c // field_size // 2) * field_size
    if split % field_size or not 0 < split < c:
        raise ValueError(f"split {split} must lie strictly between 0 and {c} and keep each channel's "
                         f"{field_size} squeezed sub-pixels together")
    return split


class GCoupling(Transform):
    """G-equivariant affine or additive coupling layer (see the module docstring).

    Args:
        group: symmetry group, e.g. ``'d4'``.
        event_shape: ``(C, H, W)``.
        mask: ``'channel'``, ``'checkerboard'``, ``'mirrored'`` or ``'halving'``.
        split: with ``mask='channel'``, the number of conditioning channels (default ``C // 2``,
            rounded to whole squeezed fields); ``swap=True`` conditions the first part on the second.
        parity: with a spatial mask, which sublattice conditions the other.
        squeeze_levels: how many times the input has been squeezed (not with ``mask='checkerboard'``).
        affine, sign_symmetric, scale_bound, hidden_fields, kernel_sizes, padding_mode, activation,
            final_tanh, zero_init, basis, relax, relax_to: see :class:`Conditioner` (``relax > 0``:
            relaxed equivariance; the map stays invertible with the same log-det whatever the
            conditioner).
        spline_bins: with ``K > 0``, a rational-quadratic spline coupling of ``K`` bins on
            ``[-spline_bound, spline_bound]`` instead of the affine one (see the module docstring).
        context_channels: channels of ``context`` the conditioner sees beside ``a``: scalar fields
            squeezed like the input, whole fields of ``4^squeeze_levels`` channels (see the module
            docstring).
    """

    def __init__(
        self,
        group: str | Group,
        event_shape: Sequence[int],
        mask: str = "channel",
        split: int | None = None,
        swap: bool = False,
        parity: int = 0,
        squeeze_levels: int = 0,
        affine: bool = True,
        sign_symmetric: bool | str = False,
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
        relax: float = 0.0,
        context_channels: int = 0,
        relax_to: str | Group | None = None,
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
        self.mask_kind, self.swap, self.levels = mask, bool(swap), int(squeeze_levels)
        self.field_size = field_size = 4**self.levels
        self.context_channels = int(context_channels)
        if self.context_channels < 0 or self.context_channels % field_size:
            raise ValueError(f"context_channels must be whole squeezed fields of {field_size} sub-pixels, "
                             f"got {context_channels} with squeeze_levels={squeeze_levels}")
        n_in, n_out = self._masks(mask, split, swap, parity, padding_mode)
        n_in += self.context_channels // field_size
        self.n_out = n_out
        self.elementwise = (SplineMap(self.spline_bins, self.spline_bound, n_out, field_size)
                            if self.spline_bins else AffineMap())

        self.relax, self.relax_to = float(relax), relax_to
        settings = (hidden_fields, kernel_sizes, padding_mode, affine, sign_symmetric, scale_bound,
                    activation, final_tanh, zero_init, basis)
        self.conditioner = squeezed_net(self.group, self.levels,
                                        lambda lv: self._conditioner(n_in, lv, *settings))

    def _masks(self, mask: str, split: int | None, swap: bool, parity: int,
               padding_mode: str) -> tuple[int, int]:
        """Sets up the split of ``mask`` (the spatial masks as buffers); returns the conditioner's
        input and output fields."""
        (c, h, w), field_size, levels = self.event_shape, self.field_size, self.levels
        if mask == "channel":
            self.split = _channel_split(c, field_size, split)
            n_a, n_b = (c - self.split, self.split) if swap else (self.split, c - self.split)
            return n_a // field_size, n_b // field_size
        if mask == "checkerboard":
            if levels:
                raise ValueError("checkerboard masks act on unsqueezed grids: use squeeze_levels=0")
            if padding_mode == "circular" and (h % 2 or w % 2):
                raise ValueError(f"a checkerboard on a periodic {h} x {w} lattice needs even sizes: with an "
                                 "odd one, translations wrap sites onto the other parity")
            self.register_buffer("mask_b", 1 - checkerboard(h, w, parity))
            self._register_masks()
            return c, c
        if mask in ("mirrored", "halving"):
            fields = _fields(c, field_size)
            if mask == "mirrored":
                fine = mirrored_checkerboard(h * 2**levels, w * 2**levels, parity)
                if fine.min() == fine.max():
                    raise ValueError(f"a mirrored checkerboard of a {h * 2**levels} x {w * 2**levels} "
                                     "image puts every pixel on one side: it needs at least 3 x 3 pixels")
            else:
                if levels < 1 or h % 2 or w % 2:
                    raise ValueError("mask='halving' needs an input squeezed at least once (squeeze_levels "
                                     f">= 1) on an even grid, got squeeze_levels={levels} on {h} x {w}")
                fine = halving_mask(h * 2**levels, w * 2**levels, levels)
                fine = fine if parity == 0 else 1 - fine
            for _ in range(levels):
                fine = squeeze(fine)
            self.register_buffer("mask_b", 1 - fine.repeat(1, fields, 1, 1))
            self._register_masks()
            return fields, fields
        raise ValueError(f"unknown mask {mask!r}: expected 'channel', 'checkerboard', 'mirrored' or "
                         "'halving'")

    def _register_masks(self) -> None:
        # the checkerboard's complement and boolean form, made once: every small operator recorded on
        # the autograd tape costs a node in each backward pass, and a lattice step runs two
        self.register_buffer("mask_a", 1 - self.mask_b, persistent=False)
        self.register_buffer("mask_b_bool", self.mask_b.bool(), persistent=False)

    def __setstate__(self, state: dict) -> None:
        # layers pickled before the cached masks existed
        super().__setstate__(state)
        if "mask_b" in self._buffers and "mask_a" not in self._buffers:
            self._register_masks()

    def _conditioner(self, n_in: int, levels: int, hidden_fields, kernel_sizes, padding_mode, affine,
                     sign_symmetric, scale_bound, activation, final_tanh, zero_init, basis) -> nn.Module:
        """The conditioner for inputs squeezed ``levels`` times: ``(s, t)``, or the spline parameters
        (``n_out * (3K - 1)`` fields, field-major: ``c * (3K - 1) + k``)."""
        f = 4**levels
        if self.spline_bins:
            return conditioner_net(self.group, n_in * f, self.n_out * (3 * self.spline_bins - 1) * f,
                                   hidden_fields, kernel_sizes, padding_mode, activation, zero_init, levels,
                                   basis, self.relax, relax_to=self.relax_to)
        return Conditioner(self.group, n_in * f, self.n_out * f, hidden_fields, kernel_sizes, padding_mode,
                           affine, sign_symmetric, scale_bound, activation, final_tanh, zero_init, levels,
                           basis, relax=self.relax, relax_to=self.relax_to)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, b)``: the conditioning part (checkerboard: the whole field with the ``b`` sites
        zeroed) and the part the element-wise map moves (checkerboard: the whole field)."""
        if self.mask_kind != "channel":
            return x * self.mask_a, x
        a, b = x[:, : self.split], x[:, self.split :]
        return (b, a) if self.swap else (a, b)

    def _merge(self, x: Tensor, a: Tensor, y: Tensor) -> Tensor:
        if self.mask_kind != "channel":
            return torch.where(self.mask_b_bool, y, x)
        return torch.cat([y, a] if self.swap else [a, y], 1)

    def _condition(self, a: Tensor, context: Tensor | None):
        """The element-wise map's parameters from the conditioning part (and the context)."""
        if not self.context_channels:
            return self.conditioner(a)
        want = (a.shape[0], self.context_channels, *a.shape[2:])
        if context is None or tuple(context.shape) != want:
            got = "none" if context is None else f"shape {tuple(context.shape)}"
            raise ValueError(f"GCoupling with context_channels={self.context_channels} needs a context of "
                             f"shape {want}, got {got}")
        return self.conditioner(torch.cat([a, context.to(a.dtype)], 1))

    def _map(self, x: Tensor, inverse: bool, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The coupling in either direction: the conditioning part is unchanged by the map, so the
        parameters are the same function of the input and of the output."""
        a, b = self._split(x)
        params = self._condition(a, context)
        y, ladj = (self.elementwise.inverse if inverse else self.elementwise.forward)(b, params)
        if self.mask_kind != "channel":
            ladj = ladj * self.mask_b
        return self._merge(x, a, y), ladj.flatten(1).sum(1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        return self._map(x, inverse=False, context=context)

    def inverse_and_score(self, z: Tensor, score: Tensor,
                          context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The inverse and the score of ``x`` (see the module docstring): the conditioner runs once,
        and its input gradient is one vector-Jacobian product through the activations of that run."""
        self.check(z)
        grad_on = torch.is_grad_enabled()
        a, b = self._split(z)
        with torch.enable_grad():
            # a leaf where z carries no graph, so that the conditioner's input gradient exists
            a_in = a if a.requires_grad else a.detach().requires_grad_(True)
            params = self._condition(a_in, context)
        outs = params if isinstance(params, tuple) else (params,)
        if not grad_on:
            params = tuple(p.detach() for p in outs) if isinstance(params, tuple) else params.detach()
        y, ladj = self.elementwise.inverse(b, params)
        if self.mask_kind != "channel":
            ladj = ladj * self.mask_b
        x = self._merge(z, a, y)
        # The element-wise part of J_f(x)^T s_z + grad log|det J_f(x)|, with s_z's conditioning
        # entries passed through unchanged ...
        score = score.detach()
        _, s_b = self._split(score)
        detached = tuple(p.detach() for p in outs) if isinstance(params, tuple) else outs[0].detach()
        g_b, g_params = self.elementwise.pullback(self._split(x.detach())[1], detached, s_b)
        g_x = self._merge(score, self._split(score)[0], g_b)
        # ... plus the conditioner's part: one input-gradient pass through the run above.
        g_params = g_params if isinstance(g_params, tuple) else (g_params,)
        if self.mask_kind != "channel":
            g_params = tuple(g * self.mask_b for g in g_params)
        pairs = [(o, g) for o, g in zip(outs, g_params, strict=True) if o.requires_grad]
        (g_a,) = torch.autograd.grad([o for o, _ in pairs], a_in, [g for _, g in pairs],
                                     retain_graph=grad_on)
        return x, ladj.flatten(1).sum(1), g_x + self._split_adjoint(g_a)

    def _split_adjoint(self, g_a: Tensor) -> Tensor:
        """The gradient with respect to ``x`` of ``a(x) . g_a``, ``a`` the conditioning part."""
        if self.mask_kind != "channel":
            return g_a * self.mask_a
        n, _, h, w = g_a.shape
        zeros = g_a.new_zeros(n, self.event_shape[0] - g_a.shape[1], h, w)
        return torch.cat([zeros, g_a] if self.swap else [g_a, zeros], 1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        return self._map(z, inverse=True, context=context)

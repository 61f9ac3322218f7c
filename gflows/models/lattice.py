r"""Flows for periodic lattice fields ``[1, L, L]``: the gflows symmetric sampler and the lattice
review's RealNVP baseline, both stacks of checkerboard affine couplings with circular padding.

Map, inverse and log-det are those of :class:`~gflows.transforms.coupling.GCoupling`, alternating
the sublattice that conditions the other. Symmetries of every layer (hence of ``log q``, the
standard-normal base having all of them), on an even ``L``:

* translations by ``(di, dj)`` with ``di + dj`` even (circular convolutions keep the checkerboard);
* the rotations and reflections about a *site* (D4 fixing a site keeps the checkerboard): with
  ``group='d4'`` the conditioners are D4-steerable, so these hold exactly. With
  :meth:`~gflows.groups.Group.act` (which rotates about the array centre, between sites) that is
  ``act(g, .)`` followed by a one-site roll when ``g`` swaps the sublattices;
* ``phi -> -phi`` with ``sign_symmetric``.

Translations by an odd vector are not symmetries of a single layer (they swap the sublattices).
The optional site splines, zero-mode spline and :class:`~gflows.transforms.fourier.MomentumScale`
commute with every symmetry of the action, so they keep the list above as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gflows._checks import is_count
from gflows.flow import Compose, Flow
from gflows.groups import Group, GroupElement
from gflows.transforms.coupling import GCoupling
from gflows.transforms.fourier import MomentumScale
from gflows.transforms.global_mode import OddSiteSpline, OddZeroModeSpline
from gflows.transforms.residual import GResidualBlock

__all__ = ["LatticeSymmetrised", "lattice_flow", "realnvp_baseline", "residual_lattice_flow"]


def lattice_flow(
    L: int,
    n_layers: int = 16,
    hidden_fields: int = 4,
    group: str | Group = "d4",
    sign_symmetric: bool | str = True,
    kernel_sizes: Sequence[int] = (3, 3, 3),
    scale_bound: float = 3.0,
    activation: str = "lipswish",
    final_tanh: bool = False,
    zero_init: bool = True,
    zero_mode_bins: int = 0,
    zero_mode_bound: float = 1.0,
    site_spline_bins: int = 0,
    site_spline_bound: float = 3.0,
    site_spline_every: int = 0,
    spline_layers: int = 0,
    spline_bins: int = 8,
    spline_bound: float = 3.0,
    momentum_scale: bool = False,
    basis: str = "escnn",
    relax: float = 0.0,
    relax_to: str | None = None,
) -> Flow:
    """``n_layers`` checkerboard couplings on ``[1, L, L]`` with ``group``-equivariant conditioners.

    Args:
        L: lattice size.
        n_layers: couplings (alternating parity).
        hidden_fields: regular fields per hidden layer of each conditioner (``hidden_fields * |G|``
            channels).
        group, sign_symmetric, kernel_sizes, scale_bound, activation, final_tanh, zero_init: see
            :class:`~gflows.transforms.conditioner.Conditioner`.
        zero_mode_bins: with ``> 0``, an :class:`~gflows.transforms.global_mode.OddZeroModeSpline`
            of that many bins per side (range ``zero_mode_bound``) on the data side of the couplings.
        site_spline_bins: with ``> 0``, an :class:`~gflows.transforms.global_mode.OddSiteSpline` (the
            same odd spline on every site, range ``site_spline_bound``) on each side of the couplings,
            and with ``site_spline_every = k > 0`` also after every ``k`` couplings.
        spline_layers: the last ``spline_layers`` of the ``n_layers`` couplings are rational-quadratic
            spline couplings (``spline_bins`` bins on ``[-spline_bound, spline_bound]``, conditioned
            like the affine ones; no ``sign_symmetric``) instead of affine ones.
        momentum_scale: a :class:`~gflows.transforms.fourier.MomentumScale` (one learned scale per
            D4 orbit of momenta, invariant under the whole symmetry group of the action) on the
            noise side: the base becomes a learned translation-invariant Gaussian.
        basis, relax: the conditioners' filters (:class:`~gflows.nn.equivariant.GConv2d`): escnn's
            basis trained better at equal steps than the orbit basis (``'auto'``, exactly equivariant
            in float64; escnn's to about 1e-7); ``relax``: relaxed equivariance; ``relax_to``: the
            subgroup its free part keeps.
    """
    if not is_count(L, 2):
        raise ValueError(f"a lattice flow needs a whole lattice size L >= 2, got {L!r}")
    coupling = dict(sign_symmetric=sign_symmetric, hidden_fields=hidden_fields, kernel_sizes=kernel_sizes,
                    scale_bound=scale_bound, activation=activation, final_tanh=final_tanh,
                    zero_init=zero_init, spline_bound=spline_bound, basis=basis, relax=relax,
                    relax_to=relax_to)
    layers = _couplings(L, n_layers, group, spline_layers, spline_bins, coupling)
    if site_spline_bins:
        layers = _with_site_splines(layers, L, site_spline_bins, site_spline_bound, site_spline_every)
    if zero_mode_bins:
        layers.insert(0, OddZeroModeSpline((1, L, L), zero_mode_bins, zero_mode_bound))
    if momentum_scale:
        layers.append(MomentumScale((1, L, L)))
    return Flow(Compose(layers))


def _couplings(L: int, n: int, group, spline_layers: int, spline_bins: int, kw: dict) -> list[nn.Module]:
    """``n`` checkerboard couplings of alternating parity, the last ``spline_layers`` of them splines."""
    if not 0 <= spline_layers <= n:
        raise ValueError(f"spline_layers must lie in [0, n_layers={n}], got {spline_layers}")
    if spline_layers and kw["sign_symmetric"]:
        raise ValueError("spline couplings are not sign-symmetric: set sign_symmetric=False")
    return [GCoupling(group, (1, L, L), mask="checkerboard", parity=i % 2, padding_mode="circular",
                      spline_bins=spline_bins if i >= n - spline_layers else 0, **kw) for i in range(n)]


def _with_site_splines(layers: list[nn.Module], L: int, bins: int, bound: float,
                       every: int) -> list[nn.Module]:
    """``layers`` with an :class:`OddSiteSpline` before the first, after the last and after every
    ``every`` of them (0: only at the ends)."""
    every = every or len(layers)

    def spline() -> OddSiteSpline:
        return OddSiteSpline((1, L, L), bins, bound)

    return [spline()] + [m for i, c in enumerate(layers)
                         for m in ([c, spline()] if (i + 1) % every == 0 or i + 1 == len(layers) else [c])]


def residual_lattice_flow(
    L: int,
    n_blocks: int = 8,
    hidden_fields: int = 2,
    group: str | Group = "d4",
    sign_symmetric: bool = True,
    kernel_sizes: Sequence[int] = (3, 3, 3),
    coeff: float = 0.9,
    site_spline_bins: int = 8,
    site_spline_bound: float = 3.0,
    momentum_scale: bool = True,
    basis: str = "escnn",
    relax: float = 0.0,
    relax_to: str | None = None,
    **block_kwargs,
) -> Flow:
    r"""A G-residual sampler on ``[1, L, L]``: ``n_blocks``
    :class:`~gflows.transforms.residual.GResidualBlock` with circular padding, between two odd site
    splines, with a :class:`~gflows.transforms.fourier.MomentumScale` on the noise side.

    Unlike a checkerboard coupling, a residual block has no sublattice: with circular padding its
    residual branch commutes with *every* translation, with ``group`` about any site and, with
    ``sign_symmetric`` (odd branch: no biases, ``tanh``), with ``phi -> -phi``. With
    ``group='d4'`` and ``sign_symmetric`` every layer, hence ``log q``, is invariant under the whole
    symmetry group of the action. Sampling is the fixed-point inverse, differentiable by implicit
    differentiation, so the flow trains by reverse KL; ``log q`` uses the unbiased log-det estimate
    in training (``logdet_mode(flow, 'exact')`` for exact densities, as the report does).

    Args:
        L: lattice size.
        n_blocks: residual blocks.
        hidden_fields: regular fields per hidden layer (``hidden_fields * |G|`` channels).
        group: symmetry group of the convolutions (a subgroup of D4 keeps the action exact).
        sign_symmetric: odd residual branches.
        kernel_sizes: one kernel size per convolution of a branch.
        coeff: Lipschitz bound of every convolution (``Lip(g) <= coeff^len(kernel_sizes)``).
        site_spline_bins: odd site splines of that many bins per side at both ends (0: none).
        site_spline_bound: their range.
        momentum_scale: a learned Gaussian with one scale per D4 orbit of momenta on the noise side.
        basis, relax, relax_to: parametrisation and relaxed equivariance of the filters, as for
            :func:`lattice_flow`.
        **block_kwargs: log-det, inverse and power-iteration options of the blocks.
    """
    layers: list[nn.Module] = [
        GResidualBlock(group, (1, L, L), hidden_fields, kernel_sizes, coeff, padding_mode="circular",
                       sign_symmetric=sign_symmetric, basis=basis, relax=relax, relax_to=relax_to,
                       **block_kwargs)
        for _ in range(n_blocks)
    ]
    if site_spline_bins:
        layers = [OddSiteSpline((1, L, L), site_spline_bins, site_spline_bound), *layers,
                  OddSiteSpline((1, L, L), site_spline_bins, site_spline_bound)]
    if momentum_scale:
        layers.append(MomentumScale((1, L, L)))
    return Flow(Compose(layers))


def realnvp_baseline(L: int, n_layers: int = 16, hidden: int = 8) -> Flow:
    """The RealNVP of the lattice review (Albergo et al. 2021, arXiv 2101.08176, section 4):
    ``n_layers`` affine checkerboard couplings, conditioner convolutions ``[1, hidden, hidden, 2]``
    with kernel 3, circular padding, LeakyReLU, a final ``tanh`` on ``s`` and ``t``, default
    initialisation. No symmetry beyond the checkerboard's translations."""
    return lattice_flow(L, n_layers, hidden, "trivial", sign_symmetric=False, kernel_sizes=(3, 3, 3),
                        activation="leaky_relu", final_tanh=True, zero_init=False)


class LatticeSymmetrised(nn.Module):
    r"""The mixture of a lattice flow's images under the symmetries its layers lack (exact).

    A checkerboard flow is invariant under the even translations ``H`` only (plus what its
    conditioners add). The full symmetry group ``G`` of the action (all translations, the lattice
    rotations and reflections, ``phi -> -phi``) has 32 cosets of ``H``, represented by
    :math:`e = \sigma \circ \tau^t \circ g` (sign :math:`\sigma = \pm1`, a one-site translation
    :math:`\tau` and an element :math:`g` of D4 acting on the array as :meth:`Group.act` does). The
    mixture

    .. math:: q_G(\phi) = \frac{1}{32} \sum_e q(e^{-1} \phi)

    is sampled exactly by drawing :math:`\phi \sim q` and applying a uniformly random :math:`e`, and
    is invariant under all of ``G`` (each map is a permutation times a sign: unit Jacobian). For a
    target invariant under ``G``, convexity of :math:`1/q` gives
    :math:`\int p^2/q_G \le \int p^2/q`, so the ESS can only grow. The price: 32 density
    evaluations of ``q`` per sample (sampling itself is one pass).

    Args:
        flow: a lattice flow on ``[1, L, L]`` (even translations a symmetry, as for
            :func:`lattice_flow`), with ``sample_and_log_prob`` and ``log_prob``.
        sign: include ``phi -> -phi`` (16 elements without it).
    """

    def __init__(self, flow: Flow, sign: bool = True):
        super().__init__()
        self.flow, self.d4 = flow, Group("d4")
        self.elements = [(s, t, g) for s in ((1, -1) if sign else (1,)) for t in (0, 1)
                         for g in self.d4.elements]

    def act(self, e: tuple[int, int, GroupElement], x: Tensor, inverse: bool = False) -> Tensor:
        """``e(x)`` (or ``e^{-1}(x)``) on ``[..., L, L]``."""
        s, t, g = e
        if inverse:
            return s * self.d4.act(g.inverse, torch.roll(x, -t, -1))
        return s * torch.roll(self.d4.act(g, x), t, -1)

    def log_prob(self, x: Tensor) -> Tensor:
        r""":math:`\log q_G(x)`."""
        lq = torch.stack([self.flow.log_prob(self.act(e, x, inverse=True)) for e in self.elements])
        return torch.logsumexp(lq, 0) - math.log(len(self.elements))

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` samples of :math:`q_G` and their log-densities."""
        x, _ = self.flow.sample_and_log_prob(n)
        which = torch.randint(len(self.elements), (n,))
        y = torch.empty_like(x)
        for i, e in enumerate(self.elements):
            rows = which == i
            y[rows] = self.act(e, x[rows])
        return y, self.log_prob(y)

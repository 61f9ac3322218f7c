r"""Reshaping layers.

:class:`Squeeze` (space-to-depth, Dinh et al. 2017) maps ``[C, H, W]`` to ``[4C, H/2, W/2]``: channel
``4c + 2i + j`` of the output holds sub-pixel ``(i, j)`` of every 2x2 block of input channel ``c``.
It is volume preserving (log-det 0) and its inverse is depth-to-space.

Effect on the group action: rotating or reflecting the image moves the coarse grid *and* permutes
the four sub-pixel channels of each input channel. For C4 those four channels carry the regular
representation (a quarter turn cycles the corners); for D4 the permutation representation on the
four corners of a square (a diagonal reflection fixes two corners). So after a squeeze the channels
are no longer scalar fields: a layer that treats them as scalars (for example per-channel ActNorm
with ``field_size=1``, or a G-residual block on scalar channels) is no longer equivariant, while
layers that share parameters over each group of four (``ActNorm(field_size=4)``) still are.

After ``L`` squeezes each original channel owns ``4^L`` consecutive channels, on which a grid-exact
element acts by the permutation :func:`squeezed_representation` (the ``L``-fold tensor power of the
four-corner permutation). Networks between such fields run on the coarse grid
(:class:`~gflows.nn.equivariant.GConvNet` with ``squeeze_levels``): escnn builds their steerable
kernels for that representation, so they are exactly equivariant at ``4^L`` times fewer pixels than
:class:`AtFineGrid`, which un-squeezes instead and serves groups with non-grid-exact elements.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gflows._checks import check_event
from gflows.flow import Transform
from gflows.representations import squeeze, unsqueeze

__all__ = ["FactorOut", "HalvingSqueeze", "Squeeze", "halving_mask", "squeeze", "unsqueeze"]


class Squeeze(Transform):
    """Space-to-depth by a factor 2 (see the module docstring for the group action)."""

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        c, h, w = (int(s) for s in event_shape)
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got {(h, w)}")
        self.event_shape = (c, h, w)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        c, h, w = self.event_shape
        return (4 * c, h // 2, w // 2)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        return squeeze(x), x.new_zeros(x.shape[0])

    def check_out(self, z: Tensor) -> None:
        """Validate an inverse input ``z`` against :attr:`out_shape`."""
        if self.checks:
            check_event(z, self.out_shape, f"{type(self).__name__} inverse input")

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_out(z)
        return unsqueeze(z), z.new_zeros(z.shape[0])


def halving_mask(h: int, w: int, levels: int) -> Tensor:
    """``[1, 1, h, w]`` mask of the pixels whose sub-pixels :class:`HalvingSqueeze` keeps when its input
    carries ``levels`` squeezes: 1 where the row's bits ``levels - 1`` and ``levels`` (from the
    least significant) differ exactly when the column's do (the corners and the centre of every
    ``2^(levels+1)``-square block). Every element of D4 about the centre maps it onto itself when
    ``h`` and ``w`` are multiples of ``2^(levels+1)``."""
    def differ(n: int) -> Tensor:
        i = torch.arange(n)
        return ((i >> (levels - 1)) ^ (i >> levels)) & 1

    return (differ(h)[:, None] == differ(w)[None, :]).float()[None, None]


def _halving_permutation(n_fields: int, levels: int) -> Tensor:
    """Channel order of :class:`HalvingSqueeze`'s output in its squeezed input's channels."""
    per_field, outer = 4 ** (levels + 1), 4 ** (levels - 1)
    # within a field: b * 16 + a_L * 4 + a_{L+1}, b the first L - 1 sub-pixel indices
    b, a = torch.arange(outer).repeat_interleave(4), torch.arange(4).repeat(outer)
    corners, inner = b * 16 + a * 5, b * 16 + a * 4 + 3 - a
    kept = torch.cat([torch.cat([corners, inner]) + f * per_field for f in range(n_fields)])
    leaving = torch.ones(n_fields * per_field, dtype=torch.bool)
    leaving[kept] = False
    return torch.cat([kept, leaving.nonzero().flatten()])


class HalvingSqueeze(Squeeze):
    r"""A squeeze whose output's first half are squeezed fields again: Glow's split, equivariantly.

    Map: ``x -> P squeeze(x)`` for a fixed permutation ``P`` of the channels. Inverse:
    ``z -> unsqueeze(P^T z)``. Log-det: 0.

    Input: fields of ``4^L`` channels (one channel squeezed ``L >= 1`` times,
    :func:`~gflows.representations.squeezed_representation`). After one more squeeze each field's
    ``4^(L+1)`` channels are the sub-pixels of a ``2^(L+1)``-square block. A grid-exact element acts
    on a sub-pixel's row bits by complementing them all (a reflection) and swaps row and column bits
    (a diagonal reflection), so the sub-pixels whose last two row bits agree exactly when their last
    two column bits do form two blocks that every element of D4 maps onto themselves: the "corners"
    (both pairs equal) and the "inner" sub-pixels (both pairs unequal), on each of which the group
    acts as on the ``4^L`` sub-pixels of one level-``L`` field. ``P`` puts, field by field, those two
    level-``L`` fields first (``2C`` channels, the kept half) and the remaining sub-pixels of every
    field after them (the leaving half). So the layer commutes with every subgroup of D4 when the
    first half is read as ``2C / 4^L`` squeezed fields on the coarse grid and the second half as
    channels that the group permutes (for D4: one regular field per input field; the kept pixels of
    the input image: :func:`halving_mask`), and a
    :class:`FactorOut` of the first ``2C`` channels halves the channels at every scale as Glow does
    (12, 24, 48 on RGB), where whole fields cannot (an RGB image has three).

    Args:
        event_shape: ``(C, H, W)``, ``C`` a multiple of ``4^levels``, ``H`` and ``W`` even.
        levels: the squeezes the input's fields carry (at least 1: a single channel cannot be halved).
    """

    def __init__(self, event_shape: Sequence[int], levels: int):
        super().__init__(event_shape)
        c = self.event_shape[0]
        if levels < 1:
            raise ValueError(f"HalvingSqueeze needs fields squeezed at least once, got levels={levels}: "
                             "the four sub-pixels of one squeeze are a single orbit of D4")
        if c % 4**levels:
            raise ValueError(f"HalvingSqueeze: {c} channels are not fields of 4^{levels} sub-pixels")
        self.levels = int(levels)
        perm = _halving_permutation(c // 4**levels, levels)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("unperm", torch.argsort(perm), persistent=False)

    @property
    def kept_channels(self) -> int:
        """The first half of the output: ``2C`` channels of level-``levels`` fields."""
        return 2 * self.event_shape[0]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z, ladj = super().forward(x, context)
        return z[:, self.perm], ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_out(z)
        return unsqueeze(z[:, self.unperm]), z.new_zeros(z.shape[0])


class FactorOut(Transform):
    r"""Glow's multiscale split: the first ``channels`` channels go on through ``transform``, the rest
    are factored out (left as they are, for the base distribution).

    Map:      ``(x_a, x_b) -> (f(x_a), x_b)``.
    Inverse:  ``(z_a, z_b) -> (f^{-1}(z_a), z_b)``.
    Log-det:  that of ``f``.

    Group action: when the first ``channels`` channels are whole fields (the tensor's first fields, on
    which the group acts by itself) and ``f`` commutes with the group, so does the layer, and the
    standard-normal base is invariant on both parts. ``transform`` must keep its input's shape (undo
    any squeezes inside it with :class:`~gflows.flow.Inverse`).

    Args:
        transform: the map ``f`` of the kept channels.
        event_shape: ``(C, H, W)`` of the whole input; ``transform.event_shape`` is ``(channels, H, W)``.
    """

    def __init__(self, transform: Transform, event_shape: Sequence[int]):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        inner = tuple(transform.event_shape)
        if tuple(transform.out_shape) != inner:
            raise ValueError(f"FactorOut needs a shape-preserving transform, got {inner} -> "
                             f"{tuple(transform.out_shape)}")
        if inner[1:] != self.event_shape[1:] or not 0 < inner[0] < self.event_shape[0]:
            raise ValueError(f"transform's event shape {inner} must keep some, not all, channels of "
                             f"{self.event_shape}")
        self.transform, self.channels = transform, inner[0]

    def _map(self, fn, x: Tensor) -> tuple[Tensor, Tensor]:
        y, ladj = fn(x[:, : self.channels])
        return torch.cat([y, x[:, self.channels :]], 1), ladj

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        return self._map(lambda a: self.transform(a, context), x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z, "inverse input")
        return self._map(lambda a: self.transform.inverse(a, context), z)

    def inverse_and_score(self, z: Tensor, score: Tensor,
                          context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The inner transform's score recursion on the kept channels; the factored-out ones pass
        through with their score unchanged (the map is the identity on them, independent of the rest)."""
        self.check(z, "inverse input")
        c = self.channels
        y, ladj, s = self.transform.inverse_and_score(z[:, :c], score[:, :c], context)
        return torch.cat([y, z[:, c:]], 1), ladj, torch.cat([s, score[:, c:]], 1)



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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from gflows.flow import Transform

__all__ = ["AtFineGrid", "Squeeze"]


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
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        from gflows._checks import check_event

        check_event(z, self.out_shape, "Squeeze inverse input")
        return F.pixel_shuffle(z, 2), z.new_zeros(z.shape[0])


class AtFineGrid(nn.Module):
    """Run ``net`` on the un-squeezed (depth-to-space) input and squeeze its output(s) back.

    For a tensor squeezed ``levels`` times, ``net`` then sees scalar fields on the fine grid, where
    the group only moves pixels, so an equivariant ``net`` gives a map that is equivariant for the
    squeezed tensors' true representation. Squeezing permutes entries: Lipschitz constants are
    unchanged. A tuple output (for example a conditioner's ``(s, t)``) is squeezed entry by entry.
    """

    def __init__(self, net: nn.Module, levels: int):
        super().__init__()
        self.net, self.r = net, 2**levels

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = self.net(F.pixel_shuffle(x, self.r))
        if isinstance(out, tuple):
            return tuple(F.pixel_unshuffle(o, self.r) for o in out)
        return F.pixel_unshuffle(out, self.r)

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

Computation: the data are laid out as columns ``[n, R]`` (R = batch x pixels), so that every
coefficient is broadcast along a contiguous run of R. Factor ``k`` mixes index bit ``m - k``, with
coefficients that depend on the other bits. The factors of a contiguous range of ``j`` bits
therefore multiply into a batch of dense ``2^j x 2^j`` blocks (one per value of the bits outside
the range). One path leads from each input coordinate to each output coordinate through the
range's factors, so every entry of a block is a product of ``j`` coefficients, one per factor;
splitting the range's bits into an upper and a lower half makes each block the broadcast product
of two smaller such products. Every range of a direction is built by one gather, one product over
the gathered factors and one broadcast product per range. The layer applies the ``ceil(m / 6)``
ranges as batched matrix products: two passes over the data at ``n = 512`` instead of nine, the
same matrix to round-off; with two ranges (``n <= 4096``) and few columns each product reads the
data in place, with no copy between them. Building the blocks costs the same whatever the batch,
so for few columns (fewer than ``n /`` :data:`FACTOR_SPAN`) the factors are applied to the data directly,
one by one, each as ``y = A * x + B * swap(x)`` (three kernels; ``A`` and ``B`` gathered from the
weights for all factors at once). benchmarks/RESULTS.md has the timings of both.

Group action: the layer mixes the channel axis identically at every pixel, so it commutes with
any group action that only moves pixels, i.e. with every grid element acting on scalar channels.
It does not commute with actions that also permute channels (regular fields, or the sub-pixel
channels after a squeeze) unless the matrix commutes with that permutation, which a generic
butterfly matrix does not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from gflows.flow import Transform

__all__ = ["Butterfly"]

#: most index bits whose factors are multiplied into one dense block (64 x 64)
GROUP_BITS = 6
#: with two ranges, up to this many entries of data are read in place by the products (1.02-1.08x
#: at n = 512 and 1,024 with 64 rows); with more a contiguous copy first is as fast or faster
#: (in place 0.89-0.95x at 512 x 1,024 and 2,048 x 256; RESULTS.md, 2026-12-07)
IN_PLACE_ENTRIES = 2**16
#: the factors are applied one by one for fewer than ``n / FACTOR_SPAN`` columns (batch x pixels):
#: building the blocks costs about as much as that many columns' passes (module docstring)
FACTOR_SPAN = 64


def _bit_groups(m: int, most: int) -> list[tuple[int, int]]:
    """Contiguous ranges ``(lowest, highest)`` of the ``m`` index bits, highest bits first, in
    ``ceil(m / most)`` near-equal parts."""
    parts = -(-m // most) if m else 0
    groups, top = [], m - 1
    for i in range(parts):
        size = m // parts + (i < m % parts)
        groups.append((top - size + 1, top))
        top -= size
    return groups


def _coef_index(m: int, lo: int, hi: int, p: int, h: Tensor, l_: Tensor, o: Tensor, i: Tensor,
                inverse: bool) -> Tensor:
    """Where, in the flattened ``[m, n/2, 4]`` coefficients, factor ``m - p`` (mixing bit ``p`` of the
    range ``lo..hi``) finds the entry it contributes to the range's dense block ``[o, i]`` (``o``,
    ``i`` the range's output and input bits), for blocks ``h`` (the bits above the range) and
    ``l_`` (below it); all broadcast together.

    One path leads from input ``i`` to output ``o`` through the range's factors, so each entry of
    the block is one coefficient per factor. The forward map applies the higher bits' factors
    first: when bit ``p`` is mixed, the range's bits above ``p`` are already outputs and those below
    are still inputs (the other way round for the inverse, whose factors run lowest first).
    """
    q, width = p - lo, hi - lo + 1
    above = ((1 << width) - 1) ^ ((1 << (q + 1)) - 1)
    below = (1 << q) - 1
    first, second = (i, o) if inverse else (o, i)
    state = (first & above) | (second & below)  # the range's bits but p, as the pair sees them
    within = ((h << width | state) >> (q + 1) << q) | (state & below)  # ... with bit p removed
    pair = within << lo | l_
    y, x = (o >> q) & 1, (i >> q) & 1
    if inverse:  # [[d, -b], [-c, a]] / det: a and d trade places (the signs are in the coefficients)
        y, x = y ^ (y == x), x ^ (y == x)
    return (((m - p - 1) << (m - 1)) + pair) * 4 + 2 * y + x


def _block_index(m: int, groups: Sequence[tuple[int, int]], inverse: bool) -> Tensor:
    """``[k, E]`` indices into the flattened coefficients with a 1 appended (index ``2^(m+1) m``):
    the product over ``k`` gives, part after part, the two factors of every range's dense blocks
    that :func:`_block_matrices` multiplies.

    Split a range's bits into its ``a`` upper and ``b`` lower ones (``o = (o_t, o_b)``, ``i = (i_t,
    i_b)``). In the forward map the upper factors' coefficients do not depend on ``o_b`` and the
    lower factors' not on ``i_t`` (the inverse: not on ``i_b``, and not on ``o_t``), so the block is
    the broadcast product of two smaller products: ``U[o_t, i_t, i_b] L[o_t, o_b, i_b]`` (inverse
    ``U[o_t, o_b, i_t] L[o_b, i_t, i_b]``), each a product of ``a`` or ``b`` gathered coefficients.
    """
    pad = m << (m + 1)
    rows: list[Tensor] = []
    for lo, hi in groups:
        width = hi - lo + 1
        b = width // 2
        for upper in (True, False):
            shape = _part_shape(m, lo, hi, upper, inverse)
            h, l_, ot, ob, it, ib = torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij")
            o, i = ot << b | ob, it << b | ib
            bits = range(lo + b, hi + 1) if upper else range(lo, lo + b)
            index = [_coef_index(m, lo, hi, p, h, l_, o, i, inverse).reshape(-1) for p in bits]
            rows.append(torch.stack(index) if index else torch.full((1, h.numel()), pad))
    depth = max(r.shape[0] for r in rows)
    rows = [torch.cat([r, r.new_full((depth - r.shape[0], r.shape[1]), pad)]) for r in rows]
    return torch.cat(rows, 1)


def _part_shape(m: int, lo: int, hi: int, upper: bool, inverse: bool) -> tuple[int, ...]:
    """``[H, L, o_t, o_b, i_t, i_b]`` of one factor of a range's blocks (see :func:`_block_index`),
    with 1 where it does not depend on the bits."""
    width = hi - lo + 1
    gt, gb = 2 ** (width - width // 2), 2 ** (width // 2)
    shape = [2 ** (m - 1 - hi), 2**lo, gt, gb, gt, gb]
    flat = (3 if upper else 4) if not inverse else (5 if upper else 2)
    shape[flat] = 1
    return tuple(shape)


def _block_matrices(prod: Tensor, m: int, groups: Sequence[tuple[int, int]], inverse: bool) -> list[Tensor]:
    """``[H, L, G, G]`` per range: the dense blocks, from the products over :func:`_block_index`."""
    mats, start = [], 0
    for lo, hi in groups:
        parts = []
        for upper in (True, False):
            shape = _part_shape(m, lo, hi, upper, inverse)
            size = math.prod(shape)
            parts.append(prod[start:start + size].view(shape))
            start += size
        g = 2 ** (hi - lo + 1)
        mats.append((parts[0] * parts[1]).view(2 ** (m - 1 - hi), 2**lo, g, g))
    return mats


def _factor_index(m: int, inverse: bool = False) -> Tensor:
    """``[m, 2, 2^m]``: for each factor and coordinate, the entry of the factor's ``[n/2 * 4]``
    coefficients ``(a, b, c, d)`` per pair that multiplies the coordinate itself (row 0: ``a`` for the
    pair's first coordinate, ``d`` for its second; swapped for the inverse, see
    ``Butterfly._coefficients``) and its partner (row 1: ``b``, ``c``)."""
    n = 2**m
    i = torch.arange(n)
    index = torch.empty(m, 2, n, dtype=torch.long)
    for k in range(1, m + 1):
        width = n >> k
        block, rest = i // (2 * width), i % (2 * width)
        second = rest >= width
        pair = block * width + rest % width
        index[k - 1, 0] = 4 * pair + (torch.where(second, 0, 3) if inverse else torch.where(second, 3, 0))
        index[k - 1, 1] = 4 * pair + torch.where(second, 2, 1)
    return index


def _apply_factors(x: Tensor, coef: Tensor, factors: Iterable[int]) -> Tensor:
    """Columns ``x [n, R]`` through the given factors (0-based) in order. Factor ``k`` on ``x`` viewed
    as ``[2^k, 2, n / 2^(k+1), R]`` (pair partners along the second axis) is ``A * x + B * x.flip(1)``,
    with ``A, B = coef[k]`` holding ``a, d`` and ``b, c`` (see :func:`_factor_index`), broadcast
    along the columns, which keeps the inner loops ``R`` long."""
    n, cols = x.shape
    for k in factors:
        width = n >> (k + 1)
        v = x.view(-1, 2, width, cols)
        own, other = coef[k].view(2, -1, 2, width, 1).unbind(0)
        x = torch.addcmul(own * v, other, v.flip(1)).view(n, cols)
    return x


def _two_ranges(mats: Sequence[Tensor], x: Tensor, inverse: bool) -> Tensor:
    """Columns ``x [n, R]`` through the dense blocks of two ranges (``n <= 2^(2 GROUP_BITS)``): the
    upper range's blocks ``[1, L, G, G]`` act on rows ``l + L g``, the lower range's ``[G, 1, L, L]``
    on rows ``L g + l``. Each is one ``bmm`` that reads the columns in place, as ``[L, G, R]`` with
    rows ``L R`` apart or as ``[G, L, R]``; the upper range's output comes out ``[L, G, R]``, which
    the lower range reads in place as well (forward), or which is copied back into rows once
    (inverse, whose upper range is applied last)."""
    n, cols = x.shape
    upper, lower = (mats[1], mats[0]) if inverse else mats
    g, low = upper.shape[2], lower.shape[2]
    upper, lower = upper.view(low, g, g), lower.view(g, low, low)
    if inverse:
        x = torch.bmm(lower, x.view(g, low, cols))
        return torch.bmm(upper, x.transpose(0, 1)).transpose(0, 1).reshape(n, cols)
    x = torch.bmm(upper, x.view(g, low, cols).transpose(0, 1))
    return torch.bmm(lower, x.transpose(0, 1)).view(n, cols)


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
        self._groups = _bit_groups(self.m, GROUP_BITS)
        self._register_indices()

    def _register_indices(self) -> None:
        # each direction's coefficients, gathered in one call per path (block ranges in the order applied)
        device = self.weight.device
        for name, inverse, groups in (("fwd", False, self._groups), ("inv", True, self._groups[::-1])):
            index = _block_index(self.m, groups, inverse) if groups else torch.zeros(1, 0, dtype=torch.long)
            self.register_buffer(f"_block_index_{name}", index.to(device), persistent=False)
            factors = _factor_index(self.m, inverse).to(device)
            factor_name = "_factor_index_inv" if inverse else "_factor_index"
            self.register_buffer(factor_name, factors, persistent=False)
        sign = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=self.weight.dtype, device=device)
        self.register_buffer("_inverse_sign", sign, persistent=False)

    def __setstate__(self, state: dict) -> None:
        # layers pickled before the blocks' coefficients were gathered this way
        super().__setstate__(state)
        if "_block_index_fwd" not in self._buffers:
            for name in ("_group_index_fwd", "_group_index_inv"):
                self._buffers.pop(name, None)
            self._register_indices()

    def _cols(self, x: Tensor) -> Tensor:
        # The mixed axis first, everything else flattened into contiguous columns.
        return x.transpose(0, 1).reshape(self.n, -1)

    def _uncols(self, c: Tensor, like: Tensor) -> Tensor:
        return c.view(self.n, like.shape[0], *like.shape[2:]).transpose(0, 1)

    def _det(self) -> Tensor:
        """``[m, n/2]``: every pair's ``ad - bc``."""
        w = self.weight
        return torch.addcmul(w[..., 0] * w[..., 3], w[..., 1], w[..., 2], value=-1)

    def _logdet(self, det: Tensor, batch: int, like: Tensor) -> Tensor:
        per_position = torch.log(torch.abs(det)).sum()
        positions = math.prod(self.event_shape[1:])
        if positions != 1:
            per_position = per_position * positions
        return per_position.expand(batch).to(like.dtype)

    def _coefficients(self, inverse: bool, det: Tensor | None = None) -> Tensor:
        """``[m, n/2, 4]``: every pair's ``(a, b, c, d)``, or for the inverse ``(a, -b, -c, d) / det``
        (the inverse's ``a`` and ``d`` trade places in the gathers)."""
        if not inverse:
            return self.weight
        det = self._det() if det is None else det
        return self.weight * self._inverse_sign / det.unsqueeze(-1)

    def _mix(
        self, c: Tensor, inverse: bool, by_factor: bool | None = None, det: Tensor | None = None
    ) -> Tensor:
        """``B c`` (or ``B^-1 c``) for columns ``c [n, R]``, factor by factor or by grouped blocks
        (default: by the number of columns); ``det`` the pairs' determinants, if at hand."""
        if self.m == 0:
            return c
        m, n, cols = self.m, self.n_mixed, c.shape[1]
        mixed, rest = c[:n], c[n:]
        coef = self._coefficients(inverse, det)
        if by_factor if by_factor is not None else cols * FACTOR_SPAN < n:
            index = self._factor_index_inv if inverse else self._factor_index
            coef = coef.reshape(m, -1).gather(1, index.view(m, -1))
            order = range(m - 1, -1, -1) if inverse else range(m)
            mixed = _apply_factors(mixed.contiguous(), coef.view(m, 2, n), order)
        else:
            groups = self._groups[::-1] if inverse else self._groups
            index = self._block_index_inv if inverse else self._block_index_fwd
            flat = torch.cat((coef.reshape(-1), coef.new_ones(1)))  # the 1 pads parts with fewer factors
            prod = flat.index_select(0, index.view(-1)).view(index.shape).prod(0)
            mats = _block_matrices(prod, m, groups, inverse)
            if len(mats) == 1:  # one dense matrix: BLAS reads transposed vectors' columns in place
                mixed = mats[0].view(n, n) @ mixed
            elif len(mats) == 2 and n * cols <= IN_PLACE_ENTRIES:
                mixed = _two_ranges(mats, mixed.contiguous(), inverse)
            else:
                # A middle range's blocks act on [G, R] slices of the columns that have bits of the
                # index both above and below the range, so no single bmm reads them in place; this
                # general matmul serves n > 4096, and many columns. The columns are copied first:
                # matmuls on transposed vectors' columns cost 2x the copy (4,096 rows, n = 512).
                mixed = mixed.contiguous()
                for mat in mats:
                    h, low, g = mat.shape[:3]
                    mixed = torch.matmul(mat, mixed.reshape(h, g, low, cols).transpose(1, 2)).transpose(1, 2)
                mixed = mixed.reshape(n, cols)
        return torch.cat([mixed, rest]) if rest.shape[0] else mixed

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        return self._uncols(self._mix(self._cols(x), False), x), self._logdet(self._det(), x.shape[0], x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        det = self._det()
        return self._uncols(self._mix(self._cols(z), True, det=det), z), -self._logdet(det, z.shape[0], z)

    def matrix(self) -> Tensor:
        """The dense ``n x n`` matrix ``B`` with ``forward(x) = B x`` (for tests and inspection)."""
        eye = torch.eye(self.n, dtype=self.weight.dtype, device=self.weight.device)
        return self._mix(eye, False)

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

Computation: factor ``k`` mixes index bit ``m - k``, with coefficients that depend on the other bits.
The factors of a contiguous range of ``j`` bits therefore multiply into a batch of dense
``2^j x 2^j`` blocks (one per value of the bits outside the range), built from the 2x2 blocks by one
elementwise product per factor (doubling the block size each time). The layer applies the
``ceil(m / 6)`` such groups as batched matrix products: two passes over the data at ``n = 512``
instead of nine, the same matrix to round-off. Building the blocks costs the same whatever the
batch, so for few rows (at most :data:`FACTOR_ROWS`) the factors are applied to the data directly,
one by one, each as ``y = A * x + B * swap(x)`` (three kernels; ``A`` and ``B`` gathered from the
weights for all factors at once): at 16 rows 1.4x to 2.5x faster for ``n = 64 .. 4096``; at 64
rows it wins only for some ``n`` (benchmarks/RESULTS.md).

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
#: most rows for which the factors are applied one by one (see the module docstring)
FACTOR_ROWS = 32


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


def _joint_order(groups: Sequence[tuple[int, int]]) -> list[int]:
    """The ranges in the order :func:`_group_matrices` stacks them: widest first, so that those that
    finish early leave from the end of the stack."""
    return sorted(range(len(groups)), key=lambda g: groups[g][0] - groups[g][1])


def _group_index(m: int, groups: Sequence[tuple[int, int]], inverse: bool) -> Tensor:
    """Where, in the flattened ``[m, n/2, 2, 2]`` blocks, :func:`_group_matrices` finds each factor's
    coefficients, in the order and layout it multiplies them.

    Step ``j`` of range ``lo..hi`` takes bit ``p = lo + j`` (factor ``m - p``) with ``S = 2^j`` bits
    below it in the range already taken. Its 2x2 block depends on every other bit: ``H`` higher,
    ``R`` in the range above ``p``, the ``S`` taken, ``L`` lower. The layout is
    ``[H, L, R, y, x, S]`` (the taken bits are the product's inputs: the factor acts first) or
    ``[H, L, R, y, S, x]`` for the inverse (its outputs: the factor acts last), so that every
    product comes out contiguous; each step stacks the ranges still going, in :func:`_joint_order`.
    """
    parts = []
    for j in range(max(hi - lo + 1 for lo, hi in groups)):
        for lo, hi in (groups[g] for g in _joint_order(groups)):
            if lo + j > hi:
                continue
            n_high, n_low, p, size, rest = 2 ** (m - 1 - hi), 2**lo, lo + j, 2**j, 2 ** (hi - lo - j)
            h, l_, r, y, x, s = torch.meshgrid(*(torch.arange(k) for k in (n_high, n_low, rest, 2, 2, size)),
                                               indexing="ij")
            # the pair index is the coordinate index with bit p removed
            pair = ((h * rest + r) * size + s) * n_low + l_
            index = ((m - p - 1) * 2 ** (m - 1) + pair) * 4 + 2 * y + x
            parts.append((index.permute(0, 1, 2, 3, 5, 4) if inverse else index).reshape(-1))
    return torch.cat(parts)


def _group_matrices(coef: Tensor, m: int, groups: Sequence[tuple[int, int]], inverse: bool) -> list[Tensor]:
    """``[H, L, G, G]`` per range of bits: the product of the factors that mix bits ``lo..hi`` (or of
    their inverses, in reverse order) as dense blocks, one per value of the ``H`` higher and ``L``
    lower bits; ``coef`` holds the factors' coefficients gathered by :func:`_group_index`.

    Bits are taken from ``lo`` up; after ``j`` of them the product is block-diagonal in the bits not
    yet taken, with ``S x S`` blocks (``S = 2^j``) on the bits taken. The next factor is diagonal in
    every bit but its own, so one more is a broadcast product:
    ``N'[(y, o), (x, i)] = N[y][o, i] T[i][y, x]`` (``T`` applied first) or
    ``T[o][y, x] N[x][o, i]`` (``T`` applied last, for the inverse). Every range's blocks at step
    ``j`` are ``S x S``, so all ranges take step ``j`` in one product, stacked.
    """
    order = _joint_order(groups)
    bits = [bits_ for bits_ in sorted((hi - lo + 1 for lo, hi in groups), reverse=True)]
    mats: list[Tensor] = [coef] * len(groups)
    prod, start = coef, 0
    for j in range(bits[0] + 1):
        # after j steps every range has n / 2^j blocks; those complete leave from the stack's end
        blocks, going = 2 ** (m - j), sum(b > j for b in bits)
        for k in range(going, len(bits)) if j else ():
            if bits[k] == j:
                lo, hi = groups[order[k]]
                part = prod[k * blocks:(k + 1) * blocks]
                mats[order[k]] = part.view(2 ** (m - 1 - hi), 2**lo, 2**j, 2**j)
        if not going:
            break
        size, pairs = 2**j, going * blocks // 2
        t = coef[start:start + pairs * 4 * size]
        start += pairs * 4 * size
        if not j:
            prod = t.view(pairs, 2, 2)
            continue
        prod = prod[:going * blocks]
        if inverse:
            left = t.view(pairs, 2, size, 2, 1)  # [., y, o, x, 1]
            right = prod.view(pairs, 2, size, size).transpose(1, 2).unsqueeze(1)  # [., 1, o, x, i]
        else:
            left = prod.view(pairs, 2, size, 1, size)  # [., y, o, 1, i]
            right = t.view(pairs, 2, 1, 2, size)  # [., y, 1, x, i]
        prod = (left * right).view(pairs, 2 * size, 2 * size)
    return mats


def _factor_index(m: int) -> Tensor:
    """``[m, 2, 2^m]``: for each factor and coordinate, the entry of the factor's ``[n/2 * 4]``
    coefficients ``(a, b, c, d)`` per pair that multiplies the coordinate itself (row 0: ``a`` for the
    pair's first coordinate, ``d`` for its second) and its partner (row 1: ``b``, ``c``)."""
    n = 2**m
    i = torch.arange(n)
    index = torch.empty(m, 2, n, dtype=torch.long)
    for k in range(1, m + 1):
        width = n >> k
        block, rest = i // (2 * width), i % (2 * width)
        second = rest >= width
        pair = block * width + rest % width
        index[k - 1, 0] = 4 * pair + torch.where(second, 3, 0)
        index[k - 1, 1] = 4 * pair + torch.where(second, 2, 1)
    return index


def _apply_factors(x: Tensor, coef: Tensor, factors: Iterable[int]) -> Tensor:
    """Rows ``x [R, n]`` through the given factors (0-based) in order. Factor ``k`` on rows viewed as
    ``[R, 2^k, 2, n / 2^(k+1)]`` (pair partners along the third axis) is ``A * x + B * x.flip(2)``,
    with ``A, B = coef[k]`` holding ``a, d`` and ``b, c`` (see :func:`_factor_index`)."""
    rows, n = x.shape
    for k in factors:
        width = n >> (k + 1)
        v = x.view(rows, -1, 2, width)
        own, other = coef[k].view(2, -1, 2, width).unbind(0)
        x = torch.addcmul(own * v, other, v.flip(2)).view(rows, n)
    return x


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
        self.register_buffer("_factor_index", _factor_index(self.m), persistent=False)
        # each direction's block coefficients, gathered in one call (ranges in the order applied)
        for name, inverse, groups in (("fwd", False, self._groups), ("inv", True, self._groups[::-1])):
            index = _group_index(self.m, groups, inverse) if groups else torch.zeros(0, dtype=torch.long)
            self.register_buffer(f"_group_index_{name}", index, persistent=False)

    def _rows(self, x: Tensor) -> Tensor:
        # Move the mixed axis last, flatten everything else into rows.
        return x.movedim(1, -1).reshape(-1, self.n)

    def _unrows(self, r: Tensor, like: Tensor) -> Tensor:
        shape = (like.shape[0], *like.shape[2:], self.n)
        return r.reshape(shape).movedim(-1, 1)

    def _logdet(self, batch: int, like: Tensor) -> Tensor:
        a, b, c, d = self.weight.unbind(-1)
        per_position = torch.log(torch.abs(a * d - b * c)).sum()
        return (per_position * math.prod(self.event_shape[1:])).expand(batch).to(like.dtype)

    def _blocks(self, inverse: bool) -> Tensor:
        """``[m, n/2, 2, 2]``: every pair's 2x2 block (rows: outputs), or its inverse."""
        if not inverse:
            return self.weight.view(self.m, -1, 2, 2)
        a, b, c, d = self.weight.unbind(-1)
        det = (a * d - b * c)[..., None, None]
        return torch.stack([d, -b, -c, a], -1).view(self.m, -1, 2, 2) / det

    def _mix(self, r: Tensor, inverse: bool, by_factor: bool | None = None) -> Tensor:
        """``r B^T`` (or ``r B^-T``), factor by factor or by grouped blocks (default: by the rows)."""
        if self.m == 0:
            return r
        m, n, rows = self.m, self.n_mixed, r.shape[0]
        mixed, rest = r[:, :n], r[:, n:]
        blocks = self._blocks(inverse)
        if by_factor if by_factor is not None else rows <= FACTOR_ROWS:
            coef = blocks.reshape(m, -1).gather(1, self._factor_index.view(m, -1))
            mixed = _apply_factors(mixed, coef.view(m, 2, n), range(m - 1, -1, -1) if inverse else range(m))
        else:
            groups = self._groups[::-1] if inverse else self._groups
            coef = blocks.reshape(-1)[self._group_index_inv if inverse else self._group_index_fwd]
            # Columns [n, rows]: a range's blocks act on [G, rows] slices whose rows are contiguous,
            # and with at most two ranges each matmul reads its operand in place (one bit range
            # outside it is contiguous-major), so only the first and the last layouts are copied.
            cols = mixed.T
            for mat in _group_matrices(coef, m, groups, inverse):
                h, low, g = mat.shape[:3]
                cols = torch.matmul(mat, cols.reshape(h, g, low, rows).transpose(1, 2)).transpose(1, 2)
            mixed = cols.reshape(n, rows).T
        return torch.cat([mixed, rest], 1) if rest.shape[1] else mixed

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        return self._unrows(self._mix(self._rows(x), False), x), self._logdet(x.shape[0], x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        return self._unrows(self._mix(self._rows(z), True), z), -self._logdet(z.shape[0], z)

    def matrix(self) -> Tensor:
        """The dense ``n x n`` matrix ``B`` with ``forward(x) = B x`` (for tests and inspection)."""
        eye = torch.eye(self.n, dtype=self.weight.dtype, device=self.weight.device)
        return self._mix(eye, False).T

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
the range), built from the 2x2 blocks by one elementwise product per factor (doubling the block
size each time; every range's coefficients come from one gather, and all ranges take each step in
one product). The layer applies the ``ceil(m / 6)`` ranges as batched matrix products: two passes
over the data at ``n = 512`` instead of nine, the same matrix to round-off. Building the blocks
costs the same whatever the batch, so for few columns (at most :data:`FACTOR_ROWS`) the factors
are applied to the data directly, one by one, each as ``y = A * x + B * swap(x)`` (three kernels;
``A`` and ``B`` gathered from the weights for all factors at once). benchmarks/RESULTS.md has the
timings of both.

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
#: most columns (batch x pixels) for which the factors are applied one by one (see the module docstring)
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

    Step ``j`` of range ``lo..hi`` takes bit ``p = hi - j`` (factor ``m - p``) with the ``S = 2^j``
    bits above it in the range already taken. Its 2x2 block depends on every other bit: the ``S``
    taken and ``B'``: the range's bits below ``p``, then those above and below the range. The
    layout is ``[S, y, x, B', ranges]`` (the taken bits are the product's outputs: the factor acts
    last) or ``[y, S, x, B', ranges]`` for the inverse (its inputs: the factor acts first), the
    ranges still going stacked last in :func:`_joint_order`.
    """
    parts = []
    for j in range(max(hi - lo + 1 for lo, hi in groups)):
        stack = []
        for lo, hi in (groups[g] for g in _joint_order(groups)):
            if lo + j > hi:
                continue
            n_high, n_low, p, size = 2 ** (m - 1 - hi), 2**lo, hi - j, 2**j
            sizes = (size, 2, 2, 2 ** (p - lo), n_high, n_low)
            s, y, x, r, h, l_ = torch.meshgrid(*(torch.arange(k) for k in sizes), indexing="ij")
            # the pair index is the coordinate index with bit p removed
            pair = ((h * size + s) * 2 ** (p - lo) + r) * n_low + l_
            index = ((m - p - 1) * 2 ** (m - 1) + pair) * 4 + 2 * y + x
            stack.append((index.transpose(0, 1) if inverse else index).reshape(-1, 2, 2, 2 ** (m - 1 - j)))
        parts.append(torch.stack(stack, -1).reshape(-1))
    return torch.cat(parts)


def _group_matrices(coef: Tensor, m: int, groups: Sequence[tuple[int, int]], inverse: bool) -> list[Tensor]:
    """``[H, L, G, G]`` per range of bits: the product of the factors that mix bits ``lo..hi`` (or of
    their inverses, in reverse order) as dense blocks, one per value of the ``H`` higher and ``L``
    lower bits; ``coef`` holds the factors' coefficients gathered by :func:`_group_index`.

    Bits are taken from ``hi`` down; after ``j`` of them the product is block-diagonal in the bits
    not yet taken, with ``S x S`` blocks (``S = 2^j``) on the bits taken. The next factor is diagonal
    in every bit but its own, so one more is a broadcast product, the new bit the lowest of the
    block's: ``N'[(o, y), (i, x)] = T[o][y, x] N[x][o, i]`` (``T`` applied last: the forward map
    applies the higher bits' factors first) or ``N[y][o, i] T[i][y, x]`` (``T`` applied first, for
    the inverse). Every range has ``n / S`` blocks at step ``j``, so all ranges take it in one
    product, stacked.

    Layout ``[S, S, B, ranges]``: the blocks are indexed last, the next bit to take leading ``B``,
    which keeps the products' inner loops long (the first steps have 2 x 2 blocks) and makes each
    product come out in the next step's layout without a copy.
    """
    order = _joint_order(groups)
    bits = sorted((hi - lo + 1 for lo, hi in groups), reverse=True)
    mats: list[Tensor] = [coef] * len(groups)
    prod, start = coef, 0
    for j in range(bits[0] + 1):
        size, going = 2**j, sum(b > j for b in bits)
        if j:
            prod = prod.view(size, size, 2 ** (m - j), -1)
            for k in range(going, prod.shape[-1]):
                lo, hi = groups[order[k]]
                mat = prod[..., k].permute(2, 0, 1).contiguous()  # blocks first, for the matmuls
                mats[order[k]] = mat.view(2 ** (m - 1 - hi), 2**lo, size, size)
            prod = prod[..., :going]
        if not going:
            break
        count = 2 ** (m + 1) * going
        t = coef[start:start + count]
        start += count
        if not j:
            prod = t
            continue
        n_next = 2 ** (m - j - 1) * going
        node = prod.reshape(size, size, 2, n_next)  # [o, i, bit p, B']
        if inverse:  # [o, y, i, x, B']
            prod = t.view(1, 2, size, 2, n_next) * node.transpose(1, 2).unsqueeze(3)
        else:
            prod = t.view(size, 2, 1, 2, n_next) * node.unsqueeze(1)
        prod = prod.reshape(2 * size, 2 * size, n_next)
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
        self._register_group_indices()

    def _register_group_indices(self) -> None:
        # each direction's block coefficients, gathered in one call (ranges in the order applied)
        device = self._factor_index.device
        for name, inverse, groups in (("fwd", False, self._groups), ("inv", True, self._groups[::-1])):
            index = _group_index(self.m, groups, inverse) if groups else torch.zeros(0, dtype=torch.long)
            self.register_buffer(f"_group_index_{name}", index.to(device), persistent=False)

    def __setstate__(self, state: dict) -> None:
        # layers pickled before the gathered block coefficients existed
        super().__setstate__(state)
        if "_group_index_fwd" not in self._buffers:
            self._register_group_indices()

    def _cols(self, x: Tensor) -> Tensor:
        # The mixed axis first, everything else flattened into contiguous columns.
        return x.transpose(0, 1).reshape(self.n, -1)

    def _uncols(self, c: Tensor, like: Tensor) -> Tensor:
        return c.view(self.n, like.shape[0], *like.shape[2:]).transpose(0, 1)

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

    def _mix(self, c: Tensor, inverse: bool, by_factor: bool | None = None) -> Tensor:
        """``B c`` (or ``B^-1 c``) for columns ``c [n, R]``, factor by factor or by grouped blocks
        (default: by the number of columns)."""
        if self.m == 0:
            return c
        m, n, cols = self.m, self.n_mixed, c.shape[1]
        mixed, rest = c[:n], c[n:]
        blocks = self._blocks(inverse)
        if by_factor if by_factor is not None else cols <= FACTOR_ROWS:
            coef = blocks.reshape(m, -1).gather(1, self._factor_index.view(m, -1))
            order = range(m - 1, -1, -1) if inverse else range(m)
            mixed = _apply_factors(mixed.contiguous(), coef.view(m, 2, n), order)
        else:
            groups = self._groups[::-1] if inverse else self._groups
            coef = blocks.reshape(-1)[self._group_index_inv if inverse else self._group_index_fwd]
            mats = _group_matrices(coef, m, groups, inverse)
            if len(mats) == 1:  # one dense matrix: BLAS reads transposed vectors' columns in place
                mixed = mats[0].view(n, n) @ mixed
            else:
                # A range's blocks act on [G, R] slices of the columns, whose rows are contiguous; with
                # at most two ranges each matmul reads its operand in place (the bits outside the
                # range are all above or all below it). The columns are copied first: matmuls on
                # transposed vectors' columns cost 2x the copy (4,096 rows, n = 512).
                mixed = mixed.contiguous()
                for mat in mats:
                    h, low, g = mat.shape[:3]
                    mixed = torch.matmul(mat, mixed.reshape(h, g, low, cols).transpose(1, 2)).transpose(1, 2)
                mixed = mixed.reshape(n, cols)
        return torch.cat([mixed, rest]) if rest.shape[0] else mixed

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        return self._uncols(self._mix(self._cols(x), False), x), self._logdet(x.shape[0], x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(z)
        return self._uncols(self._mix(self._cols(z), True), z), -self._logdet(z.shape[0], z)

    def matrix(self) -> Tensor:
        """The dense ``n x n`` matrix ``B`` with ``forward(x) = B x`` (for tests and inspection)."""
        eye = torch.eye(self.n, dtype=self.weight.dtype, device=self.weight.device)
        return self._mix(eye, False)

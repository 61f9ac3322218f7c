r"""Symmetry groups of the pixel grid and of periodic lattices, backed by escnn gspaces.

A :class:`Group` names a subgroup of O(2) acting on the plane, built with escnn
(``trivialOnR2``, ``flip2dOnR2``, ``rot2dOnR2(N)``, ``flipRot2dOnR2(N)``). It acts on a batch of
images (or periodic lattice fields) ``[..., H, W]`` by moving pixels:

* an element is a pair ``(flip, k)`` of escnn's fibre group; it acts as a reflection
  ``x[..., :, ::-1]`` (if ``flip``) followed by a rotation by ``2 pi k / N`` counter-clockwise,
  the same convention as escnn's ``GeometricTensor.transform``;
* rotations by multiples of 90 degrees and the reflections map the square grid onto itself, so for
  those *grid-exact* elements :meth:`Group.act` is an exact permutation of pixels, and a network
  built from escnn convolutions is equivariant up to float round-off;
* for ``N`` not dividing 4 (C3, C8, D8, ...) the other elements rotate by angles that do not map
  pixels to pixels: :meth:`Group.act` then interpolates (through escnn) and equivariance holds only
  approximately, with an error that shrinks with the band-limit of the filters and the image size.

Names: ``trivial``, ``flip`` (= ``d1``), ``c2``, ``c4``, ``d2``, ``d4``, and ``cN`` / ``dN`` for any N.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["Group", "GroupElement", "escnn_float32", "get_group"]


@contextmanager
def escnn_float32() -> Iterator[torch.dtype]:
    """Build escnn objects with float32 as the default dtype, yielding the caller's default.

    escnn computes its bases in float32 and mixes them with tensors of the default dtype, so under
    ``torch.set_default_dtype(torch.float64)`` it fails ("Float did not match Double"); layers build
    their escnn parts inside this and then move to the caller's dtype.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield old
    finally:
        torch.set_default_dtype(old)


@dataclass(frozen=True)
class GroupElement:
    """An element ``rotation(2 pi k / N) o reflection^flip`` of C_N or D_N."""

    flip: bool
    k: int
    n: int

    @property
    def angle(self) -> float:
        return 2 * math.pi * self.k / self.n

    @property
    def grid_exact(self) -> bool:
        """Whether the element maps the square pixel grid onto itself."""
        return (4 * self.k) % self.n == 0

    @property
    def inverse(self) -> GroupElement:
        """The inverse element: a reflection is its own inverse, a rotation turns back."""
        return self if self.flip else GroupElement(False, (-self.k) % self.n, self.n)

    @property
    def quarter_turns(self) -> int:
        if not self.grid_exact:
            raise ValueError(f"{self} is not a multiple of 90 degrees")
        return (4 * self.k // self.n) % 4

    def __str__(self) -> str:
        return f"({'flip, ' if self.flip else ''}rot {360 * self.k / self.n:g} deg)"


class Group:
    """A finite subgroup of O(2) acting on the plane, with its escnn gspace.

    Args:
        name: ``trivial``, ``flip``/``d1``, ``cN`` or ``dN`` (case-insensitive), for example ``d4``.
    """

    def __init__(self, name: str):
        m = re.fullmatch(r"(trivial|flip|[cd]\d+)", str(name).strip().lower())
        if m is None:
            raise ValueError(
                f"unknown group {name!r}: expected 'trivial', 'flip', 'cN' or 'dN' (e.g. 'c4', 'd4')"
            )
        key = m.group(1)
        if key == "flip":
            key = "d1"
        if key == "c1":
            key = "trivial"
        self.name = key
        if key == "trivial":
            self.flips, self.n = False, 1
        else:
            self.flips, self.n = key[0] == "d", int(key[1:])
            if self.n < 1:
                raise ValueError(f"unknown group {name!r}: N must be >= 1")

    def __repr__(self) -> str:
        return f"Group({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Group) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __reduce__(self):
        # escnn's gspaces hold local functions and do not pickle: a group is rebuilt from its name.
        return (Group, (self.name,))

    @property
    def order(self) -> int:
        """Number of elements, which is also the size of a regular field."""
        return self.n * (2 if self.flips else 1)

    def regular_fields(self, channels: int) -> int:
        """How many regular fields a width of ``channels`` hidden channels holds (at least one): the
        configs give widths in channels, so that models of different groups compare at equal width.

        >>> Group("d4").regular_fields(128), Group("d4").regular_fields(4)
        (16, 1)
        """
        if int(channels) < 1:
            raise ValueError(f"a hidden width must be at least 1 channel, got {channels}")
        return max(1, int(channels) // self.order)

    @cached_property
    def gspace(self):
        """The escnn gspace (``escnn.gspaces``) of this group acting on R^2."""
        from escnn import gspaces

        if self.name == "trivial":
            return gspaces.trivialOnR2()
        if self.flips and self.n == 1:
            return gspaces.flip2dOnR2()
        if self.flips:
            return gspaces.flipRot2dOnR2(self.n)
        return gspaces.rot2dOnR2(self.n)

    @property
    def elements(self) -> list[GroupElement]:
        return [GroupElement(f, k, self.n) for f in ((False, True) if self.flips else (False,))
                for k in range(self.n)]

    @property
    def grid_exact(self) -> bool:
        """Whether every element maps the pixel grid onto itself (the subgroups of D4)."""
        return all(g.grid_exact for g in self.elements)

    @property
    def grid_elements(self) -> list[GroupElement]:
        """The elements that map the pixel grid onto itself (exact action)."""
        return [g for g in self.elements if g.grid_exact]

    def subgroup_elements(self, sub: str | Group) -> list[GroupElement]:
        """The elements of this group that make up its subgroup ``sub`` (each acting as ``sub``'s
        element does), for example D4's identity and mirror for ``'flip'``.

        >>> [str(g) for g in Group("d4").subgroup_elements("c2")]
        ['(rot 0 deg)', '(rot 180 deg)']
        """
        sub = get_group(sub)
        if self.n % sub.n or (sub.flips and not self.flips):
            raise ValueError(f"{sub.name} is not a subgroup of {self.name} (C_n and D_n contain C_m and "
                             f"D_m for m dividing n; C_n no reflections)")
        return [GroupElement(h.flip, h.k * (self.n // sub.n), self.n) for h in sub.elements]

    def check_grid(self, height: int, width: int, what: str = "input") -> None:
        """Refuse a grid the group cannot act on: quarter turns need a square one."""
        if height != width and any(g.quarter_turns % 2 for g in self.grid_elements):
            raise ValueError(f"{what}: {self.name} contains quarter turns, which map a grid onto itself "
                             f"only when it is square; got {height} x {width} (use a group without them, "
                             f"such as 'flip', 'c2' or 'd2', or a square input)")

    def check_exact(self, what: str = "input") -> None:
        """Refuse a group with elements that move pixels off the grid (turns other than quarter
        turns), where an exact action by every element is needed, naming its grid-exact subgroup."""
        if not self.grid_exact:
            sub = Group(f"{'d' if self.flips else 'c'}{math.gcd(self.n, 4)}").name
            raise ValueError(f"{what}: {self.name} has turns by other than quarter turns, which move "
                             f"pixels off the grid; only its subgroup {sub!r} acts on images exactly")

    def random_act(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Each sample ``x[i]`` (``[B, ..., H, W]``) moved by its own uniformly random element
        (data augmentation, or making data exactly invariant); exact permutations only, so integer
        images stay integer, and groups with elements off the grid are refused."""
        self.check_exact(f"a random element of {self.name}")
        self.check_grid(x.shape[-2], x.shape[-1], f"a random element of {self.name}")
        elements = self.grid_elements
        which = torch.randint(len(elements), (len(x),), generator=generator)
        out = x.clone()
        for i, g in enumerate(elements):
            rows = which == i
            if rows.any():
                out[rows] = self.act(g, x[rows])
        return out

    def escnn_element(self, g: GroupElement):
        """The escnn group element corresponding to ``g``."""
        G = self.gspace.fibergroup
        if self.name == "trivial":
            return G.identity
        if self.flips and self.n == 1:
            return G.element(int(g.flip))
        if self.flips:
            return G.element((int(g.flip), g.k))
        return G.element(g.k)

    def act(self, g: GroupElement, x: Tensor) -> Tensor:
        """Apply ``g`` to scalar fields ``x[..., H, W]`` (images or periodic lattices).

        Exact (a permutation of pixels) for grid-exact elements; otherwise an interpolation through
        escnn, only approximately a group action (see the module docstring).
        """
        if g.n != self.n:
            raise ValueError(f"{g} is not an element of {self}")
        if x.shape[-1] != x.shape[-2] and g.grid_exact and g.quarter_turns % 2:
            raise ValueError(f"a 90 degree rotation needs square inputs, got {tuple(x.shape[-2:])}")
        if g.grid_exact:
            y = torch.flip(x, (-1,)) if g.flip else x
            return torch.rot90(y, g.quarter_turns, (-2, -1))
        from escnn import nn as enn

        shape = x.shape
        flat = x.reshape(-1, 1, *shape[-2:])
        ft = enn.FieldType(self.gspace, [self.gspace.trivial_repr])
        y = enn.GeometricTensor(flat, ft).transform(self.escnn_element(g)).tensor
        return y.reshape(shape)


def get_group(group: str | Group) -> Group:
    """Return ``group`` itself or the :class:`Group` of that name."""
    return group if isinstance(group, Group) else Group(group)

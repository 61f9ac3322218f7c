r"""Representations of the groups on the tensors of a flow: what a squeeze does to the group's action,
the field types the equivariant layers map between, and the permutations and orbits that
permutation representations define.

After ``L`` squeezes (space-to-depth, :func:`squeeze`) each original channel owns ``4^L`` consecutive
channels, on which a grid-exact element acts by the permutation :func:`squeezed_representation`
(the ``L``-fold tensor power of the four-corner permutation) while moving the coarse grid. Scalar,
regular and squeezed scalar fields are all permutation representations: :func:`permutation` reads a
representation's permutation and :func:`orbit_labels` numbers the orbits of a set of permutations.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gflows._checks import is_count
from gflows.groups import Group, get_group

__all__ = ["field_type", "orbit_labels", "permutation", "squeeze", "squeezed_action",
           "squeezed_representation", "unsqueeze"]


def squeeze(x: Tensor, levels: int = 1) -> Tensor:
    """``levels`` successive :class:`Squeeze` maps of ``x[B, C, H, W]`` (not one by ``2^levels``,
    which orders the sub-pixels differently)."""
    for _ in range(levels):
        x = F.pixel_unshuffle(x, 2)
    return x


def unsqueeze(x: Tensor, levels: int = 1) -> Tensor:
    """The inverse of :func:`squeeze`."""
    for _ in range(levels):
        x = F.pixel_shuffle(x, 2)
    return x


@contextmanager
def _seeded_numpy(seed: int = 0):
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


@cache
def squeezed_representation(group, levels: int):
    """escnn representation of ``group``'s fibre group on the ``4^levels`` channels that one scalar
    channel becomes after ``levels`` squeezes: ``squeeze(g . x) = rho(g) (g . squeeze(x))``, with
    ``g`` on the right moving the coarse grid. A permutation representation, read off by acting on a
    single 2 x 2 block; ``levels`` squeezes give its ``levels``-fold tensor power (escnn decomposes
    it into irreps by Clebsch-Gordan coefficients). It exists only where every element of ``group``
    maps the grid onto itself (subgroups of D4), otherwise a :class:`ValueError`.
    """
    from escnn.group import directsum
    from escnn.group.representation import build_from_discrete_group_representation

    group = get_group(group)
    if not group.grid_exact:
        raise ValueError(f"{group} has elements that do not map the grid onto itself: no squeezed "
                         "representation (un-squeeze instead: AtFineGrid)")
    fibre = group.gspace.fibergroup
    if group.order == 1:  # escnn's decomposition needs generators, which the trivial group lacks
        return directsum([fibre.trivial_representation] * 4**levels, name=f"squeezed{levels}_{group.name}")
    if levels > 1:  # channel (a_1 ... a_{L-1}) * 4 + a_L: a Kronecker product
        rep = squeezed_representation(group, levels - 1)
        with _seeded_numpy():
            return rep.tensor(squeezed_representation(group, 1))
    basis = torch.eye(4, dtype=torch.float64).view(4, 4, 1, 1)
    matrices = {}
    for g in group.elements:
        # column s: the image of basis vector e_s
        moved = squeeze(group.act(g, unsqueeze(basis))).view(4, 4).T
        matrices[group.escnn_element(g)] = moved.numpy()
    # escnn finds the change of basis to irreps (and Clebsch-Gordan coefficients) from random starts
    # (randomised SVD, pymanopt): seed them, so that every process (DDP ranks, a resumed run) builds
    # the same steerable basis.
    with _seeded_numpy():
        return build_from_discrete_group_representation(matrices, f"squeezed1_{group.name}", fibre,
                                                        ["pointwise"])


def field_type(group: Group, n_fields: int, kind: str, squeeze_levels: int = 0):
    """escnn ``FieldType`` of ``n_fields`` ``'scalar'`` or ``'regular'`` fields of ``group``.

    Scalar fields squeezed ``squeeze_levels`` times (:func:`squeeze`) have
    ``4^squeeze_levels`` channels each, which carry
    :func:`squeezed_representation`.
    """
    if not is_count(n_fields, 1):
        raise ValueError(f"a field type needs a whole number >= 1 of fields, got {n_fields!r} (a width such "
                         f"as hidden_fields or hidden_channels of 0?)")
    gs = group.gspace
    if squeeze_levels and kind != "scalar":
        raise ValueError(f"only scalar fields can be squeezed, not {kind!r} ones")
    if kind == "scalar" and squeeze_levels and group.order == 1:
        # Every sub-pixel its own trivial field: the same kernels, but escnn expands them per pair
        # of fields, which for one 4^L-dimensional field would be a dense 16^L-entry basis.
        rep, n_fields = gs.trivial_repr, n_fields * 4**squeeze_levels
    elif kind == "scalar" and squeeze_levels:
        rep = squeezed_representation(group, int(squeeze_levels))
    elif kind == "scalar":
        rep = gs.trivial_repr
    elif kind == "regular":
        rep = gs.regular_repr
    else:
        raise ValueError(f"unknown field kind {kind!r}: expected 'scalar' or 'regular'")
    from escnn import nn as enn

    return enn.FieldType(gs, n_fields * [rep])


def permutation(rep, element) -> Tensor:
    """The permutation ``sigma`` of a permutation representation, ``rho(g) e_b = e_sigma(b)``."""
    m = torch.as_tensor(rep(element), dtype=torch.float64)
    p = m.round()
    if (m - p).abs().max() > 1e-6 or not torch.equal(p.sum(0), torch.ones(len(p), dtype=p.dtype)) \
            or not torch.equal(p.sum(1), torch.ones(len(p), dtype=p.dtype)):
        raise ValueError("basis='orbit' needs permutation representations")
    return p.argmax(0)


def orbit_labels(maps: Sequence[Tensor], n: int) -> Tensor:
    """Orbit index in ``[0, n_orbits)`` of each of ``n`` points under the permutations ``maps`` (a
    group's elements, ``maps[k][p]`` the image of ``p``), numbered in order of their smallest point."""
    label = torch.arange(n)
    while True:  # label of a point: the smallest point of its orbit (orbits have at most |G| points)
        new = label
        for m in maps:
            new = torch.minimum(new, new[m])
        if torch.equal(new, label):
            return torch.unique(label, return_inverse=True)[1]
        label = new


def squeezed_action(group: str | Group, levels: int = 1):
    """The group's action on a tensor squeezed ``levels`` times: un-squeeze, move the pixels,
    squeeze (that is, :func:`squeezed_representation` on the channels and the coarse grid moved)."""
    group = get_group(group)
    return lambda g, y: squeeze(group.act(g, unsqueeze(y, levels)), levels)

"""Representations: squeeze, the squeezed representation, the squeezed action, field types,
permutations and orbits."""

import pytest
import torch
import torch.nn.functional as F

from gflows.groups import Group
from gflows.representations import (
    field_type,
    orbit_labels,
    permutation,
    squeeze,
    squeezed_action,
    squeezed_representation,
    unsqueeze,
)
from gflows.transforms.reshape import Squeeze


def test_functional_squeeze_is_repeated_squeeze_not_one_by_four():
    x = torch.randn(2, 3, 8, 8)
    s1, s2 = Squeeze((3, 8, 8)), Squeeze((12, 4, 4))
    assert torch.equal(squeeze(x, 2), s2(s1(x)[0])[0])
    assert not torch.equal(squeeze(x, 2), F.pixel_unshuffle(x, 4))  # the sub-pixel order differs
    assert torch.equal(unsqueeze(squeeze(x, 2), 2), x)


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("group", ["trivial", "flip", "c2", "c4", "d2", "d4"])
def test_squeezed_representation_describes_the_squeezed_action(group, levels):
    """squeeze(g . x) = rho(g) (g . squeeze(x)) on a grid of several blocks, and rho is a
    permutation representation of the group (a homomorphism)."""
    G = Group(group)
    rep = squeezed_representation(G, levels)
    n = 4**levels
    assert rep.size == n
    x = torch.randn(2, 2, 3 * 2**levels, 3 * 2**levels, dtype=torch.float64)
    z = squeeze(x, levels)
    for g in G.elements:
        rho = torch.as_tensor(rep(G.escnn_element(g)))
        assert torch.allclose(rho.abs().sum(0), torch.ones(n, dtype=rho.dtype))  # a permutation
        moved = G.act(g, z).unflatten(1, (2, n))
        expected = torch.einsum("st,bctij->bcsij", rho, moved).flatten(1, 2)
        assert torch.allclose(squeeze(G.act(g, x), levels), expected, atol=1e-12)
        for h in G.elements:
            gh = G.escnn_element(g) @ G.escnn_element(h)
            assert torch.allclose(torch.as_tensor(rep(gh)), rho @ torch.as_tensor(rep(G.escnn_element(h))),
                                  atol=1e-9)


def test_no_squeezed_representation_for_non_grid_rotations():
    with pytest.raises(ValueError, match="grid onto itself"):
        squeezed_representation(Group("c8"), 1)


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_squeezed_action_is_an_action(group):
    """It agrees with squeezing a moved image, and ``g^-1`` undoes ``g``."""
    G, act = Group(group), squeezed_action(group, 2)
    x = torch.randn(1, 2, 8, 8)
    y = squeeze(x, 2)
    for g in G.grid_elements:
        assert torch.equal(act(g, y), squeeze(G.act(g, x), 2))
        assert torch.equal(act(g.inverse, act(g, y)), y)


def test_permutations_and_orbits_of_field_types():
    G = Group("d4")
    regular = field_type(G, 1, "regular")
    perms = [permutation(regular.representation, G.escnn_element(g)) for g in G.elements]
    assert all(sorted(p.tolist()) == list(range(8)) for p in perms)
    assert orbit_labels(perms, 8).tolist() == [0] * 8  # the regular representation is transitive
    assert orbit_labels([torch.tensor([1, 0, 2])], 3).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="unknown field kind 'vector'"):
        field_type(G, 1, "vector")
    with pytest.raises(ValueError, match="only scalar fields can be squeezed"):
        field_type(G, 1, "regular", squeeze_levels=1)


@pytest.mark.parametrize("n", [0, -2, 1.5])
def test_field_type_names_an_empty_or_fractional_width(n):
    # escnn itself stops at a bare assert
    with pytest.raises(ValueError, match=f"whole number >= 1 of fields, got {n!r}"):
        field_type(Group("d4"), n, "regular")

import pytest
import torch
from escnn import nn as enn

from gflows.groups import Group, get_group


@pytest.mark.parametrize(
    "name, order, n_exact",
    [("trivial", 1, 1), ("flip", 2, 2), ("c2", 2, 2), ("c4", 4, 4), ("d2", 4, 4), ("d4", 8, 8),
     ("c8", 8, 4), ("d8", 16, 8), ("c3", 3, 1), ("D6", 12, 4)],
)
def test_orders_and_grid_exact_elements(name, order, n_exact):
    G = Group(name)
    assert G.order == len(G.elements) == order
    assert len(G.grid_elements) == n_exact
    assert G.gspace.fibergroup.order() == order


@pytest.mark.parametrize("name", ["flip", "c2", "c4", "d2", "d4", "c8", "d8"])
def test_act_matches_escnn_on_grid_exact_elements(name):
    G = Group(name)
    x = torch.randn(2, 1, 5, 5)
    ft = enn.FieldType(G.gspace, [G.gspace.trivial_repr])
    for g in G.grid_elements:
        ref = enn.GeometricTensor(x, ft).transform(G.escnn_element(g)).tensor
        assert torch.equal(G.act(g, x), ref), g


@pytest.mark.parametrize("name", ["c4", "d4", "d2"])
def test_grid_action_is_a_group_action(name):
    G = Group(name)
    x = torch.randn(3, 6, 6)
    images = {g: G.act(g, x) for g in G.grid_elements}
    for g in G.grid_elements:
        for h in G.grid_elements:
            composed = G.act(g, images[h])
            assert any(torch.equal(composed, im) for im in images.values())


def test_non_grid_elements_are_only_approximate():
    """A 45 degree rotation interpolates: a smooth image survives, a checkerboard does not."""
    G = Group("c8")
    g = next(e for e in G.elements if not e.grid_exact)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 33), torch.linspace(-1, 1, 33), indexing="ij")
    smooth = torch.exp(-4 * (xx**2 + yy**2))[None, None]
    assert float((G.act(g, smooth) - smooth).abs().max()) < 0.05  # radial: nearly invariant
    board = ((torch.arange(33)[:, None] + torch.arange(33)[None]) % 2).float()[None, None]
    back = G.act(g.__class__(False, 7, 8), G.act(g, board))
    assert float((back - board).abs().max()) > 0.1


def test_unknown_names_and_lookup():
    with pytest.raises(ValueError, match="unknown group 'so2'"):
        Group("so2")
    assert get_group("D4") == Group("d4")
    assert Group("c1") == Group("trivial") and Group("d1") == Group("flip")


def test_rotation_needs_square_input():
    G = Group("c4")
    with pytest.raises(ValueError, match="square"):
        G.act(G.elements[1], torch.zeros(1, 4, 6))


@pytest.mark.parametrize("group", ["c4", "d4", "c8"])
def test_layers_refuse_grids_that_quarter_turns_cannot_carry(group):
    import gflows
    from gflows.transforms.residual import GFCResidualBlock

    makers = [lambda: gflows.GCoupling(group, (4, 6, 8), hidden_fields=1),
              lambda: gflows.GIAF(group, (4, 6, 8), hidden_fields=1),
              lambda: gflows.GResidualBlock(group, (4, 6, 8), hidden_fields=1),
              lambda: GFCResidualBlock(group, (4, 6, 8), hidden=4),
              lambda: gflows.GInvConv1x1(group, (4, 6, 8))]
    for make in makers:
        with pytest.raises(ValueError, match="quarter turns.* square; got 6 x 8"):
            make()


@pytest.mark.parametrize("group", ["trivial", "flip", "c2", "d2"])
def test_groups_without_quarter_turns_take_rectangles(group):
    import gflows

    t = gflows.GCoupling(group, (4, 6, 8), hidden_fields=1)
    assert t(torch.randn(2, 4, 6, 8))[0].shape == (2, 4, 6, 8)


def test_periodic_checkerboard_refuses_odd_lattices():
    import gflows

    with pytest.raises(ValueError, match="periodic 5 x 5 lattice needs even sizes"):
        gflows.GCoupling("d4", (1, 5, 5), mask="checkerboard", padding_mode="circular", hidden_fields=1)


def test_random_act_moves_each_sample_by_a_grid_element():
    G = Group("d4")
    x = torch.randint(0, 256, (64, 3, 6, 6), dtype=torch.uint8)
    y = G.random_act(x, torch.Generator().manual_seed(0))
    assert y.dtype == torch.uint8
    which = [next(i for i, g in enumerate(G.grid_elements) if torch.equal(G.act(g, a), b))
             for a, b in zip(x, y, strict=True)]
    assert len(set(which)) == 8  # all elements drawn
    with pytest.raises(ValueError, match="quarter turns"):
        G.random_act(torch.zeros(2, 1, 4, 6))


@pytest.mark.parametrize(("name", "subgroup"), [("c8", "c4"), ("d8", "d4"), ("c3", "trivial"), ("d6", "d2")])
def test_random_act_refuses_turns_off_the_grid_naming_the_exact_subgroup(name, subgroup):
    # augmenting by C8 must not silently mean C4
    with pytest.raises(ValueError, match=f"{name} has turns by other than quarter.*subgroup '{subgroup}'"):
        Group(name).random_act(torch.zeros(2, 1, 4, 4))
    Group(subgroup).check_exact()  # the subgroup named is exact


@pytest.mark.parametrize("name", ["trivial", "flip", "c4", "d4", "c8"])
@pytest.mark.parametrize("channels", [1, 7, 8, 128])
def test_regular_fields_fill_the_width_and_never_vanish(name, channels):
    g = Group(name)
    fields = g.regular_fields(channels)
    assert fields >= 1
    assert fields * g.order <= channels or fields == 1
    assert (fields + 1) * g.order > channels


@pytest.mark.parametrize("channels", [0, -8])
def test_regular_fields_refuse_an_empty_width(channels):
    with pytest.raises(ValueError, match=f"at least 1 channel, got {channels}"):
        Group("d4").regular_fields(channels)

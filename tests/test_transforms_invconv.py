import pytest
import torch
from conftest import GROUPS
from helpers import autograd_logdet, bad_inputs, max_equivariance_error, max_reconstruction_error, perturb

from gflows.groups import Group
from gflows.transforms.invconv import GInvConv1x1

SHAPES = {0: (3, 4, 4), 1: (8, 2, 2), 2: (16, 2, 2)}


def layer(group, levels):
    torch.manual_seed(levels)
    return perturb(GInvConv1x1(group, SHAPES[levels], squeeze_levels=levels), 0.2)


@pytest.mark.parametrize("levels", [0, 1, 2])
@pytest.mark.parametrize("group", GROUPS + ["flip"])
def test_inverse_exact_logdet_and_equivariance(group, levels):
    from helpers import squeezed_act

    t = layer(group, levels)
    x = torch.randn(3, *SHAPES[levels])
    z, ld = t(x)
    assert max_reconstruction_error(t, x) <= 1e-5
    assert torch.allclose(ld, autograd_logdet(t, x), atol=1e-4)
    assert torch.allclose(t.inverse(z)[1], -ld, atol=1e-5)
    assert float(ld.abs().max()) > 1e-3  # the perturbed layer is not volume preserving
    G = Group(group)
    act = squeezed_act(G, levels) if levels else None
    assert max_equivariance_error(t, G, x, act) <= 1e-5


@pytest.mark.parametrize("levels", [0, 1, 2])
@pytest.mark.parametrize("group", GROUPS + ["flip"])
def test_weight_space_is_the_whole_commutant(group, levels):
    """Every matrix commuting with the channels' permutation representation is reachable: the
    commutant of a permutation representation has dimension (1/|G|) sum_g fix(g)^2 per pair of
    fields (Burnside's count of orbits on pairs of sub-pixels)."""
    from gflows.representations import squeezed_representation

    G = Group(group)
    c = SHAPES[levels][0]
    fields = c // 4**levels
    fix = [1.0] * G.order  # a scalar field: every element fixes its one channel
    if levels:
        rep = squeezed_representation(G, levels)
        fix = [float(torch.as_tensor(rep(G.escnn_element(g))).trace()) for g in G.elements]
    dim = fields**2 * sum(f * f for f in fix) / G.order
    t = GInvConv1x1(group, SHAPES[levels], squeeze_levels=levels)
    assert t.weights.numel() == round(dim)
    assert torch.equal(t.weight(), torch.eye(c))  # starts as the identity


def test_bad_input_and_settings():
    t = layer("d4", 1)
    for x, err, word in bad_inputs(SHAPES[1]):
        with pytest.raises(err, match=word):
            t(x)
        with pytest.raises(err, match=word):
            t.inverse(x)
    with pytest.raises(ValueError, match="sub-pixels"):
        GInvConv1x1("d4", (6, 2, 2), squeeze_levels=1)
    with pytest.raises(ValueError, match="grid onto itself"):
        GInvConv1x1("c8", (8, 2, 2), squeeze_levels=1)

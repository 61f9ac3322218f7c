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


@pytest.mark.parametrize("levels", [0, 1, 2])
@pytest.mark.parametrize("group", ["trivial", "flip", "d4"])
def test_matrix_is_the_orbit_indexing(group, levels):
    """The one flat gather gives W[(f, a), (g, b)] = delta + weights[f, g, orbit[a, b]], values and
    gradients, as the orbit index read directly does (float64)."""
    t = layer(group, levels).double()
    c = SHAPES[levels][0]
    a = t.weights[:, :, t.orbit].permute(0, 2, 1, 3).reshape(c, c)
    direct = torch.eye(c, dtype=torch.float64) + a
    assert torch.equal(t.weight(), direct)
    probe = torch.randn(c, c, dtype=torch.float64)
    (g_layer,) = torch.autograd.grad((t.weight() * probe).sum(), t.weights)
    (g_direct,) = torch.autograd.grad((direct * probe).sum(), t.weights)
    assert torch.allclose(g_layer, g_direct, rtol=0, atol=1e-12)


def test_layer_pickled_before_the_flat_index_loads():
    import pickle

    t = layer("d4", 1)
    x = torch.randn(2, *SHAPES[1])
    z = t(x)[0]
    del t._buffers["_index"]  # as pickled before the index existed
    t2 = pickle.loads(pickle.dumps(t))
    assert torch.equal(t2(x)[0], z)

import pytest
import torch
from helpers import autograd_logdet, bad_inputs, max_reconstruction_error, perturb

from gflows.transforms.global_mode import OddZeroModeSpline


def layer(shape, bins=4):
    torch.manual_seed(2)
    return perturb(OddZeroModeSpline(shape, bins=bins, bound=1.0), 1.0)


@pytest.mark.parametrize("shape", [(1, 4, 4), (2, 3, 5)])
def test_inverse_and_exact_logdet(shape):
    t = layer(shape)
    # scale so that means fall inside and outside the spline's range
    x = torch.randn(6, *shape) * torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0]).view(-1, 1, 1, 1)
    assert max_reconstruction_error(t, x) <= 1e-5
    z, ld = t(x)
    assert torch.allclose(ld, autograd_logdet(t, x), atol=1e-4)
    assert torch.allclose(t.inverse(z)[1], -ld, atol=1e-5)
    assert ld[:3].abs().max() > 1e-2  # the perturbed spline is not the identity


def test_odd_and_permutation_equivariant():
    t = layer((1, 6, 6))
    x = torch.randn(4, 1, 6, 6) * 0.5
    z, ld = t(x)
    assert torch.allclose(t(-x)[0], -z, atol=1e-6) and torch.allclose(t(-x)[1], ld, atol=1e-6)
    perm = torch.randperm(36)
    xp = x.flatten(1)[:, perm].view_as(x)  # any permutation of the sites, e.g. a lattice symmetry
    assert torch.allclose(t(xp)[0], z.flatten(1)[:, perm].view_as(z), atol=1e-6)
    # only the mean moves: the fluctuations about it are kept
    assert torch.allclose(z - z.mean((1, 2, 3), keepdim=True), x - x.mean((1, 2, 3), keepdim=True), atol=1e-6)


def test_zero_parameters_are_the_identity():
    t = OddZeroModeSpline((1, 4, 4))
    x = torch.randn(3, 1, 4, 4)
    z, ld = t(x)
    assert torch.allclose(z, x, atol=1e-6) and ld.abs().max() < 1e-6


@pytest.mark.parametrize("bad, err, word", bad_inputs((1, 4, 4)))
def test_bad_input(bad, err, word):
    with pytest.raises(err, match=word):
        OddZeroModeSpline((1, 4, 4))(bad)

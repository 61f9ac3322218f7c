import math

import pytest
import torch
from helpers import autograd_logdet, bad_inputs, max_equivariance_error, max_reconstruction_error, perturb

from gflows.groups import Group
from gflows.transforms.fourier import MomentumScale, momentum_orbits


def layer(shape):
    torch.manual_seed(3)
    return perturb(MomentumScale(shape), 0.5).double()


@pytest.mark.parametrize("shape", [(1, 4, 4), (2, 5, 5), (1, 6, 6)])
def test_inverse_and_exact_logdet(shape):
    t = layer(shape)
    x = torch.randn(3, *shape, dtype=torch.float64)
    assert max_reconstruction_error(t, x) <= 1e-10
    z, ld = t(x)
    assert torch.allclose(ld, autograd_logdet(t, x), atol=1e-8)
    assert torch.allclose(t.inverse(z)[1], -ld, atol=1e-12)
    assert ld.abs().min() > 1e-2  # not the identity


@pytest.mark.parametrize("L, n_orbits", [(2, 3), (4, 6), (5, 6), (8, 15)])
def test_orbits_are_those_of_the_lattice_rotations_and_reflections(L, n_orbits):
    orbits = momentum_orbits(L)
    assert int(orbits.max()) + 1 == n_orbits
    k = torch.arange(L)
    for k1 in k:
        for k2 in k:
            o = orbits[k1, k2]
            images = [(k2, k1), (-k1 % L, k2), (k1, -k2 % L), (-k2 % L, -k1 % L)]
            assert all(orbits[a, b] == o for a, b in images)
    # and no coarser: the orbit of (0, 1) has the 4 momenta of magnitude one only
    assert int((orbits == orbits[0, 1]).sum()) == (2 if L == 2 else 4)


@pytest.mark.parametrize("group", ["d4", "flip"])
def test_commutes_with_every_translation_rotation_reflection_and_sign(group):
    t = layer((1, 6, 6))
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    assert max_equivariance_error(t, Group(group), x) < 1e-12
    z, ld = t(x)
    for shift in [(1, 0), (0, 1), (3, 5)]:  # odd translations too
        zs, lds = t(torch.roll(x, shift, (-2, -1)))
        assert torch.allclose(zs, torch.roll(z, shift, (-2, -1)), atol=1e-12)
        assert torch.allclose(lds, ld)
    assert torch.allclose(t(-x)[0], -z, atol=1e-12)


def test_free_field_scales_give_the_free_field_density():
    """With e^{2 s(k)} = 1 / (2 (p^2 + m^2)) on the sampling side, log q(x) = -S_free(x) + const for
    S_free = sum_x [sum_mu (x_{x+mu} - x_x)^2 + m^2 x_x^2] (the phi^4 action at lam = 0)."""
    L, m2 = 6, 0.7
    t = MomentumScale((1, L, L)).double()
    orbits = momentum_orbits(L)
    k = torch.arange(L, dtype=torch.float64)
    p2 = 4 * torch.sin(math.pi * k / L).square()
    p2 = p2[:, None] + p2[None, :]
    with torch.no_grad():
        for o in range(int(orbits.max()) + 1):
            t.log_scale[o] = -0.5 * math.log(2 * (p2[orbits == o][0] + m2))
    x = torch.randn(5, 1, L, L, dtype=torch.float64)
    z, ld = t(x)
    log_q = -0.5 * z.flatten(1).square().sum(1) + ld
    kinetic = sum((torch.roll(x, 1, d) - x).square() for d in (-2, -1))
    s_free = (kinetic + m2 * x.square()).flatten(1).sum(1)
    const = log_q + s_free
    assert torch.allclose(const, const[0].expand(5), atol=1e-10)


def test_bad_inputs_and_shapes():
    t = MomentumScale((1, 4, 4))
    for x, err, word in bad_inputs((1, 4, 4)):
        with pytest.raises(err, match=word):
            t(x)
    with pytest.raises(ValueError, match="square lattice"):
        MomentumScale((1, 4, 6))

import pytest
import torch
from helpers import autograd_logdet, bad_inputs, max_reconstruction_error, perturb

from gflows.transforms.global_mode import OddSiteSpline, OddZeroModeSpline

KINDS = [OddZeroModeSpline, OddSiteSpline]


def layer(kind, shape, bins=4):
    torch.manual_seed(2)
    return perturb(kind(shape, bins=bins, bound=1.0), 1.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 4, 4), (2, 3, 5)])
def test_inverse_and_exact_logdet(kind, shape):
    t = layer(kind, shape)
    # scale so that entries and means fall inside and outside the spline's range
    x = torch.randn(6, *shape) * torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0]).view(-1, 1, 1, 1)
    assert max_reconstruction_error(t, x) <= 1e-5
    z, ld = t(x)
    assert torch.allclose(ld, autograd_logdet(t, x), atol=1e-4)
    assert torch.allclose(t.inverse(z)[1], -ld, atol=1e-5)
    assert ld[:3].abs().max() > 1e-2  # the perturbed spline is not the identity


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_odd_and_permutation_equivariant(kind, dtype):
    """Exact up to round-off: in float64 to 1e-12 (log-dets relative to their size); in float32
    the log-det's round-off reached 3e-5 of its size over 100 random layers (1e-4 here)."""
    t = layer(kind, (1, 6, 6)).to(dtype)
    x = (torch.randn(4, 1, 6, 6) * 0.5).to(dtype)
    tol, ld_tol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 1e-4)
    z, ld = t(x)
    ld_tol *= max(1.0, float(ld.abs().max()))
    assert torch.allclose(t(-x)[0], -z, atol=tol) and torch.allclose(t(-x)[1], ld, atol=ld_tol)
    perm = torch.randperm(36)
    xp = x.flatten(1)[:, perm].view_as(x)  # any permutation of the sites, e.g. a lattice symmetry
    zp, ldp = t(xp)
    assert torch.allclose(zp, z.flatten(1)[:, perm].view_as(z), atol=tol)
    assert torch.allclose(ldp, ld, atol=ld_tol)


def test_zero_mode_moves_only_the_mean():
    t = layer(OddZeroModeSpline, (1, 6, 6))
    x = torch.randn(4, 1, 6, 6) * 0.5
    z, _ = t(x)
    assert torch.allclose(z - z.mean((1, 2, 3), keepdim=True), x - x.mean((1, 2, 3), keepdim=True), atol=1e-6)


def test_site_spline_is_one_scalar_map():
    t = layer(OddSiteSpline, (1, 3, 3))
    x = torch.linspace(-2, 2, 9).view(1, 1, 3, 3)
    z, _ = t(x)
    # equal entries map to equal values wherever they sit
    z2, _ = t(x.flip(-1).flip(-2))
    assert torch.allclose(z2, z.flip(-1).flip(-2), atol=1e-6)
    assert torch.all(z.flatten().diff() > 0)  # monotonic


@pytest.mark.parametrize("kind", KINDS)
def test_zero_parameters_are_the_identity(kind):
    t = kind((1, 4, 4))
    x = torch.randn(3, 1, 4, 4)
    z, ld = t(x)
    assert torch.allclose(z, x, atol=1e-6) and ld.abs().max() < 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad, err, word", bad_inputs((1, 4, 4)))
def test_bad_input(kind, bad, err, word):
    with pytest.raises(err, match=word):
        kind((1, 4, 4))(bad)


def test_bad_settings():
    with pytest.raises(ValueError, match="bins"):
        OddSiteSpline((1, 4, 4), bins=0)

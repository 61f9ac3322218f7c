"""The rational-quadratic spline: identity at zero, exact inverse and log-det, and its slope floor."""

import math

import pytest
import torch

from gflows.transforms.spline import RQSpline


def spline(scale: float, shape=(64,), bins=6, dtype=torch.float64, seed=0) -> RQSpline:
    g = torch.Generator().manual_seed(seed)
    p = scale * torch.randn(*shape, 3 * bins - 1, generator=g, dtype=dtype)
    return RQSpline(p[..., :bins], p[..., bins : 2 * bins], p[..., 2 * bins :], bound=3.0)


def test_zero_parameters_give_the_identity():
    f = spline(0.0)
    x = torch.linspace(-5, 5, 64, dtype=torch.float64)
    y, ladj = f(x)
    assert torch.allclose(y, x, atol=1e-14) and torch.allclose(ladj, torch.zeros_like(x), atol=1e-14)


@pytest.mark.parametrize("scale", [0.5, 3.0, 100.0])
def test_inverse_and_log_det_are_exact(scale):
    f = spline(scale)
    x = torch.linspace(-4, 4, 64, dtype=torch.float64)
    y, ladj = f(x)
    assert torch.allclose(f.inverse(y), x, atol=1e-12)
    xg = x.clone().requires_grad_(True)
    (dy,) = torch.autograd.grad(f(xg)[0].sum(), xg)
    assert torch.allclose(ladj, dy.log(), atol=1e-10)


def test_knots_and_ends_are_handled():
    f = spline(5.0)
    knots = f.x[0]  # entries exactly on every knot, the ends included
    y, _ = f(knots[None].expand(64, -1).T.contiguous())
    assert torch.allclose(y[:, 0], f.y[0], atol=1e-12)
    assert torch.allclose(f.inverse(f.y[0][:, None].expand(-1, 64)).T[0], knots, atol=1e-12)
    beyond = torch.tensor([-1e4, -3.0, 3.0, 1e4], dtype=torch.float64)[:, None].expand(-1, 64)
    assert torch.equal(f(beyond)[0], beyond) and torch.equal(f.inverse(beyond), beyond)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_slopes_never_fall_below_the_floor(scale):
    """Bounded bin slopes and knot derivatives: every slope of the map is above 1.72 a^3, a = e^(-2A)
    (the minimum over the box of slopes and derivatives)."""
    f = spline(scale, shape=(256,))
    x = torch.linspace(-2.999, 2.999, 2001, dtype=torch.float64)[:, None].expand(-1, 256)
    _, ladj = f(x.contiguous())
    floor = 1.72 * math.exp(-6 * 1.15)
    assert float(ladj.min()) >= math.log(floor)
    if scale > 100:  # the bound is reached, not only respected
        assert float(ladj.min()) <= math.log(3 * floor)


def test_wrong_parameter_counts_are_refused():
    with pytest.raises(ValueError, match="needs 4 widths, 4 heights and 3 derivatives"):
        RQSpline(torch.zeros(4), torch.zeros(4), torch.zeros(4))

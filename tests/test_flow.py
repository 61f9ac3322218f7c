import math

import pytest
import torch
from families import FAMILIES, make
from helpers import autograd_logdet, perturb

import gflows
from gflows.flow import Compiled, Compose, Flow, Inverse, StandardNormal


def small_flow():
    return Flow(Compose(gflows.ActNorm((2, 4, 4)), gflows.GResidualBlock("c4", (2, 4, 4), 2))).eval()


def test_standard_normal_any_event_shape():
    for shape in [(3,), (2, 4, 4), (1, 3, 2, 2)]:
        base = StandardNormal(shape)
        z = base.sample(5)
        assert z.shape == (5, *shape)
        ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).reshape(5, -1).sum(1)
        assert torch.allclose(base.log_prob(z), ref, atol=1e-5)


def test_compose_sums_logdets_and_inverts():
    t = Compose(gflows.Logit((2, 4, 4)), gflows.ActNorm((2, 4, 4)))
    t.train()
    x = torch.rand(3, 2, 4, 4) * 0.8 + 0.1
    z, ld = t(x)
    t.eval()
    assert torch.allclose(autograd_logdet(t, x[:2]), ld[:2], atol=1e-4)
    xr, ld_inv = t.inverse(z)
    assert torch.allclose(xr, x, atol=1e-5) and torch.allclose(ld_inv, -ld, atol=1e-4)
    inv = Inverse(t)
    assert torch.allclose(inv(z)[0], xr)


def test_flow_log_prob_sample_and_consistency():
    flow = small_flow()
    with gflows.logdet_mode(flow, "exact"):
        x, lq = flow.sample_and_log_prob(4)
        assert x.shape == (4, 2, 4, 4)
        assert torch.allclose(flow.log_prob(x), lq, atol=1e-4)
    assert flow.sample(3).shape == (3, 2, 4, 4)


def test_flow_names_a_sample_count_and_an_input_dtype_it_cannot_use():
    flow = Flow(gflows.ActNorm((2, 4, 4)))
    for n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"number of samples must be a whole number >= 1, got {n!r}"):
            flow.sample(n)
        with pytest.raises(ValueError, match="number of samples"):
            flow.sample_and_log_prob(n)
    with pytest.raises(TypeError, match="input is torch.float64 but the flow's parameters are torch.float32"):
        flow.log_prob(torch.randn(3, 2, 4, 4, dtype=torch.float64))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert flow.to(torch.float64).log_prob(x).dtype == torch.float64


def test_flow_log_prob_against_change_of_variables():
    flow = small_flow()
    x = torch.randn(2, 2, 4, 4)
    with gflows.logdet_mode(flow, "exact"):
        z, _ = flow.transform(x)
        lp = flow.log_prob(x)
    ref = flow.base.log_prob(z) + autograd_logdet(flow.transform, x)
    assert torch.allclose(lp, ref, atol=1e-4)
    assert lp.shape == (2,)
    assert math.isfinite(float(lp.sum()))


def test_compiled_transform_matches_the_eager_one():
    torch.manual_seed(0)
    t = Compose(gflows.ActNorm((1, 4, 4)), gflows.GCoupling("trivial", (1, 4, 4), mask="checkerboard",
                                                              hidden_fields=2, kernel_sizes=(3,),
                                                              zero_init=False)).eval()
    c = Compiled(t)
    assert c.event_shape == c.out_shape == (1, 4, 4) and list(c.parameters()) == list(t.parameters())
    x = torch.randn(3, 1, 4, 4)
    for f, g in ((t, c), (t.inverse, c.inverse)):
        (y, ld), (yc, ldc) = f(x), g(x)
        assert torch.allclose(y, yc, atol=1e-5) and torch.allclose(ld, ldc, atol=1e-5)
    w = t.transforms[1].conditioner.parameters().__next__()
    grads = [torch.autograd.grad(f(x)[0].square().sum() + f(x)[1].sum(), w)[0] for f in (t, c)]
    assert torch.allclose(*grads, atol=1e-4) and grads[0].abs().max() > 0


@pytest.mark.parametrize("layer", ["orbit_coupling", "butterfly"])
def test_compiled_orbit_layers_and_grouped_butterfly_match_eager(layer):
    """torch.compile through the orbit-basis gather (D4 filters from one weight per orbit), the
    G-invertible 1x1 convolution, and the butterfly's grouped block products (n = 128: two groups;
    at least ``n / FACTOR_SPAN`` rows, so the block path)."""
    torch.manual_seed(1)
    if layer == "butterfly":
        from gflows.transforms.butterfly import FACTOR_SPAN

        t, x = perturb(gflows.Butterfly((128,)), 0.1).eval(), torch.randn(128 // FACTOR_SPAN + 1, 128)
    else:
        coupling = gflows.GCoupling("d4", (2, 4, 4), hidden_fields=1, kernel_sizes=(3,))
        t = Compose(perturb(gflows.GInvConv1x1("d4", (2, 4, 4)), 0.1), perturb(coupling, 0.1)).eval()
        x = torch.randn(3, 2, 4, 4)
    c = Compiled(t, dynamic=False)
    for f, g in ((t, c), (t.inverse, c.inverse)):
        (y, ld), (yc, ldc) = f(x), g(x)
        assert torch.allclose(y, yc, atol=1e-5) and torch.allclose(ld, ldc, atol=1e-4)
    w = next(t.parameters())
    grads = [torch.autograd.grad(f(x)[0].square().sum() + f(x)[1].sum(), w)[0] for f in (t, c)]
    assert torch.allclose(*grads, atol=1e-4) and grads[0].abs().max() > 0


def test_compose_needs_layers():
    with pytest.raises(ValueError, match="at least one"):
        Compose()


def mixed_transform(group, shape=(4, 4, 4)):
    """G-residual, G-coupling, G-IAF and butterfly layers in one flow."""
    from helpers import perturb

    torch.manual_seed(4)
    layers = [
        gflows.GResidualBlock(group, shape, hidden_fields=2),
        perturb(gflows.GCoupling(group, shape, hidden_fields=2, kernel_sizes=(3, 3)), 0.1),
        perturb(gflows.Butterfly(shape), 0.1),
        perturb(gflows.GIAF(group, shape, n_blocks=2, hidden_fields=2, kernel_sizes=(3, 3)), 0.1),
    ]
    return Compose(layers).eval()


@pytest.mark.parametrize("group", ["trivial", "c4", "d4"])
def test_mixed_flow_passes_the_battery(group):
    from helpers import max_equivariance_error, max_reconstruction_error

    t = mixed_transform(group)
    G = gflows.Group(group)
    x = torch.randn(2, 4, 4, 4)
    # float32 round-off relative to the outputs (which reach ~50 here): four layers of it measure
    # 0.2-2.3e-6 relative for c4 / d4, varying with the threads' summation order, so the bound is
    # 1e-5 (~80 ulp); float64, at 1e-15 relative, checks that the equivariance is exact. The round
    # trip's error reached 5.9e-7 of the outputs over 15 seeds.
    with torch.no_grad():
        scale = float(t(x)[0].abs().max())
    assert max_reconstruction_error(t, x) <= 3e-6 * max(1.0, scale)
    assert max_equivariance_error(t, G, x) <= 1e-5 * scale
    assert max_equivariance_error(t.double(), G, x.double()) <= 1e-13 * scale
    t.float()
    flow = Flow(t)
    with gflows.logdet_mode(t, "exact"):
        assert torch.allclose(t(x)[1], autograd_logdet(t, x), atol=1e-4)
        lp = flow.log_prob(x)
        for g in G.grid_elements:
            assert torch.allclose(flow.log_prob(G.act(g, x)), lp, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_push_and_score_gives_the_score_of_the_density(name, dtype):
    """The forward recursion of ``push_and_score`` (couplings: one pass through the conditioner's
    activations) equals autograd's ``grad_x log q(x)`` of a separate density pass; float64 to
    round-off, float32 relative to the score's size. The samples and log-densities are ``push``'s."""
    t = make(name, dtype)
    flow = Flow(t)
    z = torch.randn(3, *t.out_shape, dtype=dtype)
    x, lq, score = flow.push_and_score(z)
    x0, lq0 = flow.push(z)
    xd = x.detach().requires_grad_(True)
    (ref,) = torch.autograd.grad(flow.log_prob(xd).sum(), xd)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    scale = max(1.0, float(ref.abs().max()))
    assert not score.requires_grad and score.shape == x.shape
    assert float((score - ref).abs().max()) <= tol * scale, name
    assert torch.equal(x.detach(), x0.detach()) and torch.allclose(lq, lq0, rtol=1e-12, atol=tol * scale)


def test_push_and_score_leaves_parameter_gradients_alone_and_keeps_the_sample_graph():
    torch.manual_seed(0)
    flow = Flow(make("lattice_coupling", torch.float64))
    z = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    x, lq, score = flow.push_and_score(z)
    assert all(p.grad is None for p in flow.parameters())
    x.sum().backward()  # the sampling graph is intact after the score's own passes
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in flow.parameters())
    with torch.no_grad():
        x2, _, score2 = flow.push_and_score(z)
    assert not x2.requires_grad and torch.equal(score2, score)

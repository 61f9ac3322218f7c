import math

import pytest
import torch
from conftest import GROUPS
from helpers import (
    autograd_logdet,
    bad_inputs,
    max_equivariance_error,
    max_reconstruction_error,
    squeezed_act,
)

import gflows
from gflows.nn.equivariant import LipSwish
from gflows.nn.linearised import is_linearisable
from gflows.nn.lipschitz import LipschitzGConv2d, LipschitzLinear, update_lipschitz
from gflows.physics.mcmc import ess as ess_of
from gflows.transforms.residual import ConvergenceError, GFCResidualBlock, GResidualBlock, logdet_mode

SHAPES = [(2, 4, 4), (3, 4, 4)]


def block(group, shape=(2, 4, 4), **kw):
    kw.setdefault("hidden_fields", 2)
    return GResidualBlock(group, shape, **kw)


def trained(group, shape=(2, 4, 4), steps=3, **kw):
    """A block after a few optimiser steps, so its weights are not at initialisation."""
    b = block(group, shape, **kw)
    opt = torch.optim.Adam(b.parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn(8, *shape)
        y, ld = b(x)
        loss = (0.5 * y.pow(2).sum((1, 2, 3)) - ld).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", GROUPS)
def test_reconstruction(group, shape):
    b = trained(group, shape).eval()
    x = torch.randn(4, *shape)
    assert max_reconstruction_error(b, x) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", GROUPS)
def test_exact_logdet_matches_autograd_jacobian(group, shape):
    b = trained(group, shape).eval()
    x = torch.randn(3, *shape)
    assert math.prod(shape) <= 64
    with logdet_mode(b, "exact"):
        _, ld = b(x)
        reference = autograd_logdet(b, x)
    assert torch.allclose(ld, reference, atol=1e-4), (ld, reference)
    # The inverse reports minus the forward log-det at the preimage.
    with logdet_mode(b, "exact"), torch.no_grad():
        z, _ = b(x)
        _, ld_inv = b.inverse(z)
    assert torch.allclose(ld_inv, -ld, atol=1e-4)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("group", GROUPS)
def test_estimator_is_unbiased(group, training):
    """The Russian-roulette estimator is stochastic: its mean is checked to 3 standard errors."""
    b = trained(group).train(training)
    x = torch.randn(1, 2, 4, 4)
    with logdet_mode(b, "exact"), torch.no_grad():
        exact = float(b(x)[1])
    # One roulette draw per call is shared by the batch, so calls (not rows) are the independent
    # draws: average each call, then take the standard error over calls.
    with torch.no_grad():
        means = torch.stack([b(x.expand(32, -1, -1, -1))[1].mean() for _ in range(200)])
    se = float(means.std() / math.sqrt(len(means)))
    assert abs(float(means.mean()) - exact) <= 3 * se, (float(means.mean()), exact, se)
    assert se < 0.05  # the check has power: the estimator is not wildly noisy


def _flat_grad(out, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(out, params, materialize_grads=True)])


BRANCHES = {
    "lipswish": lambda group: trained(group, n_exact_terms=6),
    "odd": lambda group: trained(group, n_exact_terms=6, sign_symmetric=True),  # the lattice samplers'
    "fc": lambda group: trained_fc(group, n_exact_terms=6),
    "fc-squeezed": lambda group: trained_fc(group, (8, 2, 2), n_exact_terms=6, squeeze_levels=1),
}


@pytest.mark.parametrize("branch", list(BRANCHES))
@pytest.mark.parametrize("group", GROUPS)
def test_neumann_gradient_with_exact_trace_probes_is_exact(group, branch, monkeypatch):
    """Averaged over the probes sqrt(D) e_i (for which mean v v^T = I exactly) the Neumann-series
    gradient equals the exact gradient: the only randomness left is the unbiased roulette, whose
    tail after 16 exact terms is negligible (after 6 it reached 1e-4 at some seeds). Every branch
    takes its Jacobian from its layers."""
    b = BRANCHES[branch](group)
    b.n_exact_terms = 16
    assert is_linearisable(b.g)
    x = torch.randn(1, *b.event_shape)
    params = [p for p in b.parameters() if p.requires_grad]
    with logdet_mode(b, "exact"):
        exact = _flat_grad(b(x)[1].sum(), params)
    d = x.numel()
    monkeypatch.setattr(b, "_probe", lambda t, rows=None: (torch.eye(d) * math.sqrt(d)).view(d, *x.shape[1:]))
    _, ld = b(x.expand(d, -1, -1, -1))
    assert torch.allclose(_flat_grad(ld.mean(), params), exact, atol=1e-5)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
@pytest.mark.parametrize("probe_fraction", [1.0, 0.25])
@pytest.mark.parametrize("group", GROUPS)
def test_neumann_gradient_is_unbiased_with_random_probes(group, probe_fraction, probe):
    """Random probes and roulette: the mean over 100 draws of the gradient projected on a random
    direction lies within 3 standard errors of the exact projection; also with a quarter of the
    entries probed (scaled by 2, the rest with zero probes)."""
    b = trained(group, probe_fraction=probe_fraction, probe=probe)
    x = torch.randn(1, 2, 4, 4)
    params = [p for p in b.parameters() if p.requires_grad]
    with logdet_mode(b, "exact"):
        exact = _flat_grad(b(x)[1].sum(), params)
    direction = torch.randn_like(exact)
    draws = torch.stack(
        [_flat_grad(b(x.expand(16, -1, -1, -1))[1].mean(), params) @ direction for _ in range(100)]
    )
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean() - exact @ direction)) <= 3 * se
    assert se < 0.1 * float(exact.norm() * direction.norm())


@pytest.mark.parametrize("probe_fraction", [1.0, 0.5])
@pytest.mark.parametrize("group", GROUPS)
def test_memory_saving_matches_plain_backward(group, probe_fraction):
    b = trained(group, probe_fraction=probe_fraction)
    update_lipschitz(b)  # so that neither run below refreshes (and draws random numbers) first
    x = torch.randn(4, 2, 4, 4, requires_grad=True)
    grads = []
    for saving in (False, True):
        b.memory_saving = saving
        torch.manual_seed(1)
        y, ld = b(x)
        loss = (0.5 * y.pow(2).sum((1, 2, 3)) - ld).mean()
        grads.append(torch.autograd.grad(loss, [x, *b.parameters()]))
    for g0, g1 in zip(*grads, strict=True):
        assert torch.allclose(g0, g1, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch", [8, 7])
@pytest.mark.parametrize("group", GROUPS)
def test_sparse_probes_keep_every_entry_unbiased(group, batch):
    """probe_fraction = 1/4: each training pass probes 2 of the entries and gives the others the
    estimate 0 (of 8: one of 4 blocks of consecutive entries; of 7: 2 entries at random); over 1,000
    passes every entry's mean estimate lies within 4 standard errors of the exact log-det
    (stochastic and heavy-tailed, with the roulette: a bound, with a check that it has power)."""
    b = trained(group, probe_fraction=0.25).train()
    x = torch.randn(1, 2, 4, 4)
    with logdet_mode(b, "exact"), torch.no_grad():
        exact = float(b(x)[1])
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([b(x.expand(batch, -1, -1, -1))[1] for _ in range(1000)])
    assert bool(((draws != 0).sum(1) == 2).all())
    probed = (draws != 0).nonzero()[:, 1].view(-1, 2)
    assert bool((probed[:, 1] - probed[:, 0] == 1).all()) == (batch == 8)  # blocks where 2 divides 8
    se = draws.std(0) / math.sqrt(len(draws))
    assert bool(((draws.mean(0) - exact).abs() <= 4 * se).all()), (draws.mean(0), exact, se)
    assert float(se.max()) < 0.1


@pytest.mark.parametrize("group", GROUPS)
def test_evaluation_probes_every_entry(group):
    """The probe fraction is a training option: in evaluation the same draws give the same
    log-dets with any fraction."""
    b = trained(group).eval()
    x = torch.randn(6, 2, 4, 4)
    with torch.no_grad():
        b(x)  # the certifying refresh of evaluation draws its own random numbers, once
    outs = []
    for fraction in (1.0, 0.25):
        b.probe_fraction = fraction
        torch.manual_seed(3)
        with torch.no_grad():
            outs.append(b(x)[1])
    assert torch.equal(outs[0], outs[1]) and bool((outs[0] != 0).all())


@pytest.mark.parametrize("probe_fraction", [1.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rademacher_probes_are_signs(probe_fraction, dtype):
    """Rademacher probes: every probed entry +-sqrt(B / m), half of each sign on average (so
    E[v v^T] = I), in the input's dtype; the other entries 0."""
    b = block("trivial", probe="rademacher", probe_fraction=probe_fraction).to(dtype)
    x = torch.randn(8, 2, 4, 4, dtype=dtype)
    rows = b._probed_rows(x, gflows.nn.linearised.linearise(b.g, x)[1]) if probe_fraction < 1 else None
    torch.manual_seed(0)
    v = torch.cat([b._probe(x, rows) for _ in range(100)])
    scale = math.sqrt(1 / probe_fraction)
    assert v.dtype == dtype and bool((v.abs() == scale).all())
    assert abs(float((v > 0).double().mean()) - 0.5) < 0.01  # 256,000 signs or 64,000: SE 0.001-0.002


def test_unknown_probe_is_refused():
    with pytest.raises(ValueError, match="unknown probe 'sobol'"):
        block("trivial", probe="sobol")


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_probe_fraction_out_of_range_is_refused(fraction):
    with pytest.raises(ValueError, match="probe_fraction must lie in"):
        block("trivial", probe_fraction=fraction)


def test_memory_saving_refuses_unequal_weights():
    b = block("trivial", memory_saving=True)
    _, ld = b(torch.randn(3, 2, 4, 4))
    with pytest.raises(RuntimeError, match="weighs every sample"):
        (ld * torch.tensor([1.0, 2.0, 3.0])).sum().backward()


@pytest.mark.parametrize("group", GROUPS)
def test_equivariance_and_invariant_log_prob(group):
    flow = gflows.Flow(gflows.Compose(trained(group), gflows.ActNorm((2, 4, 4)), trained(group)))
    flow.eval()
    G = gflows.Group(group)
    x = torch.randn(3, 2, 4, 4)
    assert max_equivariance_error(flow.transform, G, x) <= 1e-5
    with logdet_mode(flow, "exact"):
        lp = flow.log_prob(x)
        for g in G.grid_elements:
            assert torch.allclose(flow.log_prob(G.act(g, x)), lp, atol=1e-4)


@pytest.mark.parametrize("group", GROUPS)
def test_lipschitz_bound_counts_unscaled_activations(group):
    """The bound is c^3 whether LipSwish divides by 1.1 or the next filter does; an unscaled
    LipSwish whose division no layer takes raises the bound by 1.1."""
    b = block(group)
    assert math.isclose(b.lipschitz_bound, b.coeff**3, rel_tol=1e-12)
    for m in b.modules():
        m.__dict__.pop("input_scale", None)  # the filters no longer take the 1 / 1.1
    assert math.isclose(b.lipschitz_bound, b.coeff**3 * 1.1**2, rel_tol=1e-12)


@pytest.mark.parametrize("activation", ["lipswish", "tanh"])
@pytest.mark.parametrize("group", GROUPS)
def test_lipschitz_bound_after_training(group, activation):
    """Each normalised convolution's operator norm, from its dense matrix, is at most c + 1e-3 (times
    the 1 / 1.1 that the convolutions after a LipSwish take from it), and so is J_g's."""
    b = trained(group, steps=5, activation=activation)
    convs = [m for m in b.modules() if isinstance(m, LipschitzGConv2d)]
    scale = 1 / 1.1 if activation == "lipswish" else 1.0
    assert [conv.input_scale for conv in convs] == [1.0, scale, scale]
    assert is_linearisable(b.g) and math.isclose(b.lipschitz_bound, b.coeff**3)
    for conv in convs:
        with torch.no_grad():
            w, _ = conv.normalised()
        shape = (conv.in_channels, 4, 4)
        dense = torch.autograd.functional.jacobian(
            lambda u, conv=conv, w=w, shape=shape: conv.conv(u.view(1, *shape), w).flatten(),
            torch.zeros(math.prod(shape)),
        )
        assert float(torch.linalg.matrix_norm(dense, ord=2)) <= b.coeff * conv.input_scale + 1e-3
    # And the whole branch: the largest singular value of J_g at random points.
    for _ in range(3):
        x = torch.randn(math.prod((2, 4, 4)))
        jac = torch.autograd.functional.jacobian(lambda v: b.g(v.view(1, 2, 4, 4)).flatten(), x)
        assert float(torch.linalg.matrix_norm(jac, ord=2)) <= b.coeff + 1e-3


def test_inverse_refuses_to_return_unconverged_result():
    b = trained("c4", max_iters=2, atol=0.0, rtol=0.0)
    z = torch.randn(2, 2, 4, 4)
    with pytest.raises(ConvergenceError, match=r"max \|f\(x\) - y\| = "):
        b.inverse(z)


@pytest.mark.parametrize("group", GROUPS)
def test_bad_input(group):
    b = block(group)
    for x, err, word in bad_inputs((2, 4, 4)):
        with pytest.raises(err, match=word):
            b(x)
        with pytest.raises(err, match=word):
            b.inverse(x)


def test_bad_settings():
    with pytest.raises(ValueError, match="coeff"):
        block("c4", coeff=1.0)
    with pytest.raises(ValueError, match="logdet"):
        block("c4", logdet="approximate")
    with pytest.raises(ValueError, match="unknown group"):
        block("c4x")
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        block("c4", activation="relu")


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("group", ["c4", "d4"])
def test_squeezed_block_is_equivariant_for_the_true_representation(group, levels):
    torch.manual_seed(0)
    shape = (2 * 4**levels, 2, 2)
    b = trained(group, shape, squeeze_levels=levels).eval()
    G = gflows.Group(group)
    x = torch.randn(2, *shape)
    assert max_equivariance_error(b, G, x, squeezed_act(G, levels)) <= 1e-5 * levels
    assert max_reconstruction_error(b, x) <= 1e-5
    with logdet_mode(b, "exact"):
        assert torch.allclose(b(x)[1], autograd_logdet(b, x), atol=1e-4)


def trained_fc(group, shape=(2, 4, 4), steps=3, **kw):
    b = GFCResidualBlock(group, shape, hidden=16, **kw)
    opt = torch.optim.Adam(b.parameters(), lr=0.05)
    for _ in range(steps):
        y, ld = b(torch.randn(8, *shape))
        loss = (0.5 * y.pow(2).sum((1, 2, 3)) - ld).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return b


@pytest.mark.parametrize("group", GROUPS + ["c8"])
def test_fc_block_equivariance_inverse_and_exact_logdet(group):
    b = trained_fc(group).eval()
    G = gflows.Group(group)
    x = torch.randn(3, 2, 4, 4)
    # exact for the grid-exact elements (all of C4 / D4, the C4 inside C8)
    assert max_equivariance_error(b, G, x) <= 1e-5
    assert max_reconstruction_error(b, x) <= 1e-5
    with logdet_mode(b, "exact"):
        _, ld = b(x)
        assert torch.allclose(ld, autograd_logdet(b, x), atol=1e-4)
        assert ld.abs().max() > 1e-3  # not the identity
        for g in G.grid_elements:
            assert torch.allclose(b(G.act(g, x))[1], ld, atol=1e-4)


@pytest.mark.parametrize("group", ["trivial", "d4"])
def test_fc_block_lipschitz_bound(group):
    """Each matrix has norm <= c, and the Jacobian of the whole branch at random points <= c^3."""
    b = trained_fc(group, steps=5)
    lins = [m for m in b.modules() if isinstance(m, LipschitzLinear)]
    assert len(lins) == 3 and math.isclose(b.lipschitz_bound, b.coeff**3)
    for lin in lins:
        w, _ = lin.normalised()
        assert float(torch.linalg.matrix_norm(w.detach(), ord=2)) <= b.coeff + 1e-3
    for _ in range(3):
        x = torch.randn(32)
        jac = torch.autograd.functional.jacobian(lambda v: b.g(v.view(1, 2, 4, 4)).flatten(), x)
        assert float(torch.linalg.matrix_norm(jac, ord=2)) <= b.lipschitz_bound + 1e-3


def test_squeezed_fc_block_is_equivariant_for_the_true_representation():
    b = trained_fc("d4", (8, 2, 2), squeeze_levels=1).eval()
    G = gflows.Group("d4")
    x = torch.randn(2, 8, 2, 2)
    assert max_equivariance_error(b, G, x, squeezed_act(G)) <= 1e-5
    # the plain (scalar-field) action is not a symmetry of the squeezed block: the check can fail
    assert max_equivariance_error(b, G, x) > 1e-3


def test_fc_block_bad_settings():
    with pytest.raises(ValueError, match="coeff"):
        GFCResidualBlock("d4", (2, 4, 4), coeff=1.5)
    with pytest.raises(ValueError, match="hidden"):
        GFCResidualBlock("d4", (2, 4, 4), hidden=0)
    with pytest.raises(ValueError, match="sub-pixels"):
        GFCResidualBlock("d4", (6, 2, 2), squeeze_levels=1)


# -- gradients of the fixed-point inverse (implicit differentiation) --------------------------------


def exact_block(group, shape=(1, 4, 4), **kw):
    """A float64 block off its initialisation, solved to float64 round-off, with the exact log-det."""
    torch.manual_seed(0)
    b = trained(group, shape, atol=1e-13, rtol=1e-13, logdet="exact", **kw).double()
    update_lipschitz(b, certify=True)
    return b


def params_of(b):
    return [p for p in b.parameters() if p.requires_grad]


@pytest.mark.parametrize("group", ["trivial", "d4"])
@pytest.mark.parametrize("sign_symmetric", [False, True])
def test_inverse_gradients_match_autograd_through_the_unrolled_iteration(group, sign_symmetric):
    b = exact_block(group, sign_symmetric=sign_symmetric)
    z = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    x, ladj = b.inverse(z)
    implicit = torch.autograd.grad((x * w).sum() + ladj.sum(), [z, *params_of(b)], allow_unused=True)
    xu = z
    for _ in range(300):  # the same fixed point, differentiated step by step
        xu = z - b.g(xu)
    _, ladj_fwd = b(xu)
    unrolled = torch.autograd.grad((xu * w).sum() - ladj_fwd.sum(), [z, *params_of(b)], allow_unused=True)
    assert any(gu is not None and float(gu.abs().max()) > 1e-3 for gu in unrolled[1:])
    for gi, gu in zip(implicit, unrolled, strict=True):
        assert (gi is None) == (gu is None)
        if gi is not None:
            assert torch.allclose(gi, gu, atol=1e-10, rtol=1e-9)


def test_inverse_gradients_match_finite_differences():
    b = exact_block("c4")
    # Filters inside the bound (sigma < c: no rescaling), so that the finite differences do not see
    # the spectral-norm estimate's refresh noise, which central differences divide by 2 eps.
    convs = [m for m in b.modules() if isinstance(m, LipschitzGConv2d)]
    with torch.no_grad():
        for m in convs:  # the filter is linear in its basis weights
            m.basis_weights.mul_(0.5 * m.coeff / float(m.sigma))
    update_lipschitz(b, certify=True)
    assert convs and all(float(m.sigma) < m.coeff for m in convs)
    z = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: b.inverse(z)[0], (z,), eps=1e-6, atol=1e-6)
    # Along a random direction d of the parameters: d/de L(theta + e d) by central differences.
    params = params_of(b)
    direction = [torch.randn_like(p) for p in params]
    w = torch.randn(2, 1, 4, 4, dtype=torch.float64)

    def loss() -> torch.Tensor:
        x, ladj = b.inverse(z.detach())
        return (x * w).sum() + ladj.sum()

    grads = torch.autograd.grad(loss(), params)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
    eps, values = 1e-5, []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
        update_lipschitz(b, certify=True)
        with torch.no_grad():
            values.append(float(loss()))
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-7)


@pytest.mark.parametrize("group", ["trivial", "d4"])
def test_jacobian_of_the_inverse_is_the_inverse_jacobian(group):
    """zuko's check: d f^-1 / dy at y = f(x) is (d f / dx)^-1."""
    b = exact_block(group)
    x = torch.randn(1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y = b(x[None])[0][0]
    jac = torch.autograd.functional.jacobian(lambda v: b(v.view(1, 1, 4, 4))[0].reshape(-1), x.reshape(-1))
    jac_inv = torch.autograd.functional.jacobian(lambda v: b.inverse(v.view(1, 1, 4, 4))[0].reshape(-1),
                                                 y.reshape(-1))
    assert torch.allclose(jac_inv, torch.linalg.inv(jac), atol=1e-10)


def test_backward_solve_that_does_not_converge_raises():
    b = exact_block("trivial")
    z = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    x, _ = b.inverse(z)
    b.max_iters = 1
    with pytest.raises(ConvergenceError, match=r"backward solve .*did not converge in 1 iterations"):
        x.sum().backward()


def test_inverse_without_gradients_builds_no_graph():
    b = block("d4")
    with torch.no_grad():
        x, ladj = b.inverse(torch.randn(2, 2, 4, 4))
    assert not x.requires_grad and not ladj.requires_grad


def test_reverse_kl_trains_a_residual_flow_on_a_gaussian():
    """Samples and their log-density carry gradients, so reverse KL reaches a correlated Gaussian."""
    torch.manual_seed(0)

    def res_block():
        g = torch.nn.Sequential(LipschitzLinear(2, 32, coeff=0.9), LipSwish(32),
                                LipschitzLinear(32, 2, coeff=0.9))
        return gflows.ResidualTransform(g, (2,), logdet="exact")

    flow = gflows.Flow(gflows.Compose(res_block(), res_block()))
    target = torch.distributions.MultivariateNormal(torch.tensor([0.5, -0.3]),
                                                    torch.tensor([[1.0, 0.5], [0.5, 1.0]]))

    def ess() -> float:
        with torch.no_grad():
            x, lq = flow.sample_and_log_prob(4096)
        return ess_of(target.log_prob(x) - lq)

    before = ess()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(200):
        x, lq = flow.sample_and_log_prob(256)
        loss = (lq - target.log_prob(x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # over 12 seeds: 0.45-0.68 before, 0.975-0.998 after 200 steps (Adam at a constant 1e-2 keeps
    # the last steps noisy), so 0.97 holds at any seed and still needs the training
    assert before < 0.8
    assert ess() >= 0.97


def test_sign_symmetric_block_is_odd():
    b = exact_block("d4", sign_symmetric=True)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y, ld = b(x)
    y_neg, ld_neg = b(-x)
    assert torch.allclose(y_neg, -y, atol=1e-13) and torch.allclose(ld_neg, ld, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probe_is_drawn_contiguous_for_permuted_inputs(dtype):
    """Hutchinson probes come out contiguous, with the input's shape and dtype, whatever its
    strides (sampling into a permuted layout is about 9x slower on the CPU), and with unit variance."""
    torch.manual_seed(0)
    x = torch.randn(64, 8, 4, 3, dtype=dtype).permute(0, 3, 1, 2)  # [64, 3, 8, 4], not contiguous
    v = block("trivial", (3, 8, 4))._probe(x)
    assert v.is_contiguous() and v.shape == x.shape and v.dtype == dtype
    assert abs(float(v.square().mean()) - 1) < 0.05  # 6,144 draws: standard error 0.018


@pytest.mark.parametrize("activation", ["lipswish", "tanh"])
@pytest.mark.parametrize("group", GROUPS)
def test_channels_last_branch_is_the_same_map(group, activation):
    """On CPU a block of at least 16 x 16 pixels runs its branch, probe and Jacobian products
    channels-last (faster there): the same output, log-det estimate (the same probe numbers) and
    gradients as in the plain layout, to float64 round-off, in training and in evaluation; the
    output comes back in the plain layout."""
    from gflows.nn.equivariant import GConvNet

    b = trained(group, (4, 16, 16), steps=1, activation=activation).double()
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    assert b._prefers_channels_last(x) and not b._prefers_channels_last(x[..., :8, :8])
    params = [p for p in b.parameters() if p.requires_grad]

    def run(channels_last: bool, training: bool):
        for m in b.modules():
            if isinstance(m, GConvNet):
                m.CHANNELS_LAST_PIXELS = GConvNet.CHANNELS_LAST_PIXELS if channels_last else 10**9
        b.train(training)
        torch.manual_seed(1)
        xg = x.clone().requires_grad_(True)
        y, ld = b(xg)
        grads = torch.autograd.grad((y.square().sum() + ld.sum()), [xg, *params]) if training else ()
        return y.detach(), ld.detach(), grads

    for training in (True, False):
        run(False, training)  # the spectral-norm refresh (which draws noise) done before both
        (y, ld, grads), (y_ref, ld_ref, grads_ref) = run(True, training), run(False, training)
        assert y.is_contiguous()
        assert torch.allclose(y, y_ref, rtol=0, atol=1e-12) and torch.allclose(ld, ld_ref, rtol=0, atol=1e-12)
        for g, r in zip(grads, grads_ref, strict=True):
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_exact_terms", [1, 3])
@pytest.mark.parametrize("group", ["trivial", "d4"])
def test_series_through_the_layers_jacobian_matches_autograd(group, n_exact_terms, monkeypatch):
    """The series and the surrogate through ``g``'s own Jacobian (``J^T w`` products and a
    differentiable ``J v``) and through autograd (``J^T w`` by ``autograd.grad`` and the surrogate
    ``(J^T u)^T v``) draw the same estimator: for the same probe and roulette draw, the same estimate
    and the same gradients, to float64 round-off."""
    import gflows.transforms.residual as residual

    b = trained(group, n_exact_terms=n_exact_terms).double()
    update_lipschitz(b, certify=True)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    params = params_of(b)

    def run():
        torch.manual_seed(2)
        xg = x.clone().requires_grad_(True)
        y, ld = b(xg)
        return ld.detach(), torch.autograd.grad(y.square().sum() + ld.sum(), [xg, *params])

    ld, grads = run()
    monkeypatch.setattr(residual, "linearise", lambda g, x: (g(x), None))
    ld_ref, grads_ref = run()
    assert torch.allclose(ld, ld_ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, grads_ref, strict=True):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)

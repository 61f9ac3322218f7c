import math

import pytest
import torch
from conftest import GROUPS

from gflows.nn.lipschitz import (
    LipschitzGConv2d,
    LipschitzLinear,
    lipschitz_layers,
    operator_norm,
    update_lipschitz,
)


def dense_norm(conv, weight, shape):
    mat = torch.autograd.functional.jacobian(lambda u: conv.conv(u.view(1, *shape), weight).flatten(),
                                             torch.zeros(math.prod(shape), dtype=weight.dtype))
    return float(torch.linalg.matrix_norm(mat, ord=2))


def quick_layer(layer: str, dtype: torch.dtype):
    """A D4 convolution or a dense layer bounded by 0.5, refreshed by one iteration in training."""
    if layer == "conv":
        return LipschitzGConv2d("d4", (1, "scalar"), (2, "regular"), 3, input_hw=(4, 4), coeff=0.5,
                                train_iters=1).to(dtype)
    return LipschitzLinear(6, 5, coeff=0.5, train_iters=1).to(dtype)


def sgd_steps(conv, n: int):
    """``n`` SGD steps that push the filter's norm up, each followed by ``update_lipschitz``."""
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    for i in range(n):
        loss = -conv(torch.randn(4, 1, 4, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_lipschitz(conv)
        yield i


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("group", GROUPS)
def test_power_iteration_finds_the_true_operator_norm(group, padding_mode):
    conv = LipschitzGConv2d(group, (2, "scalar"), (2, "regular"), 3, padding_mode, input_hw=(5, 5),
                            coeff=100.0)
    w, _ = conv.expanded()
    with torch.no_grad():
        conv.update()
    truth = dense_norm(conv, w.detach(), (2, 5, 5))
    assert abs(float(conv.sigma) - truth) <= 1e-3 * truth
    # The reshaped-kernel norm of torch's spectral_norm is a different (wrong) quantity here.
    kernel_norm = float(torch.linalg.matrix_norm(w.detach().flatten(1), ord=2))
    assert abs(kernel_norm - truth) > 1e-2 * truth


@pytest.mark.parametrize("group", GROUPS)
def test_normalised_filter_respects_the_bound_after_optimiser_steps(group):
    conv = LipschitzGConv2d(group, (1, "scalar"), (2, "regular"), 3, input_hw=(4, 4), coeff=0.5)
    for _ in sgd_steps(conv, 4):
        w, _ = conv.normalised()
        assert dense_norm(conv, w.detach(), (1, 4, 4)) <= 0.5 + 1e-3


def test_estimate_refreshes_when_weights_change_without_update_call():
    conv = LipschitzGConv2d("c4", (1, "scalar"), (1, "regular"), 3, input_hw=(4, 4), coeff=0.5)
    conv.eval()
    conv(torch.randn(1, 1, 4, 4))
    with torch.no_grad():
        conv.basis_weights.mul_(10)
    w, _ = conv.normalised()
    assert dense_norm(conv, w.detach(), (1, 4, 4)) <= 0.5 + 1e-3


def test_operator_norm_of_a_known_map():
    scale = torch.tensor([3.0, 1.0, 0.5]).view(1, 3, 1, 1)
    assert abs(operator_norm(lambda u: u * scale, (1, 3, 2, 2)) - 3.0) < 1e-4


@pytest.mark.parametrize("shape", [(12, 5), (3, 40)])
def test_linear_layer_respects_the_true_matrix_norm(shape):
    torch.manual_seed(0)
    lin = LipschitzLinear(shape[1], shape[0], coeff=0.7)
    with torch.no_grad():
        lin.weight.mul_(5)  # well above the bound, so the normalisation has work to do
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    for _ in range(3):
        loss = -lin(torch.randn(8, shape[1])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        w, _ = lin.normalised()
        norm = float(torch.linalg.matrix_norm(w.detach(), ord=2))
        assert 0.7 - 1e-3 <= norm <= 0.7 + 1e-3  # scaled exactly onto the bound, not below it
    truth = float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2))
    assert abs(float(lin.sigma) - truth) < 1e-3 * truth


def test_linear_layer_below_the_bound_is_unchanged():
    lin = LipschitzLinear(4, 4, coeff=0.9)
    with torch.no_grad():
        lin.weight.copy_(0.5 * torch.eye(4))
    w, _ = lin.normalised()
    assert torch.allclose(w, 0.5 * torch.eye(4))


def test_layers_move_with_to():
    conv = LipschitzGConv2d("c4", (1, "scalar"), (1, "regular"), 3, input_hw=(4, 4), coeff=0.5)
    conv = conv.to(torch.float64)
    lin = LipschitzLinear(4, 3, coeff=0.5).to(torch.float64)
    assert conv(torch.randn(2, 1, 4, 4, dtype=torch.float64)).dtype == torch.float64
    assert lin(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64
    assert conv.u.dtype == lin.u.dtype == torch.float64


@pytest.mark.parametrize("group", GROUPS)
def test_quick_training_refreshes_are_certified_in_evaluation_mode(group):
    """With train_iters, training-mode refreshes run that many iterations (an approximation the
    docstring states); the first evaluation-mode forward refreshes to the tolerance, after which
    the true operator norm respects the bound."""
    torch.manual_seed(0)
    conv = LipschitzGConv2d(group, (1, "scalar"), (2, "regular"), 3, input_hw=(4, 4), coeff=0.5,
                            train_iters=2)
    for _ in sgd_steps(conv, 3):
        assert conv.last_iterations == 2
    conv.eval()
    with torch.no_grad():
        conv(torch.randn(1, 1, 4, 4))
    assert conv.last_iterations > 2
    w, _ = conv.normalised()
    assert dense_norm(conv, w.detach(), (1, 4, 4)) <= 0.5 + 1e-3
    # update_lipschitz(certify=True) does the same without leaving training mode
    conv.train()
    for _ in sgd_steps(conv, 2):
        assert conv.last_iterations == 2
    update_lipschitz(conv, certify=True)
    assert conv.training and conv.last_iterations > 2
    w, _ = conv.normalised()
    assert dense_norm(conv, w.detach(), (1, 4, 4)) <= 0.5 + 1e-3
    with pytest.raises(ValueError, match="train_iters"):
        LipschitzGConv2d(group, (1, "scalar"), (1, "scalar"), 3, input_hw=(4, 4), train_iters=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_quick_refreshes_converge_to_the_true_norm(layer, dtype):
    """Quick training refreshes (``train_iters=1``: half an iteration from the stored ``v``, then
    ``v`` from ``W u``) are a power iteration spread over steps: on a filter that no longer moves,
    sigma climbs to the true operator norm (from below, up to the refresh noise's O(noise^2))."""
    torch.manual_seed(1)
    m = quick_layer(layer, dtype)
    m.normalised()  # a certified start for the filter as initialised
    with torch.no_grad():
        p = next(m.parameters())
        p.copy_(torch.randn_like(p))  # a new filter, far from the estimate's
    w, _ = m._raw()
    w = w.detach()
    if layer == "conv":
        true = dense_norm(m, w, (1, 4, 4))
    else:
        true = float(torch.linalg.matrix_norm(w, ord=2))
    sigmas = []
    for _ in range(300):
        m.mark_stale()
        m.normalised()
        sigmas.append(float(m.sigma))
    assert m.last_iterations == 1
    assert abs(sigmas[-1] - true) <= 1e-3 * true
    assert sigmas[-1] <= true * (1 + 1e-4)


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_relaxed_filters_respect_the_bound_on_the_true_operator(group):
    """The bound holds for the whole relaxed filter ``W_G + relax V`` (measured on the operator)."""
    conv = LipschitzGConv2d(group, (1, "scalar"), (2, "regular"), 3, input_hw=(4, 4), coeff=0.5, relax=1.0)
    with torch.no_grad():
        conv.free_weight.normal_()
    for _ in sgd_steps(conv, 3):
        w, _ = conv.normalised()
        assert dense_norm(conv, w.detach(), (1, 4, 4)) <= 0.5 + 1e-3
    assert float(conv.free_weight.abs().max()) > 0


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("kernel_size, basis", [(1, "auto"), (3, "auto"), (5, "escnn")])
def test_adjoint_is_the_vector_jacobian_product(kernel_size, basis, padding_mode):
    """The adjoint (a convolution with the flipped, transposed filter and the same padding) is exact."""
    torch.manual_seed(kernel_size)
    conv = LipschitzGConv2d("trivial", (3, "scalar"), (5, "scalar"), kernel_size, padding_mode,
                            input_hw=(6, 6), basis=basis).double()
    w, _ = conv.expanded()
    w = w.detach()
    v = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    _, vjp = torch.func.vjp(lambda u: conv.conv(u, w), torch.zeros(2, 3, 6, 6, dtype=torch.float64))
    assert torch.allclose(conv._adjoint(w)(v), vjp(v)[0], atol=1e-12)


def test_lipschitz_layers_lists_every_spectral_normalised_layer_in_order():
    a, b = LipschitzGConv2d("c4", (1, "scalar"), (1, "regular"), 3, input_hw=(4, 4)), LipschitzLinear(4, 4)
    model = torch.nn.Sequential(a, torch.nn.Sequential(torch.nn.Identity(), b))
    assert lipschitz_layers(model) == [a, b]
    assert lipschitz_layers(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_tracked_refresh_applies_the_map_once_and_matches_the_plain_refresh(layer, dtype):
    """With gradients, a refresh leaves its last application of the map to the differentiable
    sigma (one application per refresh and step): ``u``, ``v``, ``sigma`` and the normalised weight
    equal those of a refresh that applies it itself, to round-off."""
    import copy

    torch.manual_seed(0)
    m = quick_layer(layer, dtype)
    m.normalised()  # initialise
    with torch.no_grad():
        next(m.parameters()).mul_(3.0)  # stale: the next call refreshes
    ref = copy.deepcopy(m)
    calls = []
    original = m._linear_map
    m._linear_map = lambda x, w: calls.append(1) or original(x, w)
    rng = torch.get_rng_state()
    w, _ = m.normalised()
    torch.set_rng_state(rng)  # the same refresh noise for the reference
    with torch.no_grad():
        ref.update()
    w_ref, _ = ref.normalised()
    # train_iters=1: half an iteration from the stored v (the adjoint only), then the differentiable sigma
    assert len(calls) == 1
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in ((m.u, ref.u), (m.v, ref.v), (m.sigma, ref.sigma), (w, w_ref)):
        assert torch.allclose(a, b, rtol=tol, atol=tol)
    assert w.requires_grad and w.grad_fn is not None


def test_lazy_update_after_a_fused_optimiser_step():
    """Fused Adam changes the filter without bumping version counters, so the layer cannot notice;
    ``update_lipschitz(lazy=True)`` marks it stale and the next forward pass refreshes, after which
    the true operator norm is within the bound again."""
    torch.manual_seed(0)
    conv = LipschitzGConv2d("c4", (1, "scalar"), (2, "regular"), 3, input_hw=(4, 4), coeff=0.5)
    opt = torch.optim.Adam(conv.parameters(), lr=0.5, fused=True)
    conv(torch.randn(2, 1, 4, 4))
    seen = conv._seen
    for p in conv.parameters():
        p.grad = -torch.ones_like(p)  # grow every filter weight
    opt.step()
    assert conv._seen == conv._state() == seen  # invisible to the version counters
    update_lipschitz(conv, lazy=True)
    conv(torch.randn(2, 1, 4, 4))
    w, _ = conv.normalised()
    assert dense_norm(conv, w.detach(), (1, 4, 4)) <= 0.5 + 1e-3


def test_mark_fresh_keeps_a_loaded_estimate():
    """Loading a state dict marks the estimate stale; ``mark_fresh`` takes it as loaded (no refresh in
    the next pass, the same filter as the saved layer's); a layer that never refreshed stays stale."""
    torch.manual_seed(0)
    conv = LipschitzGConv2d("c4", (1, "scalar"), (2, "regular"), 3, input_hw=(4, 4), coeff=0.5, train_iters=1)
    new = LipschitzGConv2d("c4", (1, "scalar"), (2, "regular"), 3, input_hw=(4, 4), coeff=0.5, train_iters=1)
    new.mark_fresh()
    assert new._seen is None
    x = torch.randn(2, 1, 4, 4)
    conv(x)
    new.load_state_dict(conv.state_dict())
    assert new._seen is None
    new.mark_fresh()
    calls = []
    original = LipschitzGConv2d.update
    LipschitzGConv2d.update = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        assert torch.equal(new(x), conv(x)) and not calls
    finally:
        LipschitzGConv2d.update = original

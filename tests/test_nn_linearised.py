import pytest
import torch
from conftest import GROUPS
from torch import nn

from gflows.nn.equivariant import GConv2d, GConvNet, GroupAveraged, LipSwish, Tanh
from gflows.nn.linearised import Sequential, linearise
from gflows.nn.lipschitz import LipschitzGConv2d, LipschitzLinear
from gflows.nn.squeezed import AtFineGrid

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def stack(group, padding_mode="zeros", lipschitz=False, relax=0.0, kernel_sizes=(3, 1, 3),
          dtype=torch.float64, odd=False):
    """A GConvNet away from its initialisation (random LipSwish slopes, and free filter parts);
    ``odd``: the lattice samplers' odd branch (tanh, no biases)."""
    conv, kwargs = GConv2d, {"relax": relax}
    if lipschitz:
        conv, kwargs = LipschitzGConv2d, {"relax": relax, "input_hw": (6, 6), "coeff": 0.9}
    odd_kwargs = {"activation": lambda n, f: Tanh(), "bias": False} if odd else {}
    net = GConvNet(group, 2, 2, hidden_fields=2, kernel_sizes=kernel_sizes, padding_mode=padding_mode,
                   conv=conv, conv_kwargs=kwargs, **odd_kwargs).to(dtype)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LipSwish):
                m.rho.copy_(torch.randn_like(m.rho))
            if relax and isinstance(m, GConv2d):
                m.free_weight.copy_(torch.randn_like(m.free_weight) * 0.1)
    return net


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


CASES = [dict(), dict(padding_mode="circular"), dict(lipschitz=True), dict(relax=0.5),
         dict(padding_mode="circular", lipschitz=True, odd=True), dict(kernel_sizes=(1, 3))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("group", GROUPS)
def test_vjp_and_jvp_are_the_jacobians(group, case, dtype):
    """The output is forward's, bit for bit; ``vjp`` is autograd's vector-Jacobian product and ``jvp``
    the Jacobian-vector product (both exact maps: to round-off)."""
    torch.manual_seed(0)
    net = stack(group, dtype=dtype, **case)
    x = torch.randn(3, 2, 6, 6, dtype=dtype, requires_grad=True)
    assert_gives_its_jacobian(net, x)
    assert_restricts_to_rows(net, x)


def assert_gives_its_jacobian(net, x):
    """``linearise``'s output is forward's, bit for bit, and its ``vjp`` and ``jvp`` are autograd's
    products (to round-off)."""
    y, jac = linearise(net, x)
    assert jac is not None and torch.equal(y, net(x))
    w, t = torch.randn_like(y), torch.randn_like(x)
    (reference,) = torch.autograd.grad(y, x, w, retain_graph=True)
    assert rel(jac.vjp(w), reference) <= TOL[x.dtype]
    # J t by the double-vjp trick (the orbit basis's gather has no forward-mode rule)
    u = torch.zeros_like(y, requires_grad=True)
    (vjp,) = torch.autograd.grad(y, x, u, create_graph=True)
    (reference,) = torch.autograd.grad(vjp, u, t)
    assert rel(jac.jvp(t), reference) <= TOL[x.dtype]


def assert_restricts_to_rows(net, x):
    """``jac.rows(index)`` applies the Jacobian's blocks of the entries ``index`` alone (a tensor of
    entries, or a slice of consecutive ones): its products are the full products' rows (to
    round-off), and its differentiable ``jvp`` has the gradients of the full one with the other
    entries' vectors zero (the sparse probes of a residual block)."""
    for index in (torch.tensor([2, 0]), slice(1, 3)):
        _assert_restricts_to(net, x, index)


def _assert_restricts_to(net, x, index):
    y, jac = linearise(net, x)
    sub = jac.rows(index)
    w, t = torch.randn_like(y), torch.randn_like(x)
    assert rel(sub.vjp(w[index]), jac.vjp(w)[index]) <= TOL[x.dtype]
    assert rel(sub.jvp(t[index]), jac.jvp(t)[index]) <= TOL[x.dtype]
    if sub.rows is not None:  # and again, within the entries kept
        ws = w[index]
        assert rel(sub.rows(torch.tensor([1])).vjp(ws[1:]), sub.vjp(ws)[1:]) <= TOL[x.dtype]
    mask = torch.zeros(x.shape[0], *[1] * (x.dim() - 1), dtype=x.dtype)
    mask[index] = 1
    u = torch.randn_like(y)
    params = [p for p in net.parameters() if p.requires_grad]
    ours = torch.autograd.grad((u[index] * sub.jvp(t[index])).sum(), [x, *params], materialize_grads=True,
                               retain_graph=True)
    full = torch.autograd.grad((u * mask * jac.jvp(t * mask)).sum(), [x, *params], materialize_grads=True)
    for a, b in zip(ours, full, strict=True):
        assert float((a - b).abs().max()) <= TOL[x.dtype] * (1 + float(b.abs().max()))


def assert_surrogate_gradients(net, x, u, v):
    """``u^T J v`` through ``jvp`` and through autograd's ``(J^T u)^T v`` with a graph: the same
    gradients in the input and every parameter, to 1e-12 (float64)."""
    inputs = [x, *net.parameters()]
    _, jac = linearise(net, x)
    ours = torch.autograd.grad((u * jac.jvp(v)).sum(), inputs, allow_unused=True, materialize_grads=True)
    (vjp,) = torch.autograd.grad(net(x), x, u, create_graph=True)
    reference = torch.autograd.grad((vjp * v).sum(), inputs, allow_unused=True, materialize_grads=True)
    assert len(ours) == len(reference) > 3
    for a, b in zip(ours, reference, strict=True):
        assert float((a - b).abs().max()) <= 1e-12 * (1 + float(b.abs().max()))


@pytest.mark.parametrize("case", CASES[:5], ids=["plain", "circular", "lipschitz", "relaxed", "odd"])
@pytest.mark.parametrize("group", GROUPS)
def test_jvp_surrogate_has_the_second_order_gradients(group, case):
    """``u^T J v`` through ``jvp`` and through autograd's ``(J^T u)^T v`` with a graph: the same
    gradients in the input and every parameter (the log-det surrogate of a residual block)."""
    torch.manual_seed(1)
    net = stack(group, **case)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert_surrogate_gradients(net, x, torch.randn_like(x), torch.randn_like(x))


def test_scaled_lipswish_and_one_channel_fields():
    torch.manual_seed(2)
    act = LipSwish(4, 1, scaled=True).double()
    with torch.no_grad():
        act.rho.copy_(torch.randn(4))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y, jac = act.linearise(x)
    w = torch.randn_like(y)
    (reference,) = torch.autograd.grad(y, x, w)
    assert rel(jac.vjp(w), reference) <= 1e-12 and rel(jac.jvp(w), reference) <= 1e-12  # diagonal


def test_stacks_without_a_jacobian_fall_back():
    net = GConvNet("c4", 2, 2, hidden_fields=2, kernel_sizes=(3, 3), activation=lambda n, f: nn.Tanh())
    x = torch.randn(1, 2, 6, 6)
    assert not net.linearisable
    y, jac = linearise(net, x)
    assert jac is None and torch.equal(y, net(x))
    with pytest.raises(TypeError, match="cannot give its Jacobian"):
        net.linearise(x)


def test_forward_hooks_are_not_bypassed():
    net = GConvNet("c4", 2, 2, hidden_fields=2, kernel_sizes=(3, 3))
    assert net.linearisable
    seen = []
    handle = net.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    assert not net.linearisable
    _, jac = linearise(net, torch.randn(1, 2, 6, 6))
    assert jac is None and seen == [(1, 2, 6, 6)]
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, y: None)
    try:
        assert not net.linearisable
    finally:
        handle.remove()
    assert net.linearisable


def dense(group, levels=0, dtype=torch.float64):
    """The fully-connected residual branch's map: a group average of spectrally normalised dense
    layers with LipSwish between them, on the un-squeezed grid for ``levels`` > 0."""
    r = 2**levels
    shape = (1, 4 * r, 4 * r)
    layers = [nn.Flatten(), LipschitzLinear(16 * r * r, 8, coeff=0.9), LipSwish(8),
              LipschitzLinear(8, 16 * r * r, coeff=0.9), nn.Unflatten(1, shape)]
    net = GroupAveraged(group, Sequential(*layers))
    if levels:
        net = AtFineGrid(net, levels)
    net = net.to(dtype)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LipSwish):
                m.rho.copy_(torch.randn_like(m.rho))
    return net, (r * r, 4, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels", [0, 1])
@pytest.mark.parametrize("group", GROUPS)
def test_group_averaged_dense_stack_gives_its_jacobian(group, levels, dtype):
    """Group average, reshapes, dense Lipschitz layers and the un-squeezed grid: the output is
    forward's bit for bit, ``vjp`` and ``jvp`` are the Jacobian's products (to round-off), and the
    surrogate ``u^T J v`` has autograd's second-order gradients."""
    torch.manual_seed(3)
    net, shape = dense(group, levels, dtype)
    assert net.linearisable
    x = torch.randn(3, *shape, dtype=dtype, requires_grad=True)
    assert_gives_its_jacobian(net, x)
    assert_restricts_to_rows(net, x)
    if dtype == torch.float64:
        assert_surrogate_gradients(net, x, torch.randn_like(x), torch.randn_like(x))


def test_sequential_with_an_opaque_layer_falls_back():
    seq = Sequential(nn.Flatten(), nn.Linear(4, 4))
    assert not seq.linearisable and not GroupAveraged("flip", seq).linearisable
    x = torch.randn(2, 1, 2, 2)
    y, jac = linearise(seq, x)
    assert jac is None and torch.equal(y, seq(x))
    with pytest.raises(TypeError, match="Linear cannot give its Jacobian"):
        seq.linearise(x)

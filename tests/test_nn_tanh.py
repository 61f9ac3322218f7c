import pytest
import torch

import gflows.nn.tanh as tanh_module
from gflows.nn.equivariant import Tanh
from gflows.nn.tanh import tanh


@pytest.fixture
def logistic_everywhere(monkeypatch):
    """The logistic form for float32 CPU tensors of any size (the tests' are small)."""
    monkeypatch.setattr(tanh_module, "LOGISTIC_FROM", 0)


def test_float32_logistic_form_is_close_to_tanh_and_exactly_odd():
    """The float32 CPU form has absolute error below 2e-7 against float64 tanh (torch.tanh's own is
    about 3e-8) over the whole range, saturates to exactly +-1, and is odd bit for bit."""
    x = torch.linspace(-40, 40, 400_001)
    y = tanh(x)
    assert float((y.double() - torch.tanh(x.double())).abs().max()) < 2e-7
    assert torch.equal(tanh(-x), -y)
    assert float(tanh(torch.tensor(40.0))) == 1.0 and float(tanh(torch.tensor(-40.0))) == -1.0
    assert torch.equal(tanh(torch.zeros(3)), torch.zeros(3))


def test_other_dtypes_and_small_tensors_are_torch_tanh():
    x = torch.randn(50, dtype=torch.float64)
    assert torch.equal(tanh(x), torch.tanh(x))
    h = torch.randn(50).to(torch.bfloat16)
    assert torch.equal(tanh(h), torch.tanh(h))
    small, large = torch.randn(tanh_module.LOGISTIC_FROM - 1), torch.randn(tanh_module.LOGISTIC_FROM)
    assert torch.equal(tanh(small), torch.tanh(small))
    assert not torch.equal(tanh(large), torch.tanh(large))  # the logistic form rounds differently


@pytest.mark.parametrize("layout", ["plain", "channels_last"])
def test_derivatives_are_those_of_tanh(layout, logistic_everywhere):
    """First derivative ``1 - y^2`` from the output, and a second derivative through it, as
    ``torch.tanh``'s to float32 round-off; the output keeps a channels-last input's layout."""
    x0 = torch.randn(2, 3, 4, 5) * 2
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    grads = []
    for f in (tanh, torch.tanh):
        x = x0.clone().requires_grad_(True)
        y = f(x)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
        grads.append((y, g, gg))
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert grads[0][0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def test_batched_gradients_and_functorch(logistic_everywhere):
    """Batched vector-Jacobian products (``is_grads_batched``, as the exact log-det's brute force takes
    them) and ``torch.func``'s reverse and forward modes work through the custom derivatives."""
    x = torch.randn(4, 3, requires_grad=True)
    y = tanh(x)
    eye = torch.eye(12).view(12, 4, 3)
    (rows,) = torch.autograd.grad(y, x, eye, is_grads_batched=True)
    expected = torch.diag((1 - y.detach() ** 2).flatten()).view(12, 4, 3)
    assert torch.allclose(rows, expected, atol=1e-6)
    expected = torch.diag(1 - torch.tanh(x.detach()[0]) ** 2)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        assert torch.allclose(transform(tanh)(x.detach()[0]), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_module_and_its_jacobian_use_the_same_function(dtype, logistic_everywhere):
    """``Tanh()(x)`` and ``Tanh().linearise(x)`` give the same output, and its ``vjp`` is autograd's."""
    x = torch.randn(2, 3, 4, 4, dtype=dtype, requires_grad=True)
    m = Tanh()
    y, jac = m.linearise(x)
    assert torch.equal(y, m(x))
    w = torch.randn_like(y)
    (auto,) = torch.autograd.grad(m(x), x, w)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(jac.vjp(w), auto, atol=tol)

"""zuko's own flow test protocol (its tests/test_flows.py) applied to every gflows family and model
builder inside a ``zuko.lazy.Flow``, in float32 and float64."""

from __future__ import annotations

import pytest
import torch
import zuko
from families import FAMILIES, make

from gflows.interop import to_zuko

DTYPES = [torch.float32, torch.float64]


def normal(loc: torch.Tensor, scale: torch.Tensor) -> torch.distributions.Distribution:
    """Standard normal on a whole event (zuko's DiagNormal would read only the last axis as one)."""
    return torch.distributions.Independent(torch.distributions.Normal(loc, scale), loc.dim())


def zuko_flow(name: str, dtype: torch.dtype) -> zuko.lazy.Flow:
    t = make(name, dtype)
    zeros = torch.zeros(t.out_shape, dtype=dtype)
    base = zuko.lazy.UnconditionalDistribution(normal, zeros, torch.ones_like(zeros), buffer=True)
    return zuko.lazy.Flow([to_zuko(t)], base)


def tol(dtype):
    return 1e-4 if dtype == torch.float32 else 1e-9


def all_parameters_get_gradients(flow, loss):
    flow.zero_grad(set_to_none=True)
    loss.backward()
    missing = [n for n, p in flow.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in flow.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_log_prob_sampling_and_reparameterisation(name, dtype):
    flow = zuko_flow(name, dtype)
    event = make(name).event_shape
    x = torch.randn(16, *event, dtype=dtype)
    log_p = flow().log_prob(x)
    assert log_p.shape == (16,) and log_p.dtype == dtype and log_p.requires_grad
    all_parameters_get_gradients(flow, -log_p.mean())
    flow.train()
    train = flow().log_prob(x)
    flow.eval()
    assert torch.allclose(train, flow().log_prob(x), atol=tol(dtype))  # train / eval agree
    samples = flow().sample((8,))
    assert samples.shape == (8, *event) and bool(torch.isfinite(samples).all())
    assert flow().has_rsample
    all_parameters_get_gradients(flow, flow().rsample((8,)).square().sum().sqrt())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_invertibility_and_jacobians(name, dtype):
    flow = zuko_flow(name, dtype)
    t = flow().transform
    event = make(name).event_shape
    x = torch.randn(4, *event, dtype=dtype)
    y = t(x)
    assert torch.allclose(t.inv(y), x, atol=tol(dtype))
    d = x[0].numel()
    jac = torch.autograd.functional.jacobian(lambda v: t(v.view(1, *event)).reshape(-1), x[0].reshape(-1))
    ladj = t.log_abs_det_jacobian(x[:1], y[:1])
    assert torch.allclose(ladj, torch.linalg.slogdet(jac).logabsdet.view(1), atol=tol(dtype))
    out = y[0].shape
    jac_inv = torch.autograd.functional.jacobian(lambda v: t.inv(v.view(1, *out)).reshape(-1),
                                                 y[0].reshape(-1))
    assert jac.shape == jac_inv.shape == (d, d)
    assert torch.allclose(jac_inv, torch.linalg.inv(jac), atol=100 * tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_save_load_and_repr(name, dtype, tmp_path):
    flow = zuko_flow(name, dtype)
    x = torch.randn(4, *make(name).event_shape, dtype=dtype)
    torch.save(flow, tmp_path / "flow.pth")
    copy = torch.load(tmp_path / "flow.pth", weights_only=False)
    with torch.no_grad():  # as zuko does: the same random stream for both (probes, refresh noise)
        seed = torch.seed()
        log_p = flow().log_prob(x)
        torch.manual_seed(seed)
        assert torch.equal(log_p, copy().log_prob(x))
    assert type(make(name)).__name__ in repr(flow)

import pytest
import torch
from conftest import GROUPS
from helpers import (
    autograd_logdet,
    bad_inputs,
    max_equivariance_error,
    max_reconstruction_error,
    output_scale,
    perturb,
)

import gflows
from gflows.flow import Flow, Inverse
from gflows.groups import Group
from gflows.transforms.autoregressive import GIAF

SHAPE = (3, 4, 4)


def iaf(group, **kw):
    torch.manual_seed(2)
    # Small perturbation: outputs stay O(1), where the float32 bounds of the battery apply.
    return perturb(GIAF(group, SHAPE, n_blocks=3, hidden_fields=2, kernel_sizes=(3, 3), **kw), 0.1)


@pytest.mark.parametrize("sign", [False, True, "odd"])
@pytest.mark.parametrize("group", GROUPS)
def test_reconstruction_and_exact_logdet_both_directions(group, sign):
    t = iaf(group, sign_symmetric=sign)
    x = torch.randn(3, *SHAPE)
    assert max_reconstruction_error(t, x) <= 1e-5
    assert max_reconstruction_error(Inverse(t), x) <= 1e-5
    z, ld = t(x)
    assert torch.allclose(ld, autograd_logdet(t, x), atol=1e-4)
    assert torch.allclose(t.inverse(x)[1], autograd_logdet(Inverse(t), x), atol=1e-4)
    assert float(ld.abs().max()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group", GROUPS)
def test_equivariance(group, dtype):
    """Float32 round-off scales with the outputs (escnn's initial filters, and so their size, depend
    on the install), so its bound is relative to them; float64 holds to round-off."""
    t = iaf(group).to(dtype)
    G = Group(group)
    x = torch.randn(2, *SHAPE, dtype=dtype)
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    for layer in (t, Inverse(t)):
        assert max_equivariance_error(layer, G, x) <= rel * output_scale(layer, x)


@pytest.mark.parametrize("sign", [True, "odd"])
def test_sign_symmetry_and_sampling_pass(sign):
    t = iaf("d4", sign_symmetric=sign)
    z = torch.randn(4, *SHAPE)
    x, ld = t.inverse(z)
    xn, ldn = t.inverse(-z)
    assert torch.allclose(xn, -x, atol=1e-6) and torch.allclose(ldn, ld, atol=1e-5)
    flow = Flow(t)
    xs, lq = flow.sample_and_log_prob(5)
    assert torch.allclose(flow.log_prob(xs), lq, atol=1e-4)


def test_bad_input_and_settings():
    t = iaf("c4")
    for x, err, word in bad_inputs(SHAPE):
        with pytest.raises(err, match=word):
            t(x)
        with pytest.raises(err, match=word):
            t.inverse(x)
    with pytest.raises(ValueError, match="n_blocks"):
        GIAF("c4", SHAPE, n_blocks=4)
    assert isinstance(gflows.GIAF, type)

import math

import pytest
import torch
from conftest import GROUPS
from helpers import autograd_logdet, bad_inputs, max_equivariance_error, max_reconstruction_error

from gflows.flow import Compose, Flow
from gflows.groups import Group
from gflows.transforms.elementwise import ActNorm, Dequantize, Logit

SHAPE = (3, 4, 4)


def actnorm():
    t = ActNorm(SHAPE)
    t(torch.randn(16, *SHAPE) * 3 + 1)  # data-dependent initialisation
    return t.eval()


LAYERS = {"actnorm": actnorm, "logit": lambda: Logit(SHAPE, alpha=0.05)}


def inputs(name, n=3):
    x = torch.rand(n, *SHAPE) * 0.9 + 0.05
    return x if name == "logit" else x * 4 - 2


@pytest.mark.parametrize("name", LAYERS)
def test_reconstruction_and_logdet(name):
    t = LAYERS[name]()
    x = inputs(name)
    assert max_reconstruction_error(t, x) <= 1e-5
    assert torch.allclose(t(x)[1], autograd_logdet(t, x), atol=1e-4)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("name", LAYERS)
def test_equivariance(name, group):
    assert max_equivariance_error(LAYERS[name](), Group(group), inputs(name)) <= 1e-5


def test_actnorm_data_dependent_initialisation():
    t = ActNorm(SHAPE)
    x = torch.randn(64, *SHAPE) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 3
    y, _ = t(x)
    assert torch.allclose(y.transpose(0, 1).reshape(3, -1).mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.transpose(0, 1).reshape(3, -1).std(1), torch.ones(3), atol=1e-4)
    before = t.bias.detach().clone()
    t(x * 2)
    assert torch.equal(t.bias.detach(), before)  # initialised once


def test_actnorm_fields_share_parameters():
    t = ActNorm((8, 2, 2), field_size=4)
    assert t.bias.shape == (2,)
    with pytest.raises(ValueError, match="fields of 3"):
        ActNorm((8, 2, 2), field_size=3)


def test_uniform_model_scores_8_bits_per_dim():
    """Closed form: a density uniform on [0, 1)^D in dequantised space gives exactly 8 bits/dim."""
    x = torch.randint(0, 256, (5, *SHAPE)).float()
    y, ld = Dequantize(SHAPE)(x)
    assert bool(((y >= 0) & (y < 1)).all())
    log_p = 0.0 + ld  # log-density of the uniform model is 0 on the unit cube
    bpd = -log_p / (math.prod(SHAPE) * math.log(2))
    assert torch.allclose(bpd, torch.full((5,), 8.0))


def test_logit_bits_per_dim_of_a_known_density():
    """Logistic base through the logit: the flow's density on [0, 1) is known in closed form."""
    alpha = 0.05
    t = Logit(SHAPE, alpha)

    class Logistic(torch.nn.Module):
        def log_prob(self, z):
            return (-z - 2 * torch.nn.functional.softplus(-z)).reshape(z.shape[0], -1).sum(1)

    flow = Flow(Compose(Dequantize(SHAPE), t), Logistic())
    x = torch.randint(0, 256, (4, *SHAPE)).float()
    torch.manual_seed(5)
    lp = flow.log_prob(x)
    torch.manual_seed(5)
    u = (x + torch.rand_like(x)) / 256
    # logistic(logit(s)) * dlogit/ds = 1 on s, and ds/du = 1 - 2 alpha: p(u) = 1 - 2 alpha
    expected = math.prod(SHAPE) * (math.log(1 - 2 * alpha) - math.log(256))
    assert torch.allclose(lp, torch.full_like(lp, expected), atol=1e-3)
    assert u.shape == x.shape


def test_dequantize_roundtrip_and_bad_values():
    d = Dequantize(SHAPE)
    x = torch.randint(0, 256, (2, *SHAPE)).float()
    assert torch.equal(d.inverse(d(x)[0])[0], x)
    with pytest.raises(ValueError, match="integers"):
        d(x + 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Logit(SHAPE)(torch.full((1, *SHAPE), 1.5))


@pytest.mark.parametrize("name", LAYERS)
def test_bad_input(name):
    t = LAYERS[name]()
    for x, err, word in bad_inputs(SHAPE):
        with pytest.raises(err, match=word):
            t(x)

import math

import pytest
import torch
from conftest import GROUPS
from helpers import bad_inputs, perturb

from gflows.groups import Group
from gflows.models.image import image_model
from gflows.transforms.dequantization import VariationalDequantize
from gflows.transforms.elementwise import Dequantize

SHAPE = (2, 5, 5)
#: the couplings on the image as it is, and squeezed once (a 3 x 3 coarse grid)
SHAPES = {0: SHAPE, 1: (2, 6, 6)}


def layer(group, dtype=torch.float64, moved=True, squeeze=0):
    torch.manual_seed(3)
    t = VariationalDequantize(group, SHAPES[squeeze], levels=8, n_blocks=3, hidden_fields=2,
                              kernel_sizes=(3, 3), squeeze_levels=squeeze)
    return (perturb(t, 0.05) if moved else t).to(dtype)


def images(n=3, dtype=torch.float64, squeeze=0):
    return torch.randint(0, 8, (n, *SHAPES[squeeze])).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_starts_as_uniform_dequantisation(dtype):
    t, x = layer("flip", dtype, moved=False), images(dtype=dtype)
    torch.manual_seed(0)
    y, ld = t(x)
    torch.manual_seed(0)
    y0, ld0 = Dequantize(SHAPE, levels=8)(x)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert (y - y0).abs().max() <= tol and (ld - ld0).abs().max() <= tol * abs(float(ld0[0]))


@pytest.mark.parametrize("squeeze", [0, 1])
def test_log_q_is_the_density_of_the_noise(squeeze):
    """``log q(u | x) = log p_e(e) - log|det dv/de| - sum log sigmoid'(v)`` with ``u = sigmoid(v)``:
    the couplings' log-det against a dense autograd Jacobian of ``v``, the rest from its formula.
    (Not the dense Jacobian of ``u`` itself: autograd's ``sigmoid(v) (1 - sigmoid(v))`` cancels
    catastrophically for large ``v``, 1e-7 relative at ``v ~ 20`` in float64, and is 0 past ~37.)"""
    t, x = layer("d4", squeeze=squeeze), images(squeeze=squeeze)
    e = t.noise(x)
    u, log_q = t.dequantize(x, e)
    v, log_det = t.noise_logits(x, e)
    # [0, 1], closed: sigmoid(v) rounds to 1 past v ~ 36.7 in float64 (16.6 in float32)
    assert ((u >= 0) & (u <= 1)).all() and torch.equal(u, torch.sigmoid(v))
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(
            lambda w, i=i: t.noise_logits(x[i : i + 1], w.view(1, *x.shape[1:]))[0].flatten(), e[i].flatten())
        dense = float(torch.linalg.slogdet(jac).logabsdet)
        assert abs(dense - float(log_det[i])) <= 1e-12 * max(1.0, abs(dense))
    slope = torch.nn.functional.logsigmoid
    log_pe, log_dv = [(slope(a) + slope(-a)).flatten(1).sum(1) for a in (e, v)]
    assert torch.allclose(log_q, log_pe - log_det - log_dv, rtol=0, atol=1e-12)
    assert log_q.abs().min() > 1e-2  # the moved layer is not uniform


def test_bound_and_inverse():
    t, x = layer("flip"), images()
    y, ld = t(x)
    assert torch.equal(t.inverse(y)[0], x)
    d = math.prod(SHAPE)
    torch.manual_seed(5)
    y, ld = t(x)
    torch.manual_seed(5)
    _, log_q = t.dequantize(x, t.noise(x))
    assert torch.allclose(ld, -d * math.log(8) - log_q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("squeeze", [0, 1])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_density_is_invariant(group, dtype, squeeze):
    """q(g u | g x) = q(u | x): the dequantised image moves with the image, the density stays."""
    G, t, x = Group(group), layer(group, dtype, squeeze=squeeze), images(dtype=dtype, squeeze=squeeze)
    e = t.noise(x)
    u, log_q = t.dequantize(x, e)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for g in G.grid_elements:
        ug, log_qg = t.dequantize(G.act(g, x), G.act(g, e))
        assert (ug - G.act(g, u)).abs().max() <= tol
        assert (log_qg - log_q).abs().max() <= tol * (1 + log_q.abs().max())


def test_model_trains_the_noise_and_refuses_bad_settings():
    model = image_model("coupling", "flip", (3, 4, 4), levels=8, dequantization="variational",
                        dequant_blocks=2, dequant_hidden=4, hidden_fields=2, n_scales=1)
    x = torch.randint(0, 8, (4, 3, 4, 4)).float()
    (-model.log_prob(x).mean()).backward()
    noise_grads = [p.grad for p in model.transform.transforms[0].parameters()]
    assert noise_grads and all(g is not None for g in noise_grads)
    assert sum(float(g.abs().sum()) for g in noise_grads) > 0
    with pytest.raises(ValueError, match="unknown dequantization 'logistic'"):
        image_model("coupling", "flip", (3, 4, 4), dequantization="logistic")
    with pytest.raises(ValueError, match="integers in"):
        layer("flip")(images() + 0.5)
    with pytest.raises(ValueError, match="n_blocks >= 1"):
        VariationalDequantize("flip", SHAPE, n_blocks=0)
    with pytest.raises(ValueError, match="divisible by 2, got 5 x 5"):
        VariationalDequantize("flip", SHAPE, squeeze_levels=1)
    for bad, error, match in bad_inputs(SHAPE):
        with pytest.raises(error, match=match):
            layer("flip")(bad)

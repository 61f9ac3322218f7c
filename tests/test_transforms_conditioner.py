"""Conditioners: zero at initialisation, even scales and odd shifts when sign-symmetric, bounded."""

import pytest
import torch
from helpers import perturb

from gflows.transforms.conditioner import Conditioner, conditioner_net


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_init_then_even_scales_and_odd_shifts(dtype):
    cond = Conditioner("d4", 2, 3, hidden_fields=2, sign_symmetric=True).to(dtype)
    x = torch.randn(4, 2, 6, 6, dtype=dtype)
    s, t = cond(x)
    assert s.shape == t.shape == (4, 3, 6, 6) and not s.any() and not t.any()  # the identity at first
    perturb(cond)
    s, t = cond(x)
    s_neg, t_neg = cond(-x)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert torch.allclose(s_neg, s, atol=tol) and torch.allclose(t_neg, -t, atol=tol)
    assert s.abs().max() > 1e-3 and t.abs().max() > 1e-3


def test_soft_bounds_and_settings():
    cond = perturb(Conditioner("trivial", 1, 1, hidden_fields=2, scale_bound=0.5, shift_bound=2.0), 10.0)
    s, t = cond(100 * torch.randn(2, 1, 4, 4))
    assert s.abs().max() <= 0.5 and t.abs().max() <= 2.0  # tanh saturates to 1 in float32
    additive = perturb(Conditioner("trivial", 1, 1, hidden_fields=2, affine=False))
    assert not additive(torch.randn(2, 1, 4, 4))[0].any()
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        conditioner_net("trivial", 1, 1, activation="relu6")

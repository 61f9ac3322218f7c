import pytest
import torch

from gflows.training.ema import ema_update


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay", [0.0, 0.9, 0.999, 1.0])
def test_ema_update_is_the_exponential_average(dtype, decay):
    g = torch.Generator().manual_seed(0)
    shapes = [(3,), (4, 5), (2, 3, 3, 3), ()]
    params = [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in shapes]
    ema = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(ema, params, strict=True)]
    ema_update(ema, params, decay)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for e, x in zip(ema, expected, strict=True):
        torch.testing.assert_close(e, x, rtol=tol, atol=tol)
    assert all(p.grad is None for p in params)


def test_ema_update_rejects_bad_input():
    a = [torch.zeros(2)]
    with pytest.raises(ValueError, match="2 averages for 1 parameters"):
        ema_update(a + a, a, 0.9)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got 1.5"):
        ema_update(a, a, 1.5)

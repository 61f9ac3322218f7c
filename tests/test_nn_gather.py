import pytest
import torch

from gflows.nn.gather import gather


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_is_indexing(dtype):
    index = torch.randint(0, 7, (3, 2, 3, 3))
    w = torch.randn(7, dtype=dtype)
    assert torch.equal(gather(w, index), w[index])


def test_gather_gradient():
    """The hand-written backward (one index_add_) against finite differences, repeated indices
    included."""
    index = torch.randint(0, 7, (3, 2, 3, 3))
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: gather(v, index), (w,))

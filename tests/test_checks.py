"""The finiteness check every layer runs: it decides from one sum, so the cases where the sum
misleads (finite entries that overflow it, infinities of both signs) are checked here."""

import pytest
import torch

from gflows._checks import check_finite

DTYPES = [torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values, message", [
    ([1.0, float("nan"), 2.0], "1 NaN, 0 Inf"),
    ([1.0, float("inf"), 2.0], "0 NaN, 1 Inf"),
    ([-float("inf"), 0.0, 2.0], "0 NaN, 1 Inf"),
    ([float("inf"), -float("inf"), 0.0], "0 NaN, 2 Inf"),  # the sum is NaN, not an infinity
])
def test_non_finite_entries_are_named(dtype, values, message):
    x = torch.tensor(values, dtype=dtype).view(1, 3).repeat(4, 1)
    expected = message.replace("1 NaN", "4 NaN").replace("1 Inf", "4 Inf").replace("2 Inf", "8 Inf")
    with pytest.raises(ValueError, match=f"layer input holds non-finite values \\({expected}\\)"):
        check_finite(x, "layer input")


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_entries_whose_sum_overflows_pass(dtype):
    big = torch.finfo(dtype).max
    x = torch.full((8, 4), big, dtype=dtype)
    assert not torch.isfinite(x.sum())  # the fast test alone would reject it
    check_finite(x)
    check_finite(-x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_and_empty_inputs_pass(dtype):
    check_finite(torch.randn(16, 3, 4, 4).to(dtype), "x")
    check_finite(torch.empty(0, 3, dtype=dtype), "x")


def test_inputs_with_a_graph_are_checked_without_touching_it():
    x = torch.randn(5, 3, requires_grad=True)
    check_finite(x)
    assert x.grad is None and x.grad_fn is None
    y = (x * 2).requires_grad_(True)
    check_finite(y)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))

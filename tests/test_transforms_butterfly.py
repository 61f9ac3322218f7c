import math

import pytest
import torch
from conftest import GROUPS
from helpers import autograd_logdet, bad_inputs, max_equivariance_error, max_reconstruction_error, perturb

from gflows.groups import Group
from gflows.transforms.butterfly import Butterfly


def reference_matrix(b: Butterfly) -> torch.Tensor:
    """``B = B_m ... B_1`` from the definition: factor k pairs i with i + n / 2^k inside blocks of
    n / 2^(k-1), pair (block, offset) numbered block * width + offset, one dense matrix each."""
    dense = torch.eye(b.n, dtype=b.weight.dtype)
    for k in range(1, b.m + 1):
        factor = torch.eye(b.n, dtype=b.weight.dtype)
        width = b.n_mixed // 2**k
        for pair in range(b.n_mixed // 2):
            block, offset = divmod(pair, width)
            i = block * 2 * width + offset
            j = i + width
            a, bb, c, d = b.weight[k - 1, pair]
            factor = factor.index_put((torch.tensor([i, i, j, j]), torch.tensor([i, j, i, j])),
                                      torch.stack([a, bb, c, d]))
        dense = factor @ dense
    return dense


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 12, 16, 64, 100, 256, 512, 1024])
def test_against_dense_matrix(n):
    torch.manual_seed(n)
    b = perturb(Butterfly((n,)).double(), 0.2)
    dense = b.matrix()
    if n <= 512:  # the definition, factor by factor (groups of factors past 64 coordinates)
        assert torch.allclose(dense, reference_matrix(b), atol=1e-12)
    x = torch.randn(4, n, dtype=torch.float64)
    y, ld = b(x)
    assert torch.allclose(y, x @ dense.T, atol=1e-10)
    assert torch.allclose(b.inverse(x)[0], x @ torch.linalg.inv(dense).T, atol=1e-8)
    assert torch.allclose(ld, torch.linalg.slogdet(dense).logabsdet.expand(4), atol=1e-8)
    mixed = 2 ** int(math.log2(n))  # indices past the largest power of two: identity block
    assert torch.equal(dense[mixed:], torch.eye(n, dtype=dense.dtype)[mixed:])


def test_gradients_are_those_of_the_definition():
    torch.manual_seed(0)
    b = perturb(Butterfly((256,)).double(), 0.2)  # two groups of four bits
    x = torch.randn(3, 256, dtype=torch.float64)
    w = torch.randn(3, 256, dtype=torch.float64)
    for inverse in (False, True):
        out = b.inverse(x)[0] if inverse else b(x)[0]
        (grad,) = torch.autograd.grad((out * w).sum(), b.weight)
        dense = reference_matrix(b)
        ref = x @ (torch.linalg.inv(dense) if inverse else dense).T
        (grad_ref,) = torch.autograd.grad((ref * w).sum(), b.weight)
        assert torch.allclose(grad, grad_ref, atol=1e-9)


def test_inits():
    assert torch.equal(Butterfly((8,), init="identity").matrix(), torch.eye(8))
    q = Butterfly((16,), init="orthogonal").matrix()
    assert torch.allclose(q @ q.T, torch.eye(16), atol=1e-5)
    with pytest.raises(ValueError, match="unknown init"):
        Butterfly((4,), init="lu")


@pytest.mark.parametrize("group", GROUPS)
def test_channel_mixing_on_images(group):
    b = perturb(Butterfly((4, 4, 4)), 0.2)
    x = torch.randn(3, 4, 4, 4)
    assert max_reconstruction_error(b, x) <= 1e-5
    assert torch.allclose(b(x)[1], autograd_logdet(b, x[:2]).repeat(2)[:3], atol=1e-4)
    assert max_equivariance_error(b, Group(group), x) <= 1e-5
    ref = torch.einsum("ij,bjhw->bihw", b.matrix(), x)
    assert torch.allclose(b(x)[0], ref, atol=1e-5)


def test_bad_input():
    b = Butterfly((2, 4, 4))
    for x, err, word in bad_inputs((2, 4, 4)):
        with pytest.raises(err, match=word):
            b(x)


@pytest.mark.parametrize("n", [4, 12, 64, 256, 300, 1024])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("in_place", [True, False])
def test_factor_and_block_paths_agree(monkeypatch, n, inverse, in_place):
    """Few rows go through the factors one by one, more through grouped dense blocks
    (``FACTOR_SPAN``; two ranges read few columns in place, ``IN_PLACE_ENTRIES``, and many after a
    copy): the same map and the same weight gradients, to float64 round-off."""
    import gflows.transforms.butterfly as module

    if not in_place:
        monkeypatch.setattr(module, "IN_PLACE_ENTRIES", 0)
    torch.manual_seed(n)
    b = perturb(Butterfly((n,)).double(), 0.2)
    x = torch.randn(5, n, dtype=torch.float64)
    w = torch.randn(5, n, dtype=torch.float64)
    outs, grads = [], []
    for by_factor in (True, False):
        out = b._mix(x.T, inverse, by_factor).T
        outs.append(out)
        grads.append(torch.autograd.grad((out * w).sum(), b.weight)[0])
    assert torch.allclose(outs[0], outs[1], atol=1e-12)
    assert torch.allclose(grads[0], grads[1], atol=1e-11)


def test_many_rows_take_the_block_path():
    """From ``n / FACTOR_SPAN`` rows the layer still equals its dense matrix (the block path)."""
    from gflows.transforms.butterfly import FACTOR_SPAN

    torch.manual_seed(0)
    b = perturb(Butterfly((128,)).double(), 0.2)
    x = torch.randn(128 // FACTOR_SPAN + 1, 128, dtype=torch.float64)
    dense = reference_matrix(b)
    assert torch.allclose(b(x)[0], x @ dense.T, atol=1e-10)
    assert torch.allclose(b.inverse(x)[0], x @ torch.linalg.inv(dense).T, atol=1e-8)


@pytest.mark.parametrize("n", [64, 128, 512])
def test_three_or_more_bit_ranges(monkeypatch, n):
    """Ranges of at most two bits: three to five ranges of unequal widths, built in one stack and
    applied with the middle ones copied; still the definition's matrix and its inverse."""
    import gflows.transforms.butterfly as module

    monkeypatch.setattr(module, "GROUP_BITS", 2)
    torch.manual_seed(n)
    b = perturb(Butterfly((n,)).double(), 0.2)
    assert len(b._groups) >= 3
    dense = reference_matrix(b)
    x = torch.randn(n // module.FACTOR_SPAN + 3, n, dtype=torch.float64)
    assert torch.allclose(b(x)[0], x @ dense.T, atol=1e-10)
    assert torch.allclose(b.inverse(x)[0], x @ torch.linalg.inv(dense).T, atol=1e-8)


def test_pickles_without_the_block_indices_still_load():
    """A layer pickled before the blocks' coefficients were gathered this way gets the new indices
    on loading (and drops the old ones), in both directions and both paths."""
    import pickle

    torch.manual_seed(0)
    b = perturb(Butterfly((128,)), 0.2)
    x = torch.randn(40, 128)
    state = b.__getstate__()
    # as pickled before: no block indices, inverse factor index or sign; the retired group indices
    kept = {k: v for k, v in state["_buffers"].items()
            if k not in ("_block_index_fwd", "_block_index_inv", "_factor_index_inv", "_inverse_sign")}
    state["_buffers"] = {**kept, "_group_index_fwd": torch.zeros(3, dtype=torch.long)}
    old = Butterfly.__new__(Butterfly)
    old.__setstate__(state)
    loaded = pickle.loads(pickle.dumps(old))
    assert "_group_index_fwd" not in loaded._buffers
    for rows in (4, 40):
        assert torch.equal(loaded(x[:rows])[0], b(x[:rows])[0])
        assert torch.equal(loaded.inverse(x[:rows])[0], b.inverse(x[:rows])[0])

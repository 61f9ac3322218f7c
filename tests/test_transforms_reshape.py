import pytest
import torch
from helpers import bad_inputs

from gflows.groups import Group
from gflows.transforms.reshape import Squeeze


def test_squeeze_roundtrip_layout_and_volume():
    s = Squeeze((2, 4, 4))
    x = torch.randn(3, 2, 4, 4)
    z, ld = s(x)
    assert z.shape == (3, 8, 2, 2) and torch.equal(ld, torch.zeros(3))
    assert torch.equal(z[:, 4 * 1 + 2 * 1 + 0], x[:, 1, 1::2, 0::2])  # channel 4c + 2i + j
    assert torch.equal(s.inverse(z)[0], x)


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_group_permutes_the_four_subpixel_channels(group):
    """As documented: g moves the coarse grid and permutes each channel's four sub-pixels."""
    G, s = Group(group), Squeeze((1, 4, 4))
    x = torch.randn(1, 1, 4, 4)
    z = s(x)[0]
    for g in G.grid_elements:
        zg = s(G.act(g, x))[0]
        moved = G.act(g, z)  # coarse grid moved, channels not yet permuted
        perm = [next(j for j in range(4) if torch.equal(zg[:, i], moved[:, j])) for i in range(4)]
        assert sorted(perm) == [0, 1, 2, 3]
        if g.quarter_turns or g.flip:
            assert perm != [0, 1, 2, 3]


def test_bad_input_and_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        Squeeze((1, 3, 4))
    s = Squeeze((2, 4, 4))
    for x, err, word in bad_inputs((2, 4, 4)):
        with pytest.raises(err, match=word):
            s(x)
    with pytest.raises(ValueError, match="event shape"):
        s.inverse(torch.zeros(1, 2, 4, 4))


def test_factor_out_maps_the_kept_channels_only_and_checks_shapes():
    from helpers import perturb

    from gflows.transforms.elementwise import ActNorm
    from gflows.transforms.reshape import FactorOut

    inner = perturb(ActNorm((2, 4, 4)))
    inner.initialised.fill_(True)  # keep the perturbed scales (no data-dependent initialisation)
    t = FactorOut(inner, (5, 4, 4))
    x = torch.randn(3, 5, 4, 4)
    z, ld = t(x)
    za, lda = inner(x[:, :2])
    assert torch.equal(z[:, :2], za) and torch.equal(z[:, 2:], x[:, 2:]) and torch.equal(ld, lda)
    assert float(lda.abs().max()) > 0
    xr, ldr = t.inverse(z)
    assert torch.allclose(xr, x, atol=1e-6) and torch.allclose(ldr, -ld, atol=1e-5)
    # the score recursion: the inner map's on the kept channels, the rest passes through
    score = torch.randn_like(z)
    xs, lds, s = t.inverse_and_score(z, score)
    xd = xs.detach().requires_grad_(True)
    zd, ldd = t(xd)
    (ref,) = torch.autograd.grad((zd * score).sum() + ldd.sum(), xd)
    assert torch.equal(xs, xr) and torch.allclose(lds, ldr) and torch.allclose(s, ref, atol=1e-5)
    with pytest.raises(ValueError, match="shape-preserving"):
        FactorOut(Squeeze((2, 4, 4)), (5, 4, 4))
    with pytest.raises(ValueError, match="some, not all"):
        FactorOut(ActNorm((5, 4, 4)), (5, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        t(torch.randn(3, 4, 4, 4))


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("group", ["flip", "c4", "d4"])
def test_halving_squeeze_keeps_squeezed_fields_first_and_commutes_with_the_group(group, levels):
    """The first half of the output carries the level-``levels`` squeezed representation on the
    coarse grid (two fields per input field), exactly; the group permutes the second half's
    channels. Volume preserving and exactly invertible."""
    from gflows.representations import squeeze, squeezed_action
    from gflows.transforms.reshape import HalvingSqueeze

    G = Group(group)
    t = HalvingSqueeze((2 * 4**levels, 4, 4), levels)
    assert t.out_shape == (8 * 4**levels, 2, 2) and t.kept_channels == 4 * 4**levels
    assert torch.equal(torch.sort(t.perm).values, torch.arange(8 * 4**levels))
    x = torch.randn(3, 2, 4 * 2**levels, 4 * 2**levels, dtype=torch.float64)
    y = squeeze(x, levels)
    z, ld = t(y)
    assert torch.equal(ld, torch.zeros(3, dtype=torch.float64)) and torch.equal(t.inverse(z)[0], y)
    k, act = t.kept_channels, squeezed_action(G, levels)
    for g in G.grid_elements:
        zg, _ = t(squeeze(G.act(g, x), levels))
        assert torch.equal(zg[:, :k], act(g, z[:, :k]))
        moved = G.act(g, z[:, k:])  # coarse grid moved; the channels must be a permutation of these
        match = [[j for j in range(moved.shape[1]) if torch.equal(zg[:, k + i], moved[:, j])]
                 for i in range(moved.shape[1])]
        assert sorted(m[0] for m in match) == list(range(moved.shape[1]))


def test_halving_squeeze_layout_and_bad_settings():
    """Of each 4 x 4 block the corners, then the inner 2 x 2, stay (field by field); the eight edge
    sub-pixels leave."""
    from gflows.representations import squeeze
    from gflows.transforms.reshape import HalvingSqueeze, halving_mask

    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    x = (100 * (rows % 4) + cols % 4).view(1, 1, 8, 8).repeat(1, 2, 1, 1)  # position in its 4x4 block
    t = HalvingSqueeze((8, 4, 4), 1)
    z, _ = t(squeeze(x))
    r, c = z[0, :, 0, 0] // 100, z[0, :, 0, 0] % 100  # the same at every coarse pixel
    assert torch.equal(z, z[:, :, :1, :1].expand_as(z))
    outer, inner = (r % 3 == 0) & (c % 3 == 0), (r % 3 != 0) & (c % 3 != 0)
    assert outer[[*range(4), *range(8, 12)]].all() and inner[[*range(4, 8), *range(12, 16)]].all()
    assert not (outer | inner)[16:].any()
    assert sorted(zip(r[:4].tolist(), c[:4].tolist(), strict=True)) == [(0, 0), (0, 3), (3, 0), (3, 3)]
    for levels in (1, 2):  # halving_mask marks, on the image, the pixels whose sub-pixels stay
        mask = halving_mask(16, 16, levels)
        assert all(torch.equal(Group("d4").act(g, mask), mask) for g in Group("d4").grid_elements)
        kept = squeeze(mask, levels + 1)[0, :, 0, 0].nonzero().flatten()
        assert torch.equal(kept, HalvingSqueeze((4**levels, 4, 4), levels).perm[:2 * 4**levels].sort().values)
    with pytest.raises(ValueError, match="squeezed at least once"):
        HalvingSqueeze((4, 4, 4), 0)
    with pytest.raises(ValueError, match="fields of 4"):
        HalvingSqueeze((6, 4, 4), 1)
    with pytest.raises(ValueError, match="even"):
        HalvingSqueeze((4, 3, 4), 1)
    for xb, err, word in bad_inputs((8, 4, 4)):
        with pytest.raises(err, match=word):
            t(xb)
    with pytest.raises(ValueError, match="event shape"):
        t.inverse(torch.zeros(1, 8, 4, 4))

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
    squeezed_act,
)

from gflows.groups import Group
from gflows.nn.equivariant import GConv2d
from gflows.transforms.coupling import GCoupling, checkerboard, mirrored_checkerboard, parity_preserving

CONFIGS = {
    "affine": dict(shape=(2, 4, 4), kw={}),
    "additive": dict(shape=(3, 4, 4), kw=dict(affine=False, split=1)),
    "sign": dict(shape=(2, 4, 4), kw=dict(sign_symmetric=True, swap=True)),
    "squeezed": dict(shape=(8, 2, 2), kw=dict(squeeze_levels=1)),
    "squeezed2": dict(shape=(32, 2, 2), kw=dict(squeeze_levels=2)),
    "orbit": dict(shape=(2, 4, 4), kw=dict(basis="orbit")),
    "orbit_squeezed2": dict(shape=(32, 2, 2), kw=dict(squeeze_levels=2, basis="orbit")),
    "checkerboard": dict(shape=(1, 6, 6), kw=dict(mask="checkerboard", padding_mode="circular")),
    "spline": dict(shape=(2, 4, 4), kw=dict(spline_bins=4)),
    "spline_squeezed": dict(shape=(8, 2, 2), kw=dict(squeeze_levels=1, spline_bins=3, spline_bound=2.0)),
    "spline_checkerboard": dict(shape=(1, 6, 6), kw=dict(mask="checkerboard", padding_mode="circular",
                                                         spline_bins=4)),
    "mirrored": dict(shape=(1, 6, 6), kw=dict(mask="mirrored")),
    "mirrored_odd": dict(shape=(1, 5, 5), kw=dict(mask="mirrored", parity=1)),
    "mirrored_squeezed": dict(shape=(8, 4, 4), kw=dict(mask="mirrored", squeeze_levels=1)),
    "mirrored_squeezed2": dict(shape=(16, 1, 1), kw=dict(mask="mirrored", squeeze_levels=2, parity=1)),
    "mirrored_spline": dict(shape=(4, 2, 2), kw=dict(mask="mirrored", squeeze_levels=1, spline_bins=3)),
    "halving": dict(shape=(8, 4, 4), kw=dict(mask="halving", squeeze_levels=1)),
    "halving_squeezed2": dict(shape=(32, 2, 2), kw=dict(mask="halving", squeeze_levels=2, parity=1)),
}


def layer(group, name):
    cfg = CONFIGS[name]
    torch.manual_seed(1)
    return perturb(GCoupling(group, cfg["shape"], hidden_fields=2, kernel_sizes=(3, 3), **cfg["kw"]))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("group", GROUPS)
def test_reconstruction_and_exact_logdet(group, name):
    t = layer(group, name)
    x = torch.randn(3, *CONFIGS[name]["shape"])
    # float32 round trips relative to the outputs: over 16 seeds at most 7e-7 of them for affine
    # maps, 3.7e-6 for splines (their inverse solves a quadratic); float64 at most 3e-14
    assert max_reconstruction_error(t, x) <= 1.5e-5 * output_scale(t, x)
    z, ld = t(x)
    assert torch.allclose(ld, autograd_logdet(t, x), atol=1e-4)
    # the spline's inverse solves a quadratic per site: in float32 its log-derivative differs by
    # round-off (up to 4.3e-5 x (1 + |log-det|) over 300 random batches, 2026-12-04); affine maps
    # agree exactly, and in float64 every kind agrees to round-off
    rel = 1e-4 if "spline" in name else 1e-5
    assert ((t.inverse(z)[1] + ld).abs() <= rel * (1 + ld.abs())).all()
    t64, x64 = t.double(), x.double()
    z64, ld64 = t64(x64)
    assert torch.allclose(t64.inverse(z64)[1], -ld64, rtol=0, atol=1e-10)
    assert max_reconstruction_error(t64, x64) <= 1e-12
    assert ld.abs().max() > 1e-3 or name == "additive"  # the perturbed layer is not the identity


@pytest.mark.parametrize("name", ["affine", "additive", "sign", "squeezed", "squeezed2", "spline",
                                  "spline_squeezed", "orbit", "orbit_squeezed2", "mirrored", "mirrored_odd",
                                  "mirrored_squeezed", "mirrored_squeezed2", "mirrored_spline", "halving",
                                  "halving_squeezed2"])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equivariance_every_grid_element(group, name, dtype):
    G = Group(group)
    x = torch.randn(3, *CONFIGS[name]["shape"], dtype=dtype)
    levels = CONFIGS[name]["kw"].get("squeeze_levels", 0)
    act = squeezed_act(G, levels) if levels else None
    t = layer(group, name).to(dtype)
    # float32 round-off scales with the outputs (a fresh clone measured 3.05e-5, one ulp at a few
    # hundred); float64 checks that the equivariance is exact
    rel = 1e-5 * (1 + levels) if dtype == torch.float32 else 1e-12
    assert max_equivariance_error(t, G, x, act) <= rel * output_scale(t, x)


def conv_input_sizes(module, x):
    """Spatial sizes of every convolution's input during ``module(x)``."""
    sizes = []
    hooks = [m.register_forward_pre_hook(lambda m, a: sizes.append(tuple(a[0].shape[-2:])))
             for m in module.modules() if isinstance(m, GConv2d)]
    module(x)
    for h in hooks:
        h.remove()
    return set(sizes)


@pytest.mark.parametrize("group", ["d4", "c8"])
def test_squeezed_conditioner_runs_on_coarse_grid_where_grid_exact(group):
    """Subgroups of D4 permute sub-pixels exactly: the conditioner runs at 4^L times fewer pixels.
    C8's 45 degree turns do not, so there it runs on the un-squeezed grid."""
    t = GCoupling(group, (32, 2, 2), squeeze_levels=2, hidden_fields=1, kernel_sizes=(3, 3))
    assert conv_input_sizes(t, torch.randn(1, 32, 2, 2)) == ({(2, 2)} if group == "d4" else {(8, 8)})


def test_squeezed_layer_would_break_equivariance_without_unsqueezed_conditioner():
    """The same split treated as 8 scalar channels is not D4-equivariant: the fix is needed."""
    G = Group("d4")
    torch.manual_seed(1)
    naive = perturb(GCoupling("d4", (8, 2, 2), split=4, hidden_fields=2, kernel_sizes=(3, 3)))
    x = torch.randn(3, 8, 2, 2)
    assert max_equivariance_error(naive, G, x, squeezed_act(G)) > 1e-2


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_checkerboard_exact_on_parity_preserving_subgroup_only(group):
    G, t = Group(group), layer(group, "checkerboard")
    x = torch.randn(2, 1, 6, 6)
    y = t(x)[0]
    kept = [g for g in G.grid_elements if parity_preserving(G, g, 6, 6)]
    swapped = [g for g in G.grid_elements if g not in kept]
    assert {str(g) for g in kept} >= {"(rot 0 deg)", "(rot 180 deg)"} and swapped
    for g in kept:
        assert float((t(G.act(g, x))[0] - G.act(g, y)).abs().max()) <= 1e-5
    for g in swapped:
        assert float((t(G.act(g, x))[0] - G.act(g, y)).abs().max()) > 1e-3
    # Translations on the periodic lattice: even ones are symmetries, odd ones swap sublattices.
    for shift, exact in [((1, 1), True), ((2, 0), True), ((1, 0), False)]:
        err = float((t(torch.roll(x, shift, (2, 3)))[0] - torch.roll(y, shift, (2, 3))).abs().max())
        assert (err <= 1e-5) == exact, (shift, err)


@pytest.mark.parametrize("size", [3, 4, 5, 8])
def test_mirrored_checkerboard_is_invariant_under_d4_and_splits_pixels(size):
    """Every element of D4 about the centre maps the pattern onto itself (the plain checkerboard's
    quarter turns swap it on even grids), and both sides are non-empty."""
    G = Group("d4")
    m = mirrored_checkerboard(size, size)
    assert all(torch.equal(G.act(g, m), m) for g in G.grid_elements)
    assert 0 < float(m.mean()) < 1 and torch.equal(mirrored_checkerboard(size, size, 1), 1 - m)
    plain = checkerboard(size, size)  # invariant only where the centre is a pixel
    assert all(torch.equal(G.act(g, plain), plain) for g in G.grid_elements) == bool(size % 2)


def assert_moves_only_masked_entries(group, name):
    t = layer(group, name)
    x = torch.randn(2, *CONFIGS[name]["shape"])
    y, _ = t(x)
    keep = ~t.mask_b.bool().expand_as(x)
    assert torch.equal(y[keep], x[keep]) and float((y - x)[~keep].abs().max()) > 1e-3
    return t


def test_mirrored_mask_moves_one_side_and_refuses_a_grid_it_cannot_split():
    t = assert_moves_only_masked_entries("d4", "mirrored_squeezed")
    assert float(t.mask_b.mean()) == 0.5  # half of each coarse site's sub-pixels
    with pytest.raises(ValueError, match="every pixel on one side"):
        GCoupling("d4", (1, 2, 2), mask="mirrored")
    with pytest.raises(ValueError, match="whole fields"):
        GCoupling("d4", (6, 2, 2), mask="mirrored", squeeze_levels=1)


def test_halving_mask_moves_the_leaving_pixels_and_refuses_an_unsqueezed_input():
    """Glow's split prior for HalvingSqueeze: the pixels it keeps condition the ones it lets leave."""
    from gflows.representations import squeeze
    from gflows.transforms.reshape import HalvingSqueeze

    t = assert_moves_only_masked_entries("d4", "halving")
    kept = HalvingSqueeze((8, 4, 4), 1).perm[:16]
    moved = squeeze(t.mask_b)[0, :, 0, 0].bool()  # one coarse site of the next squeeze
    assert not moved[kept].any() and int(moved.sum()) == 16
    with pytest.raises(ValueError, match="squeezed at least once"):
        GCoupling("d4", (2, 4, 4), mask="halving")
    with pytest.raises(ValueError, match="even grid"):
        GCoupling("d4", (8, 3, 3), mask="halving", squeeze_levels=1)


@pytest.mark.parametrize("group", GROUPS)
def test_sign_symmetry(group):
    t = layer(group, "sign")
    x = torch.randn(3, 2, 4, 4)
    y, ld = t(x)
    y_neg, ld_neg = t(-x)
    assert torch.allclose(y_neg, -y, atol=1e-6) and torch.allclose(ld_neg, ld, atol=1e-5)


def test_log_scale_is_bounded():
    t = GCoupling("c4", (2, 4, 4), hidden_fields=2, kernel_sizes=(3, 3), scale_bound=1.5)
    perturb(t, scale=50.0)
    _, ld = t(torch.randn(2, 2, 4, 4) * 100)
    assert float(ld.abs().max()) <= 1.5 * 16


@pytest.mark.parametrize("name", ["affine", "checkerboard"])
def test_bad_input_and_settings(name):
    t = layer("c4", name)
    for x, err, word in bad_inputs(CONFIGS[name]["shape"]):
        with pytest.raises(err, match=word):
            t(x)
        with pytest.raises(err, match=word):
            t.inverse(x)
    with pytest.raises(ValueError, match="unknown mask"):
        GCoupling("c4", (2, 4, 4), mask="stripes")
    with pytest.raises(ValueError, match="sub-pixels together"):
        GCoupling("c4", (8, 2, 2), squeeze_levels=1, split=2)


def test_spline_coupling_starts_as_identity_and_rejects_bad_settings():
    t = GCoupling("d4", (2, 4, 4), spline_bins=4)
    x = torch.randn(3, 2, 4, 4)
    y, ld = t(x)
    assert torch.allclose(y, x, atol=1e-6) and float(ld.abs().max()) < 1e-5
    for kw, word in [(dict(sign_symmetric=True), "sign_symmetric"), (dict(affine=False), "affine"),
                     (dict(spline_bins=-1), "spline_bins"), (dict(spline_bound=0.0), "spline_bound")]:
        with pytest.raises(ValueError, match=word):
            GCoupling("c4", (2, 4, 4), **({"spline_bins": 4} | kw))


def test_spline_checkerboard_keeps_the_conditioning_sublattice():
    assert_moves_only_masked_entries("trivial", "spline_checkerboard")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relaxed_couplings_stay_invertible_with_exact_logdets(dtype):
    from helpers import autograd_logdet, max_reconstruction_error, perturb

    layer = perturb(GCoupling("d4", (2, 4, 4), hidden_fields=2, relax=0.5, basis="orbit")).to(dtype)
    x = torch.randn(3, 2, 4, 4, dtype=dtype)
    scale = output_scale(layer, x)  # float32 round-off scales with the outputs
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert max_reconstruction_error(layer, x) < tol * scale
    atol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(layer(x)[1], autograd_logdet(layer, x), atol=atol)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_context_conditions_the_map_and_moves_with_the_input(group, dtype):
    G = Group(group)
    torch.manual_seed(2)
    t = perturb(GCoupling(group, (2, 5, 5), mask="mirrored", context_channels=3, hidden_fields=2,
                          kernel_sizes=(3, 3))).to(dtype)
    x, c = torch.randn(3, 2, 5, 5, dtype=dtype), torch.randn(3, 3, 5, 5, dtype=dtype)
    z, ld = t(x, c)
    assert not torch.allclose(t(x, c + 1)[0], z)  # the context enters the map
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    back, ld_inv = t.inverse(z, c)
    assert (back - x).abs().max() <= tol * 10 and (ld_inv + ld).abs().max() <= tol * 10
    exact = 1e-4 if dtype == torch.float32 else 1e-10
    for i in range(len(x)):
        def one(v, i=i):
            return t(v.view(1, 2, 5, 5), c[i : i + 1])[0].flatten()

        jac = torch.autograd.functional.jacobian(one, x[i].flatten())
        assert abs(float(torch.linalg.slogdet(jac).logabsdet - ld[i])) <= exact
    for g in G.grid_elements:
        zg, ldg = t(G.act(g, x), G.act(g, c))
        assert (zg - G.act(g, z)).abs().max() <= tol * (1 + z.abs().max())
        assert (ldg - ld).abs().max() <= tol * (1 + ld.abs().max())


def test_context_errors_name_the_problem():
    t = GCoupling("flip", (2, 4, 4), context_channels=3, hidden_fields=2)
    x = torch.randn(2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"needs a context of shape \(2, 3, 4, 4\), got none"):
        t(x)
    with pytest.raises(ValueError, match=r"got shape \(2, 1, 4, 4\)"):
        t(x, torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="whole squeezed fields of 4 sub-pixels"):
        GCoupling("flip", (8, 2, 2), squeeze_levels=1, context_channels=2)

import pytest
import torch

import gflows
from gflows.models import g_residual_flow, image_flow, image_model


def test_d4_residual_flow_on_rgb_images_is_invariant_and_samples():
    flow = g_residual_flow("d4", (3, 8, 8), n_blocks=2, hidden_fields=2)
    x = torch.randn(4, 3, 8, 8)
    flow.train()
    flow.log_prob(x)  # ActNorm data-dependent initialisation
    flow.eval()
    G = gflows.Group("d4")
    with torch.no_grad():
        lp = flow.log_prob(x)  # estimated (stochastic) in eval mode: just finite and batched
        assert lp.shape == (4,) and bool(torch.isfinite(lp).all())
    with gflows.logdet_mode(flow, "exact"):
        lp = flow.log_prob(x[:1])
        for g in G.grid_elements:
            assert torch.allclose(flow.log_prob(G.act(g, x[:1])), lp, atol=1e-4)
        s = flow.sample(2)
    assert s.shape == (2, 3, 8, 8)
    z, _ = flow.transform(s)
    assert torch.isfinite(z).all()


KINDS = [("residual", 2), ("coupling", 2), ("iaf", 1), ("glow_butterfly", 1)]


@pytest.mark.parametrize("kind, scales", KINDS)
def test_multiscale_builders_invert_and_are_equivariant(kind, scales):
    from helpers import max_equivariance_error, max_reconstruction_error, perturb

    torch.manual_seed(0)
    kw = {"kernel_sizes": (3, 3)} if kind != "residual" else {}
    t = image_flow(kind, "d4", (3, 4, 4), n_scales=scales, blocks_per_scale=1, hidden_fields=2, **kw)
    if kind != "residual":
        perturb(t, 0.05)
    t.eval()
    x = torch.randn(2, 3, 4, 4)
    z, _ = t(x)
    assert z.shape == (2, 3 * 4 ** (scales - 1), 4 // 2 ** (scales - 1), 4 // 2 ** (scales - 1))
    assert max_reconstruction_error(t, x) <= 1e-5
    if scales == 1:
        assert max_equivariance_error(t, gflows.Group("d4"), x) <= 1e-5
    flow = gflows.Flow(t)
    with gflows.logdet_mode(flow, "exact"):
        lp = flow.log_prob(x)
        for g in gflows.Group("d4").grid_elements:
            assert torch.allclose(flow.log_prob(gflows.Group("d4").act(g, x)), lp, atol=1e-4)


def test_image_model_bits_per_dim_counts_preprocessing():
    import math

    flow = image_model("coupling", "c4", (3, 4, 4), n_scales=1, blocks_per_scale=1, hidden_fields=2,
                       actnorm=False)
    x = torch.randint(0, 256, (3, 3, 4, 4)).float()
    bpd = -flow.log_prob(x) / (48 * math.log(2))
    # An identity-initialised coupling: the density is the logit-normal, finite and above 0 bits.
    assert torch.isfinite(bpd).all() and bool((bpd > 0).all())
    with pytest.raises(ValueError, match="unknown flow kind"):
        image_flow("maf", "c4", (3, 4, 4))


@pytest.mark.parametrize("scales", [1, 2])
def test_residual_model_with_final_fc_blocks(scales):
    from helpers import max_reconstruction_error, perturb, squeezed_act

    from gflows.transforms.residual import GFCResidualBlock

    torch.manual_seed(0)
    t = image_flow("residual", "d4", (3, 4, 4), n_scales=scales, blocks_per_scale=1, hidden_fields=1,
                   fc_blocks=2, fc_hidden=8)
    assert sum(isinstance(m, GFCResidualBlock) for m in t.modules()) == 2
    perturb(t, 0.05).eval()  # ActNorm off its identity start; the blocks stay contractions
    G = gflows.Group("d4")
    x = torch.randn(2, 3, 4, 4)
    assert max_reconstruction_error(t, x) <= 1e-5
    z, _ = t(x)
    act = squeezed_act(G, scales - 1) if scales > 1 else G.act
    assert max(float((t(G.act(g, x))[0] - act(g, z)).abs().max()) for g in G.grid_elements) <= 1e-5
    with gflows.logdet_mode(t, "exact"):
        _, ld = t(x)
        for g in G.grid_elements:
            assert torch.allclose(t(G.act(g, x))[1], ld, atol=1e-4)
    with pytest.raises(ValueError, match="fc_blocks"):
        image_flow("coupling", "d4", (3, 4, 4), fc_blocks=1)


def assert_equivariant_exactly(t, group, x, levels, atol, ld_atol):
    """With exact log-dets, ``t(g x) = g t(x)`` (the output squeezed ``levels`` times) and the
    log-det is invariant, for every grid element of ``group``."""
    from helpers import squeezed_act

    G = gflows.Group(group)
    act = squeezed_act(G, levels)
    with gflows.logdet_mode(t, "exact"):
        z, ld = t(x)
        for g in G.grid_elements:
            zg, ldg = t(G.act(g, x))
            assert float((zg - act(g, z)).abs().max()) <= atol
            assert torch.allclose(ldg, ld, atol=ld_atol)


@pytest.mark.parametrize("kind", ["coupling", "residual"])
def test_squeeze_first_invconv_model_runs_every_block_at_half_resolution_or_less(kind):
    from helpers import max_reconstruction_error, perturb

    from gflows.nn.equivariant import GConv2d
    from gflows.transforms.invconv import GInvConv1x1

    torch.manual_seed(0)
    t = image_flow(kind, "d4", (3, 8, 8), n_scales=2, blocks_per_scale=1, hidden_fields=1,
                   kernel_sizes=(3, 3), squeeze_first=True, invconv=True)
    assert sum(isinstance(m, GInvConv1x1) for m in t.modules()) == 2
    perturb(t, 0.05).eval()
    sizes = []
    for m in t.modules():
        if isinstance(m, GConv2d) and m.kernel_size > 1:
            m.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[-1]))
    x = torch.randn(2, 3, 8, 8)
    z, ld = t(x)
    assert z.shape == (2, 48, 2, 2) and set(sizes) == {4, 2}
    assert max_reconstruction_error(t, x) <= 1e-5
    assert_equivariant_exactly(t, "d4", x, 2, 1e-5, 1e-4)
    with pytest.raises(ValueError, match="n_scales"):
        image_flow(kind, "d4", (3, 8, 8), n_scales=0)


@pytest.mark.parametrize("group", ["flip", "d4"])
@pytest.mark.parametrize("kind", ["coupling", "residual"])
def test_factor_out_model_is_exact_and_equivariant_with_fewer_channels_later(kind, group):
    """Glow's split by whole fields: of the 3 fields at the first scale 2 go on; couplings keep two
    fields at every scale, residual blocks go down to one. Equivariant, exact log-det."""
    from helpers import autograd_logdet, max_reconstruction_error, perturb

    from gflows.transforms.coupling import GCoupling
    from gflows.transforms.reshape import FactorOut
    from gflows.transforms.residual import GResidualBlock

    torch.manual_seed(0)
    t = image_flow(kind, group, (3, 8, 8), n_scales=3, blocks_per_scale=1, hidden_fields=1,
                   kernel_sizes=(3, 3), squeeze_first=True, invconv=True, factor_out=True)
    blocks = [m.event_shape for m in t.modules() if isinstance(m, (GCoupling, GResidualBlock))]
    last = (128, 1, 1) if kind == "coupling" else (64, 1, 1)
    assert blocks == [(12, 4, 4), (32, 2, 2), last]
    assert sum(isinstance(m, FactorOut) for m in t.modules()) == (1 if kind == "coupling" else 2)
    perturb(t, 0.05).eval()
    t.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert max_reconstruction_error(t, x) <= 1e-5  # residual blocks: fixed-point inverse
    with gflows.logdet_mode(t, "exact"):
        z, ld = t(x)
        assert z.shape == (2, 48, 2, 2)
        assert torch.allclose(ld, autograd_logdet(t, x), atol=1e-6)
    assert_equivariant_exactly(t, group, x, 2, 1e-6, 1e-5)  # escnn's basis: to float32 precision


@pytest.mark.parametrize("kind", ["coupling", "residual"])
def test_scale_kernel_sizes_set_each_scales_convolutions(kind):
    """``scale_kernel_sizes``: the blocks of each scale get their own kernel sizes (overriding
    ``kernel_sizes``), and the model stays exact and equivariant."""
    from helpers import max_reconstruction_error, perturb

    from gflows.nn.equivariant import GConv2d
    from gflows.transforms.coupling import GCoupling
    from gflows.transforms.residual import GResidualBlock

    torch.manual_seed(0)
    t = image_flow(kind, "d4", (3, 8, 8), n_scales=2, blocks_per_scale=1, hidden_fields=1,
                   squeeze_first=True, kernel_sizes=(3, 3, 3), scale_kernel_sizes=[[3, 1, 3], [1, 1]])
    blocks = [m for m in t.modules() if isinstance(m, (GCoupling, GResidualBlock))]
    kernels = [[c.kernel_size for c in b.modules() if isinstance(c, GConv2d)] for b in blocks]
    assert kernels == [[3, 1, 3], [1, 1]]
    perturb(t, 0.05).eval()
    t.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert max_reconstruction_error(t, x) <= 1e-9
    assert_equivariant_exactly(t, "d4", x, 2, 1e-10, 1e-10)
    with pytest.raises(ValueError, match="one non-empty list of kernel sizes per scale"):
        image_flow(kind, "d4", (3, 8, 8), n_scales=2, squeeze_first=True, scale_kernel_sizes=[[3]])


def assert_exact_and_d4_equivariant(t, dtype, levels):
    """A perturbed 3 x 8 x 8 model of D4 inverts and is equivariant (outputs squeezed ``levels``
    times) to round-off: float32 1e-5 (log-dets 1e-4), float64 1e-10."""
    from helpers import max_reconstruction_error, perturb

    perturb(t, 0.05).eval()
    t.to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    tol, ld_tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-10, 1e-10)
    assert max_reconstruction_error(t, x) <= tol
    assert_equivariant_exactly(t, "d4", x, levels, tol, ld_tol)


@pytest.mark.parametrize("kind", ["coupling", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_per_scale_as_one_count_per_scale(kind, dtype):
    """``blocks_per_scale`` as a list: each scale gets its own number of blocks (none at all for a
    zero), and the model stays exact and equivariant; bad counts are named."""

    from gflows.transforms.coupling import GCoupling
    from gflows.transforms.reshape import Squeeze
    from gflows.transforms.residual import GResidualBlock

    torch.manual_seed(0)
    t = image_flow(kind, "d4", (3, 8, 8), n_scales=3, blocks_per_scale=[1, 0, 2], hidden_fields=1)
    kinds = (GCoupling, GResidualBlock, Squeeze)
    layout = [type(m).__name__ for m in t.modules() if isinstance(m, kinds)]
    block = "GCoupling" if kind == "coupling" else "GResidualBlock"
    assert layout == [block, "Squeeze", "Squeeze", block, block]
    assert_exact_and_d4_equivariant(t, dtype, levels=2)
    for bad in ([1, 2], [0, 0, 0], [1, -1, 1], 0):
        with pytest.raises(ValueError, match="blocks_per_scale must be"):
            image_flow(kind, "d4", (3, 8, 8), n_scales=3, blocks_per_scale=bad)


@pytest.mark.parametrize("kind", ["coupling", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hidden_fields_as_one_count_per_scale(kind, dtype):
    """``hidden_fields`` as a list: each scale's blocks get their own width, and the model stays
    exact and equivariant; bad widths are named."""

    from gflows.nn.equivariant import GConv2d
    from gflows.transforms.coupling import GCoupling
    from gflows.transforms.residual import GResidualBlock

    torch.manual_seed(0)
    t = image_flow(kind, "d4", (3, 8, 8), n_scales=2, blocks_per_scale=1, hidden_fields=[1, 3])
    blocks = [m for m in t.modules() if isinstance(m, (GCoupling, GResidualBlock))]
    first_convs = [next(m for m in b.modules() if isinstance(m, GConv2d)) for b in blocks]
    assert [c.out_channels for c in first_convs] == [8, 24]  # regular D4 fields of 8 channels
    assert_exact_and_d4_equivariant(t, dtype, levels=1)
    for bad in ([1], [1, 0], [2, 2, 2], 0):
        with pytest.raises(ValueError, match="hidden_fields must be"):
            image_flow(kind, "d4", (3, 8, 8), n_scales=2, hidden_fields=bad)


HALVING_CASES = [("coupling", group, dtype, False) for group in ("trivial", "flip", "d4")
                 for dtype in (torch.float32, torch.float64)]
HALVING_CASES += [("residual", "d4", torch.float64, False), ("coupling", "d4", torch.float64, True)]


@pytest.mark.parametrize("kind, group, dtype, prior", HALVING_CASES)
def test_halving_split_gives_glows_channels_and_an_exact_invariant_density(kind, group, dtype, prior):
    """``factor_out='half'``: half of every field's sub-pixels stay at each split (HalvingSqueeze),
    so the scales run on 12, 24 and 48 channels as Glow's do; invertible, exact log-det, and the
    log-density invariant under the group to round-off (float32: 1e-4, float64: 1e-10); with
    ``split_prior`` a ``mask='halving'`` coupling before each split as well."""
    from helpers import autograd_logdet, max_reconstruction_error, perturb

    from gflows.transforms.coupling import GCoupling
    from gflows.transforms.reshape import FactorOut, HalvingSqueeze
    from gflows.transforms.residual import GResidualBlock

    torch.manual_seed(0)
    t = image_flow(kind, group, (3, 8, 8), n_scales=3, blocks_per_scale=1, hidden_fields=1,
                   kernel_sizes=(3, 3), squeeze_first=True, invconv=True, factor_out="half",
                   split_prior=prior)
    blocks = [m.event_shape for m in t.modules() if isinstance(m, (GCoupling, GResidualBlock))]
    assert blocks == ([(12, 4, 4), (12, 4, 4), (24, 2, 2), (24, 2, 2), (48, 1, 1)] if prior else
                      [(12, 4, 4), (24, 2, 2), (48, 1, 1)])
    assert sum(getattr(m, "mask_kind", "") == "halving" for m in t.modules()) == 2 * prior
    assert sum(isinstance(m, HalvingSqueeze) for m in t.modules()) == 2
    assert sum(isinstance(m, FactorOut) for m in t.modules()) == 2
    perturb(t, 0.05).eval()
    t.to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    assert max_reconstruction_error(t, x) <= (1e-5 if dtype == torch.float32 else 1e-9)
    flow = gflows.Flow(t)
    with gflows.logdet_mode(t, "exact"):
        z, ld = t(x)
        assert z.shape == (2, 48, 2, 2)
        if dtype == torch.float64:
            assert torch.allclose(ld, autograd_logdet(t, x), atol=1e-9)
        lp = flow.log_prob(x)
        G = gflows.Group(group)
        for g in G.grid_elements:
            assert torch.allclose(flow.log_prob(G.act(g, x)), lp, atol=tol * float(lp.abs().max()), rtol=0)


def test_halving_split_without_squeeze_first_and_bad_settings():
    """Fields of one channel cannot be halved: the first squeeze keeps them all, later ones halve."""
    from gflows.transforms.coupling import GCoupling
    from gflows.transforms.reshape import FactorOut

    t = image_flow("coupling", "d4", (3, 8, 8), n_scales=3, blocks_per_scale=1, hidden_fields=1,
                   kernel_sizes=(3, 3), factor_out="half")
    assert [m.event_shape for m in t.modules() if isinstance(m, GCoupling)] == \
        [(3, 8, 8), (12, 4, 4), (24, 2, 2)]
    assert sum(isinstance(m, FactorOut) for m in t.modules()) == 1
    with pytest.raises(ValueError, match="unknown factor_out 'halves'"):
        image_flow("coupling", "d4", (3, 8, 8), factor_out="halves")


@pytest.mark.parametrize("group", ["flip", "d4"])
def test_split_prior_is_a_learned_conditional_gaussian_and_keeps_the_model_exact(group):
    """Glow's split prior: a zero-initialised coupling of the leaving field on the kept ones before
    each FactorOut. It starts as the identity (the same log-density as without it), and once
    trained the model stays exactly invertible, with its exact log-det, and equivariant."""
    from helpers import autograd_logdet, max_reconstruction_error, perturb

    from gflows.flow import Flow
    from gflows.transforms.coupling import GCoupling
    from gflows.transforms.reshape import FactorOut

    kw = dict(n_scales=2, blocks_per_scale=1, hidden_fields=1, kernel_sizes=(3, 3), squeeze_first=True,
              invconv=True, factor_out=True)
    torch.manual_seed(0)
    plain = image_flow("coupling", group, (3, 8, 8), **kw)
    torch.manual_seed(0)
    t = image_flow("coupling", group, (3, 8, 8), split_prior=True, **kw)
    prior, split = t.transforms[-2:]
    assert isinstance(split, FactorOut) and isinstance(prior, GCoupling)
    assert prior.split == split.channels == 2 * 16  # two of the three fields stay, on 16 sub-pixels
    assert len(list(t.parameters())) > len(list(plain.parameters()))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(Flow(t).log_prob(x), Flow(plain).log_prob(x), atol=1e-5)  # zero init
    perturb(t, 0.05).eval()
    t.double()
    x = x.double()
    assert max_reconstruction_error(t, x) <= 1e-10
    z, ld = t(x)
    assert torch.allclose(ld, autograd_logdet(t, x), atol=1e-8)
    assert_equivariant_exactly(t, group, x, 2, 1e-10, 1e-10)
    with pytest.raises(ValueError, match="split_prior"):
        image_flow("coupling", group, (3, 8, 8), n_scales=2, split_prior=True)


@pytest.mark.parametrize("kind", ["coupling", "residual", "iaf"])
def test_relaxed_to_flip_models_are_exactly_flip_equivariant_and_only_so(kind):
    """A D4 model relaxed towards the mirror (``relax_to='flip'``) is, once its free filters have
    moved, equivariant with an invariant log-det under the mirror to float64 round-off, and not
    under quarter turns; the config path (``flow.block.relax_to``) builds it."""
    from helpers import perturb, squeezed_act

    from gflows.models.config import image_model_from_config
    from gflows.nn.equivariant import GConv2d

    torch.manual_seed(0)
    kw = {"kernel_sizes": (3, 3)} if kind != "residual" else {}
    t = image_flow(kind, "d4", (3, 4, 4), n_scales=1, blocks_per_scale=2, hidden_fields=1, relax=0.5,
                   relax_to="flip", **kw).double()
    perturb(t, 0.1).eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    G = gflows.Group("d4")
    act = squeezed_act(G, 0)
    with torch.no_grad(), gflows.logdet_mode(t, "exact"):
        z, ld = t(x)
        errors = {}
        for g in G.grid_elements:
            zg, ldg = t(G.act(g, x))
            errors[str(g)] = max(float((zg - act(g, z)).abs().max()), float((ldg - ld).abs().max()))
    keeps = {str(g) for g in G.subgroup_elements("flip")}
    assert all((e < 1e-10) == (g in keeps) for g, e in errors.items()), errors
    flow = {"name": "tiny", "domain": "image", "kind": kind, "group": "d4", "hidden_channels": 8,
            "n_scales": 1, "blocks_per_scale": 1, "block": {"relax": 0.5, "relax_to": "flip", **kw}}
    model = image_model_from_config(flow, (3, 4, 4), alpha=0.05)
    convs = [m for m in model.modules() if isinstance(m, GConv2d)]
    assert convs and all(m.relax_to == gflows.Group("flip") for m in convs)

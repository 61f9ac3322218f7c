import pytest
import torch
from helpers import perturb

from gflows.models.lattice import lattice_flow, realnvp_baseline
from gflows.physics.phi4 import Phi4
from gflows.physics.report import log_weights
from gflows.training.lattice import train_reverse_kl
from gflows.transforms.coupling import checkerboard


def about_a_site(k: int, flip: bool):
    """Rotation by ``k`` quarter turns (after a reflection) about a lattice site, periodic: ``rot90``
    turns about the array centre, and a one-site roll moves that centre back onto a site."""
    def g(x):
        y = torch.flip(x, (-1,)) if flip else x
        y = torch.rot90(y, k, (-2, -1))
        odd = (k % 2 == 1) != flip  # these swap the sublattices of an even array: roll one site
        return torch.roll(y, 1, -1) if odd else y
    return g


SITE_D4 = [(k, f) for f in (False, True) for k in range(4)]


@pytest.mark.parametrize("k, flip", SITE_D4)
def test_d4_flow_is_exactly_equivariant_about_a_site(k, flip):
    torch.manual_seed(0)
    flow = perturb(lattice_flow(6, n_layers=4, hidden_fields=1, kernel_sizes=(3, 3), zero_mode_bins=4,
                                momentum_scale=True), 0.2)
    assert type(flow.transform.transforms[-1]).__name__ == "MomentumScale"
    g = about_a_site(k, flip)
    x = torch.randn(3, 1, 6, 6)
    board = checkerboard(6, 6)
    assert torch.equal(g(board), board)  # keeps the sublattices: a symmetry of every coupling
    z = flow.transform(x)[0]
    # float32 round-off grows with the outputs and the log-densities (the initial flow, built from
    # escnn's numerically computed basis, differs from machine to machine): relative bounds
    assert torch.allclose(flow.transform(g(x))[0], g(z), atol=1e-5 * max(1.0, float(z.abs().max())))
    assert torch.allclose(flow.log_prob(g(x)), flow.log_prob(x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["coupling", "residual"])
def test_lattice_flow_relaxed_to_c4_keeps_the_turns_exactly_and_breaks_the_mirrors(kind):
    """``relax_to='c4'`` under D4 (the free filters C4-equivariant): in float64 the flow commutes
    with every quarter turn about a site to round-off, and with no reflection once it has moved."""
    from gflows.models.lattice import residual_lattice_flow

    torch.manual_seed(0)
    kw = {"basis": "auto", "relax": 0.5, "relax_to": "c4", "hidden_fields": 1, "kernel_sizes": (3, 3)}
    flow = (lattice_flow(6, n_layers=2, **kw) if kind == "coupling"
            else residual_lattice_flow(6, n_blocks=1, **kw, n_exact_terms=2))
    flow = perturb(flow, 0.2).double().eval()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    z = flow.transform(x)[0]
    for k, flip in SITE_D4:
        g = about_a_site(k, flip)
        error = float((flow.transform(g(x))[0] - g(z)).abs().max())
        assert (error < 1e-10) == (not flip), (k, flip, error)


@pytest.mark.parametrize("k, flip", SITE_D4[1::2])
def test_spline_coupling_flow_is_exactly_equivariant_about_a_site(k, flip):
    """Spline couplings (the last two of four) keep the D4 and even-translation symmetries; being
    monotonic but not odd, they drop phi -> -phi."""
    torch.manual_seed(0)
    # The orbit basis: exactly equivariant in float64 (escnn's float32 basis only to ~1e-7)
    flow = perturb(lattice_flow(6, n_layers=4, hidden_fields=1, kernel_sizes=(3, 3), sign_symmetric=False,
                                spline_layers=2, spline_bins=4, site_spline_bins=4, basis="auto"), 0.2)
    g, x = about_a_site(k, flip), torch.randn(3, 1, 6, 6)
    # Exact in float64; float32 round-off grows through the layers (e^s up to e^3 each) to ~1e-5.
    flow.double()
    assert torch.allclose(flow.transform(g(x.double()))[0], g(flow.transform(x.double())[0]), atol=1e-12)
    flow.float()
    with torch.no_grad():
        z = flow.transform(x)[0]
        # float32 round-off relative to the outputs and log-densities (|z| up to ~70 at random inits)
        assert torch.allclose(flow.transform(g(x))[0], g(z), atol=1e-5 * max(1.0, float(z.abs().max())))
        assert torch.allclose(flow.log_prob(g(x)), flow.log_prob(x), atol=1e-4, rtol=1e-5)
        even = torch.roll(x, (1, 1), (2, 3))
        assert torch.allclose(flow.log_prob(even), flow.log_prob(x), atol=1e-4, rtol=1e-5)
        assert not torch.allclose(flow.log_prob(-x), flow.log_prob(x), atol=1e-3)
        # The inverse amplifies z's float32 rounding by up to e^3 per coupling, so x is recovered only
        # as well as the exact (float64) inverse of the rounded z recovers it: within 20x of that
        # (worst seen 9.4x over 1,000 random flows) plus 1e-5 relative to |z|.
        error = float((flow.transform.inverse(z)[0] - x).abs().max())
        flow.double()
        conditioning = float((flow.transform.inverse(z.double())[0] - x.double()).abs().max())
        assert error <= 20 * conditioning + 1e-5 * float(z.abs().max())
    assert torch.allclose(flow.transform.inverse(flow.transform(x.double())[0])[0], x.double(), atol=1e-12)
    with pytest.raises(ValueError, match="sign-symmetric"):
        lattice_flow(6, n_layers=4, spline_layers=2)
    with pytest.raises(ValueError, match="spline_layers"):
        lattice_flow(6, n_layers=4, sign_symmetric=False, spline_layers=5)


@pytest.mark.parametrize(("mode", "activation"), [(True, "lipswish"), ("odd", "tanh")])
def test_sign_flip_and_even_translations_only(mode, activation):
    torch.manual_seed(0)
    flow = perturb(lattice_flow(6, n_layers=4, hidden_fields=1, kernel_sizes=(3, 3), zero_mode_bins=4,
                                sign_symmetric=mode, activation=activation, site_spline_bins=4), 0.2)
    x = torch.randn(3, 1, 6, 6)
    z, lq = flow.transform(x)[0], flow.log_prob(x)
    assert torch.allclose(flow.transform(-x)[0], -z, atol=1e-5)  # phi -> -phi
    assert torch.allclose(flow.log_prob(-x), lq, atol=1e-4)
    even = torch.roll(x, (1, 1), (2, 3))
    assert torch.allclose(flow.transform(even)[0], torch.roll(z, (1, 1), (2, 3)), atol=1e-5)
    odd = torch.roll(x, (1, 0), (2, 3))  # swaps the sublattices: not a symmetry of the layers
    assert not torch.allclose(flow.transform(odd)[0], torch.roll(z, (1, 0), (2, 3)), atol=1e-3)


def test_realnvp_baseline_is_the_reviews_architecture():
    flow = realnvp_baseline(8)
    couplings = list(flow.transform.transforms)
    assert len(couplings) == 16
    convs = [m for m in couplings[0].conditioner.net.layers if hasattr(m, "basis_weights")]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding_mode) for c in convs] == [
        (1, 8, 3, "circular"), (8, 8, 3, "circular"), (8, 2, 3, "circular")]
    assert isinstance(couplings[0].conditioner.net.layers[1], torch.nn.LeakyReLU)
    x = torch.randn(4, 1, 8, 8)
    s, t = couplings[0].conditioner(x)
    assert s.abs().max() < 1 and t.abs().max() < 1 and t.abs().max() > 0  # final tanh, not zero-initialised
    assert not torch.allclose(flow.log_prob(-x), flow.log_prob(x), atol=1e-3)  # no sign symmetry


def test_reverse_kl_training_lowers_the_loss_and_reports_ess():
    torch.manual_seed(1)
    th = Phi4(4, -4.0, 6.0)
    flow = lattice_flow(4, n_layers=4, hidden_fields=1, kernel_sizes=(3, 3))
    history = train_reverse_kl(flow, th, steps=60, batch_size=64, lr=5e-3, log_every=20)
    _, lw = log_weights(flow, th, 512)
    untrained = lattice_flow(4, n_layers=4, hidden_fields=1, kernel_sizes=(3, 3))
    _, lw0 = log_weights(untrained, th, 512)
    assert float(-lw.mean()) < float(-lw0.mean()) - 1.0
    assert len(history) == 3 and 0 < history[-1]["ess_batch"] <= 1


def test_symmetrised_sampler_is_exactly_invariant_and_samples_its_density():
    """The 32-coset mixture of a trivial-group checkerboard flow: log q_G is invariant under every
    lattice symmetry (odd translations, rotations, reflections about any point, phi -> -phi), which q
    alone is not; its samples are its own (log_prob of the samples matches); e^{-1}(e(x)) = x."""
    from gflows.models.lattice import LatticeSymmetrised

    torch.manual_seed(0)
    flow = perturb(lattice_flow(4, n_layers=2, hidden_fields=1, group="trivial", sign_symmetric=False,
                                kernel_sizes=(3,), site_spline_bins=4), 0.3)
    sym = LatticeSymmetrised(flow)
    assert len(sym.elements) == 32
    x = torch.randn(5, 1, 4, 4)
    for e in sym.elements:
        assert torch.equal(sym.act(e, sym.act(e, x), inverse=True), x)
    lq = sym.log_prob(x)
    for g in (lambda y: torch.roll(y, 1, -2), lambda y: torch.rot90(y, 1, (-2, -1)),
              lambda y: torch.flip(y, (-2,)), lambda y: -y, lambda y: torch.roll(y.transpose(-1, -2), 3, -1)):
        assert torch.allclose(sym.log_prob(g(x)), lq, atol=1e-5)
        assert not torch.allclose(flow.log_prob(g(x)), flow.log_prob(x), atol=1e-3)
    # The samples follow q_G: E_{q_G}[q / q_G] = 1 (a wrong normalisation, or samples of q itself
    # without the random images, would miss it). Stochastic, seeded: 5 standard errors.
    with torch.no_grad():
        y, lq_y = sym.sample_and_log_prob(4096)
        ratio = torch.exp(flow.log_prob(y) - lq_y)
    assert y.shape == (4096, 1, 4, 4)
    assert abs(float(ratio.mean()) - 1) < 5 * float(ratio.std()) / 4096**0.5



@pytest.mark.parametrize("group", ["trivial", "d4"])
def test_residual_sampler_density_has_every_symmetry_of_the_action(group):
    """Circular residual blocks commute with every translation (no sublattice), the D4 ones with
    rotations and reflections, the odd ones with phi -> -phi: log q is invariant under all of them."""
    from gflows.groups import Group
    from gflows.models.lattice import residual_lattice_flow
    from gflows.transforms.residual import logdet_mode

    torch.manual_seed(0)
    flow = perturb(residual_lattice_flow(4, n_blocks=2, hidden_fields=1, group=group, kernel_sizes=(3, 3),
                                         site_spline_bins=4, basis="auto"), 0.1).double().eval()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    d4 = Group("d4")
    with logdet_mode(flow, "exact"):
        lq = flow.log_prob(x)
        images = [torch.roll(x, 1, -1), torch.roll(x, (1, 2), (-2, -1)), -x]
        if group == "d4":
            images += [d4.act(g, x) for g in d4.elements]
        for y in images:
            assert torch.allclose(flow.log_prob(y), lq, atol=1e-10)
        if group == "trivial":  # not vacuous: the trivial-group flow sees a quarter turn
            assert not torch.allclose(flow.log_prob(d4.act(d4.elements[1], x)), lq, atol=1e-6)


@pytest.mark.parametrize("L", [0, 1, 6.0, "8"])
def test_lattice_flow_names_a_size_it_cannot_take(L):
    # L = 0 had built a flow on an empty lattice
    with pytest.raises(ValueError, match=f"whole lattice size L >= 2, got {L!r}"):
        lattice_flow(L, n_layers=2)

import pytest
import torch

from gflows.physics.observables import measure, two_point


def test_constant_fields_give_closed_form_observables():
    L, V = 4, 16
    c = torch.tensor([1.0, -1.0, 2.0, -2.0]).repeat(25)  # 100 configurations
    phi = c[:, None, None].expand(-1, L, L)
    out = measure(phi, bin_size=4)
    assert out["abs_m"][0] == pytest.approx(1.5)  # mean |c|
    assert out["chi2"][0] == pytest.approx(V * 2.5)  # <M^2>/V = V <c^2>
    assert out["chi2_conn"][0] == pytest.approx(V * (2.5 - 1.5**2))
    assert out["energy"][0] == pytest.approx(2.5)  # G(mu) = <c^2>
    assert out["bin_size"][0] == 4


def test_two_point_function_matches_direct_sum():
    phi = torch.randn(3, 5, 5, dtype=torch.float64)
    g = two_point(phi)
    direct = torch.stack([(phi * torch.roll(phi, (-i, -j), (1, 2))).mean((1, 2))
                          for i in range(5) for j in range(5)], 1).view(3, 5, 5)
    assert torch.allclose(g, direct)


def test_correlation_length_of_a_free_field():
    """Effective mass of a massive free field's zero-momentum correlator: cosh(1/xi) = 1 + m^2/2."""
    from gflows.physics.mcmc import hmc
    from gflows.physics.phi4 import Phi4

    g = torch.Generator().manual_seed(0)
    m2 = 0.5
    th = Phi4(8, m2=m2, lam=1e-9)
    chains, _ = hmc(th.action, th.force, torch.zeros(128, 8, 8, dtype=torch.float64), 120,
                    n_steps=8, step_size=0.25, generator=g)
    out = measure(chains[20:].transpose(0, 1).reshape(-1, 8, 8), bin_size=100)
    # the action's kinetic term is sum (phi_{x+mu} - phi_x)^2, i.e. twice the usual normalisation,
    # so the lattice mass is m^2 = m2 (per the factor 2 on both terms): cosh(1/xi) = 1 + m2 / 2.
    exact = 1 / torch.acosh(torch.tensor(1 + m2 / 2)).item()
    # t = 1 effective mass on a periodic lattice of 8 is biased by the backward-moving image:
    # allow that bias (a few percent at L = 8 for xi ~ 1.4) on top of 4 standard errors.
    assert abs(out["xi"][0] - exact) < 4 * out["xi"][1] + 0.05 * exact


def test_reweighted_constant_fields_give_closed_form_weighted_averages():
    L, V = 4, 16
    c = torch.tensor([1.0, -1.0, 2.0, -2.0]).repeat(25)
    phi = c[:, None, None].expand(-1, L, L)
    log_w = torch.tensor([1.0, 1.0, 3.0, 3.0]).log().repeat(25)
    out = measure(phi, bin_size=4, log_w=log_w)
    assert out["abs_m"][0] == pytest.approx((1 + 1 + 6 + 6) / 8)
    assert out["chi2"][0] == pytest.approx(V * (1 + 1 + 12 + 12) / 8)
    assert out["chi2_conn"][0] == pytest.approx(V * (26 / 8 - (14 / 8) ** 2))
    # equal weights give the unweighted averages
    flat = measure(phi, bin_size=4, log_w=torch.zeros(100))
    plain = measure(phi, bin_size=4)
    for k in ("abs_m", "chi2", "chi2_conn", "energy"):
        assert flat[k][0] == pytest.approx(plain[k][0])


def test_reweighting_recovers_the_target_within_its_errors():
    """Draws from a wider Gaussian q = N(0, 1.1^2) per site, reweighted to p = N(0, 1): then M ~ N(0, V)
    under p, so chi2 = <M^2>/V = 1 and <|M|>/V = sqrt(2 / (pi V)). Stochastic (seeded): 4 SE."""
    import math

    g = torch.Generator().manual_seed(0)
    L, V, s = 4, 16, 1.1
    phi = s * torch.randn(20000, L, L, generator=g, dtype=torch.float64)
    log_w = (phi**2).flatten(1).sum(1) * (1 / (2 * s**2) - 0.5)
    out = measure(phi, log_w=log_w)
    assert out["bin_size"][0] == 20000 // 256
    assert abs(out["chi2"][0] - 1) < 4 * out["chi2"][1]
    assert abs(out["abs_m"][0] - math.sqrt(2 / (math.pi * V))) < 4 * out["abs_m"][1]
    # the unweighted draws are far off: the test can tell the difference
    assert abs(measure(phi, bin_size=10)["chi2"][0] - 1) > 10 * out["chi2"][1]


def test_reweighting_rejects_bad_weights():
    phi = torch.randn(8, 4, 4)
    with pytest.raises(ValueError, match="log_w"):
        measure(phi, bin_size=2, log_w=torch.zeros(7))
    with pytest.raises(ValueError, match="finite"):
        measure(phi, bin_size=2, log_w=torch.tensor([0.0] * 7 + [float("nan")]))


def test_default_bin_size_follows_the_slowest_observable():
    """|M| is constant here and the energy density varies slowly: the bin must follow the energy."""
    from gflows.physics.mcmc import tau_int

    g = torch.Generator().manual_seed(1)
    n, L = 4000, 4
    slow = torch.randn(n // 50, generator=g).repeat_interleave(50)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1.0
    checker = (torch.arange(L)[:, None] + torch.arange(L)[None]) % 2 * 2 - 1.0
    phi = sign[:, None, None] + slow[:, None, None] * checker  # M = sign * V, energy 1 - slow^2
    tau_energy = tau_int(1 - slow**2)[0]
    assert tau_energy > 5
    assert measure(phi)["bin_size"][0] >= 4 * tau_energy

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

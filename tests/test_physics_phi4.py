import math

import pytest
import torch

from gflows.groups import Group
from gflows.physics.phi4 import PRESETS, Phi4, from_hopping, to_hopping


def test_action_against_hand_computed_value():
    th = Phi4(2, m2=-4.0, lam=8.0)
    phi = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]])
    # On a 2 x 2 periodic lattice each site has its neighbour in each direction twice:
    # kinetic = sum over sites and mu of (phi_{x+mu} - phi_x)^2
    kinetic = (2 - 1) ** 2 + (1 - 2) ** 2 + (-1 - 0) ** 2 + (0 + 1) ** 2  # direction 1 (rows)
    kinetic += (0 - 1) ** 2 + (-1 - 2) ** 2 + (1 - 0) ** 2 + (2 + 1) ** 2  # direction 0 (cols)
    potential = sum(-4 * v**2 + 8 * v**4 for v in (1.0, 2.0, 0.0, -1.0))
    assert float(th.action(phi)) == pytest.approx(kinetic + potential)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_action_symmetries(name):
    th = Phi4.preset(name)
    phi = torch.randn(3, th.L, th.L)
    s = th.action(phi)
    G = Group("d4")
    for g in G.grid_elements:
        assert torch.allclose(th.action(G.act(g, phi)), s, rtol=1e-5)
    assert torch.allclose(th.action(torch.roll(phi, (1, 3), (1, 2))), s, rtol=1e-5)
    assert torch.allclose(th.action(-phi), s)


def test_force_is_the_gradient():
    th = Phi4(4, -4.0, 5.0)
    phi = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(th.action(phi).sum(), phi)
    assert torch.allclose(th.force(phi.detach()), grad)


def test_hopping_map_round_trip_and_action():
    m2, lam = -4.0, 6.008
    kappa, lam_h = to_hopping(m2, lam)
    assert from_hopping(kappa, lam_h) == pytest.approx((m2, lam))
    psi = torch.randn(2, 5, 5, dtype=torch.float64)
    hop = sum(-2 * kappa * psi * torch.roll(psi, -1, d) for d in (1, 2))
    s_h = (hop + (1 - 2 * lam_h) * psi**2 + lam_h * psi**4).flatten(1).sum(1)
    assert torch.allclose(Phi4(5, m2, lam).action(math.sqrt(kappa) * psi), s_h)
    assert Phi4.hopping(5, kappa, lam_h).lam == pytest.approx(lam)


def test_bad_parameters():
    with pytest.raises(ValueError, match="unbounded below"):
        Phi4(8, -4.0, 0.0)
    with pytest.raises(ValueError, match=">= 2"):
        Phi4(1, -4.0, 1.0)
    with pytest.raises(ValueError, match="unknown phi4 preset"):
        Phi4.preset("E9")
    with pytest.raises(ValueError, match="shape"):
        Phi4(4, -4.0, 1.0).action(torch.zeros(2, 4, 5))


def test_theory_from_preset_overrides_and_hopping_form():
    assert Phi4.from_settings("E2") == Phi4(8, -4.0, 6.008)
    assert Phi4.from_settings("E2", L=6, lam=7.0) == Phi4(6, -4.0, 7.0)
    kappa, lam_h = Phi4(8, -4.0, 8.0).hopping_parameters
    th = Phi4.from_settings("E2", kappa=kappa, lambda_h=lam_h)
    assert th.L == 8 and th.m2 == pytest.approx(-4.0) and th.lam == pytest.approx(8.0)
    with pytest.raises(ValueError, match="not both"):
        Phi4.from_settings("E2", m2=-3.0, kappa=0.2)
    with pytest.raises(ValueError, match="kappa"):
        Phi4.from_settings("E2", kappa=0.2)
    with pytest.raises(ValueError, match="give L"):
        Phi4.from_settings(None, m2=-4.0, lam=1.0)
    with pytest.raises(ValueError, match="unknown phi4 preset 'E9'"):
        Phi4.from_settings("E9")
    with pytest.raises(ValueError, match="unbounded below"):
        Phi4.from_settings("E2", lam=-1.0)
    with pytest.raises(ValueError, match="m2='abc': expected a number"):
        Phi4.from_settings("E2", m2="abc")
    with pytest.raises(ValueError, match="L=6.5: expected a whole number"):
        Phi4.from_settings("E2", L=6.5)
    with pytest.raises(ValueError, match="lambda_h=nan: expected a number"):
        Phi4.from_settings("E2", kappa=0.2, lambda_h=float("nan"))

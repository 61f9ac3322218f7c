"""float64 end to end: every family builds under a float64 default dtype (escnn's float32 internals
are guarded), and with the orbit basis is equivariant to float64 round-off, after squeezes too."""

from __future__ import annotations

import pytest
import torch
from helpers import max_equivariance_error, perturb, squeezed_act

import gflows
from gflows.models.lattice import lattice_flow, residual_lattice_flow

LAYERS = {
    "coupling": (lambda g: gflows.GCoupling(g, (2, 4, 4), hidden_fields=1, kernel_sizes=(3, 3)), 0),
    "spline": (lambda g: gflows.GCoupling(g, (2, 4, 4), hidden_fields=1, kernel_sizes=(3, 3),
                                          spline_bins=4), 0),
    "iaf": (lambda g: gflows.GIAF(g, (2, 4, 4), hidden_fields=1, kernel_sizes=(3, 3)), 0),
    "residual": (lambda g: gflows.GResidualBlock(g, (2, 4, 4), hidden_fields=1, kernel_sizes=(3, 3)), 0),
    "squeezed_coupling": (lambda g: gflows.GCoupling(g, (8, 2, 2), squeeze_levels=1, hidden_fields=1,
                                                      kernel_sizes=(3, 3)), 1),
    "squeezed_residual": (lambda g: gflows.GResidualBlock(g, (8, 2, 2), squeeze_levels=1, hidden_fields=1,
                                                           kernel_sizes=(3, 3)), 1),
    "invconv": (lambda g: gflows.GInvConv1x1(g, (8, 2, 2), squeeze_levels=1), 1),
}


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("group", ["flip", "c4", "d4"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_build_in_float64_and_are_equivariant_to_round_off(name, group, float64_default):
    make, levels = LAYERS[name]
    torch.manual_seed(0)
    t = perturb(make(group), 0.1).eval()
    assert {p.dtype for p in t.parameters()} == {torch.float64}
    x = torch.randn(3, *t.event_shape)
    assert x.dtype == torch.float64
    with torch.no_grad():
        scale = float(t(x)[0].abs().max())
    act = squeezed_act(gflows.Group(group), levels) if levels else None
    assert max_equivariance_error(t, gflows.Group(group), x, act) <= 1e-12 * scale


def test_models_build_and_sample_under_a_float64_default(float64_default):
    torch.manual_seed(0)
    for flow in (gflows.g_residual_flow("d4", (3, 4, 4), n_blocks=1, hidden_fields=1),
                 lattice_flow(4, n_layers=2, hidden_fields=1, site_spline_bins=4, momentum_scale=True),
                 residual_lattice_flow(4, n_blocks=1, hidden_fields=1)):
        flow.train()
        flow.log_prob(torch.randn(4, *flow.transform.event_shape))  # ActNorm initialisation
        flow.eval()
        x, lq = flow.sample_and_log_prob(3)
        assert x.dtype == lq.dtype == torch.float64 and bool(torch.isfinite(lq).all())

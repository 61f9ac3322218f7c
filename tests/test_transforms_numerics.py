"""Fuzz: every bijection is finite and invertible to round-off for any parameter values.

Each layer's parameters are moved by Gaussian noise of scale up to 1; inputs go up to 1e4. Outputs,
inverses and log-dets must be finite everywhere, and for |x| of order 10 the round trip must hold
to ``1e-4`` relative (``|x' - x| / (1 + |x|)``) in float32 and ``1e-10`` in float64. These are single
layers: a stack multiplies the layers' condition numbers (each affine coupling can scale by e^3).
"""

from __future__ import annotations

import pytest
import torch

import gflows
from gflows.transforms.fourier import MomentumScale
from gflows.transforms.global_mode import OddSiteSpline, OddZeroModeSpline

SHAPE = (2, 4, 4)
LATTICE = (1, 4, 4)
BIJECTIONS = {
    "affine": lambda: gflows.GCoupling("d4", SHAPE, hidden_fields=1),
    "additive": lambda: gflows.GCoupling("d4", SHAPE, hidden_fields=1, affine=False),
    "spline": lambda: gflows.GCoupling("c4", SHAPE, hidden_fields=1, spline_bins=8),
    "checkerboard": lambda: gflows.GCoupling("d4", LATTICE, hidden_fields=1, mask="checkerboard",
                                             padding_mode="circular"),
    "sign_symmetric": lambda: gflows.GCoupling("d4", LATTICE, hidden_fields=1, mask="checkerboard",
                                               padding_mode="circular", sign_symmetric=True),
    "squeezed": lambda: gflows.GCoupling("d4", (8, 2, 2), hidden_fields=1, squeeze_levels=1),
    "iaf": lambda: gflows.GIAF("d4", SHAPE, hidden_fields=1),
    "site_spline": lambda: OddSiteSpline(LATTICE, 8, 3.0),
    "zero_mode_spline": lambda: OddZeroModeSpline(LATTICE, 8, 1.0),
    "momentum_scale": lambda: MomentumScale(LATTICE),
}
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(BIJECTIONS))
def test_any_parameters_invert_to_round_off(name, dtype):
    worst = 0.0
    for seed in range(3):
        for scale in (0.3, 1.0):
            torch.manual_seed(seed)
            t = BIJECTIONS[name]().to(dtype).eval()
            with torch.no_grad():
                for p in t.parameters():
                    p.add_(scale * torch.randn_like(p))
                for magnitude in (1.0, 10.0, 1e2, 1e4):
                    x = magnitude * torch.randn(8, *t.event_shape, dtype=dtype).clamp(-3, 3)
                    z, ladj = t(x)
                    xr, ladj_inv = t.inverse(z)
                    for v in (z, ladj, xr, ladj_inv):
                        assert bool(torch.isfinite(v).all()), f"non-finite: |x| ~ {magnitude}, noise {scale}"
                    if magnitude <= 10:
                        worst = max(worst, float(((xr - x).abs() / (1 + x.abs())).max()))
                        scale_ld = 1 + float(ladj.abs().max())
                        assert torch.allclose(ladj_inv, -ladj, rtol=1e-3, atol=1e-3 * scale_ld)
    assert worst <= TOL[dtype]

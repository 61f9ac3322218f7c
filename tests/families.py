"""One small instance of every layer family and model builder, for the protocol tests."""

from __future__ import annotations

import torch

import gflows
from gflows.models.image import image_flow
from gflows.models.lattice import lattice_flow, residual_lattice_flow

SHAPE = (2, 4, 4)


def _perturbed(t):
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return t


def _initialised(t, shape):
    t.train()
    t(torch.randn(8, *shape))  # ActNorm's data-dependent initialisation
    return t


FAMILIES = {
    "coupling": lambda: _perturbed(gflows.GCoupling("d4", SHAPE, hidden_fields=1, kernel_sizes=(3, 3))),
    "spline_coupling": lambda: _perturbed(
        gflows.GCoupling("c4", SHAPE, hidden_fields=1, kernel_sizes=(3, 3), spline_bins=4)),
    "iaf": lambda: _perturbed(gflows.GIAF("d4", SHAPE, hidden_fields=1, kernel_sizes=(3, 3))),
    "residual": lambda: gflows.GResidualBlock("d4", SHAPE, hidden_fields=1, kernel_sizes=(3, 3),
                                              logdet="exact"),
    "invconv": lambda: _perturbed(gflows.GInvConv1x1("d4", SHAPE)),
    "butterfly": lambda: _perturbed(gflows.Butterfly((4, 2, 2))),
    "image_residual": lambda: _initialised(
        image_flow("residual", "flip", (3, 4, 4), 2, 1, hidden_fields=1, kernel_sizes=(3, 3), logdet="exact"),
        (3, 4, 4)),
    "image_coupling": lambda: _initialised(_perturbed(
        image_flow("coupling", "d4", (3, 4, 4), 2, 1, hidden_fields=1, squeeze_first=True, invconv=True)),
        (3, 4, 4)),
    "lattice_coupling": lambda: _perturbed(
        lattice_flow(4, n_layers=2, hidden_fields=1, kernel_sizes=(3, 3), site_spline_bins=4,
                     momentum_scale=True).transform),
    "lattice_residual": lambda: _perturbed(
        residual_lattice_flow(4, n_blocks=2, hidden_fields=1, kernel_sizes=(3, 3), site_spline_bins=4,
                              logdet="exact").transform),
}


def make(name: str, dtype: torch.dtype = torch.float32):
    """The family's transform in ``dtype``, in evaluation mode (escnn builds in float32 first)."""
    torch.manual_seed(0)
    return FAMILIES[name]().to(dtype).eval()

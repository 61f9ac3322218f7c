r"""Observables of :math:`\phi^4` configurations ``[N, L, L]`` with binned-jackknife errors."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gflows.physics.mcmc import binned_jackknife, tau_int

__all__ = ["measure", "two_point"]


def two_point(phi: Tensor) -> Tensor:
    r"""Volume-averaged two-point function per configuration,
    :math:`G(x) = \frac{1}{V}\sum_y \phi_y \phi_{y+x}`, shape ``[N, L, L]`` (FFT)."""
    f = torch.fft.fft2(phi.double())
    return torch.fft.ifft2(f * f.conj()).real / (phi.shape[-1] * phi.shape[-2])


def measure(phi: Tensor, bin_size: int | None = None) -> dict[str, tuple[float, float]]:
    r"""Observables with errors: ``(value, error)`` each, plus the bin size used.

    * ``abs_m``: :math:`\langle |M| \rangle / V` with :math:`M = \sum_x \phi_x`;
    * ``chi2``: :math:`\langle M^2 \rangle / V`;
    * ``chi2_conn``: :math:`(\langle M^2\rangle - \langle|M|\rangle^2)/V`;
    * ``energy``: the Ising energy :math:`\frac12 \sum_\mu G(\hat\mu)`;
    * ``xi``: correlation length from the zero-momentum correlator's effective mass at ``t = 1``.

    The bin size defaults to ``max(1, ceil(4 tau_int(|M|)))``.
    """
    phi = phi.double()
    V = phi.shape[-1] * phi.shape[-2]
    m = phi.flatten(1).sum(1)
    if bin_size is None:
        tau, _ = tau_int(m.abs())
        bin_size = max(1, math.ceil(4 * tau))
    g = two_point(phi)
    ct = g.sum(-1)  # zero momentum in the second direction: C(t) = sum_x G(t, x)
    cols = torch.stack([m.abs() / V, m * m / V, m.abs(), 0.5 * (g[:, 1, 0] + g[:, 0, 1]),
                        ct[:, 0], ct[:, 1], ct[:, 2]], 1)

    def xi(means: Tensor) -> Tensor:
        c0, c1, c2 = means[0, 4], means[0, 5], means[0, 6]
        arg = (c0 + c2) / (2 * c1)
        # No decaying correlator (arg <= 1, e.g. a stuck chain): undefined, not a huge number.
        return 1 / torch.acosh(arg) if arg > 1 else torch.tensor(float("nan"), dtype=arg.dtype)

    out = {
        "abs_m": binned_jackknife(cols[:, 0], bin_size),
        "chi2": binned_jackknife(cols[:, 1], bin_size),
        "chi2_conn": binned_jackknife(cols, bin_size, lambda b: b[0, 1] - b[0, 2] ** 2 / V),
        "energy": binned_jackknife(cols[:, 3], bin_size),
        "xi": binned_jackknife(cols, bin_size, xi),
    }
    out["bin_size"] = (float(bin_size), 0.0)
    return out

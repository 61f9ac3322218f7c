r"""Observables of :math:`\phi^4` configurations ``[N, L, L]`` with binned-jackknife errors."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gflows.physics.mcmc import binned_jackknife, tau_int

__all__ = ["measure", "measure_primaries", "primaries", "two_point"]


def two_point(phi: Tensor) -> Tensor:
    r"""Volume-averaged two-point function per configuration,
    :math:`G(x) = \frac{1}{V}\sum_y \phi_y \phi_{y+x}`, shape ``[N, L, L]`` (FFT)."""
    f = torch.fft.fft2(phi.double())
    return torch.fft.ifft2(f * f.conj()).real / (phi.shape[-1] * phi.shape[-2])


def primaries(phi: Tensor) -> tuple[Tensor, int]:
    """Per-configuration primary observables ``[N, 7]`` (``|M|/V``, ``M^2/V``, ``|M|``, the Ising
    energy, ``C(0)``, ``C(1)``, ``C(2)``) of ``phi [N, L, L]``, and the volume ``V``."""
    phi = phi.double()
    V = phi.shape[-1] * phi.shape[-2]
    m = phi.flatten(1).sum(1)
    g = two_point(phi)
    ct = g.sum(-1)  # zero momentum in the second direction: C(t) = sum_x G(t, x)
    cols = torch.stack([m.abs() / V, m * m / V, m.abs(), 0.5 * (g[:, 1, 0] + g[:, 0, 1]),
                        ct[:, 0], ct[:, 1], ct[:, 2]], 1)
    return cols, V


def _xi(means: Tensor) -> Tensor:
    """Correlation length from the means of ``C(0), C(1), C(2)`` (columns 4-6)."""
    c0, c1, c2 = means[0, 4], means[0, 5], means[0, 6]
    arg = (c0 + c2) / (2 * c1)
    # No decaying correlator (arg <= 1, e.g. a stuck chain): undefined, not a huge number.
    return 1 / torch.acosh(arg) if arg > 1 else torch.tensor(float("nan"), dtype=arg.dtype)


def measure(phi: Tensor, bin_size: int | None = None, log_w: Tensor | None = None,
            ) -> dict[str, tuple[float, float]]:
    r"""Observables with errors: ``(value, error)`` each, plus the bin size used.

    * ``abs_m``: :math:`\langle |M| \rangle / V` with :math:`M = \sum_x \phi_x`;
    * ``chi2``: :math:`\langle M^2 \rangle / V`;
    * ``chi2_conn``: :math:`(\langle M^2\rangle - \langle|M|\rangle^2)/V`;
    * ``energy``: the Ising energy :math:`\frac12 \sum_\mu G(\hat\mu)`;
    * ``xi``: correlation length from the zero-momentum correlator's effective mass at ``t = 1``.

    Args:
        phi: configurations ``[N, L, L]``; consecutive rows consecutive in Monte Carlo time (a
            Markov chain), or independent draws.
        bin_size: jackknife bin. By default ``ceil(4 tau)`` with ``tau`` the largest integrated
            autocorrelation time of ``|M|``, ``M^2`` and the energy density (one observable's
            ``tau`` can be much shorter than another's, e.g. in an independence-MH chain that
            sticks at rare configurations of large ``|M|``); with ``log_w``, ``N // 256``.
        log_w: importance log-weights ``log p - log q`` of independent draws from ``q``: the
            averages are then self-normalised reweighted ones, :math:`\sum_i w_i O_i / \sum_i w_i`,
            with jackknife errors over bins of the draws (ratio estimators: biased by
            :math:`O(1/N)`, consistent).
    """
    return measure_primaries(*primaries(phi), bin_size=bin_size, log_w=log_w)


def measure_primaries(cols: Tensor, volume: int, bin_size: int | None = None, log_w: Tensor | None = None,
                      ) -> dict[str, tuple[float, float]]:
    """:func:`measure` from the per-configuration primaries ``[N, 7]`` of :func:`primaries` and the
    volume, for chains too long to keep whole (``hmc(..., observe=lambda p: primaries(p)[0])``)."""
    if cols.dim() != 2 or cols.shape[1] != 7:
        raise ValueError(f"primaries must be [N, 7], got shape {tuple(cols.shape)}")
    cols, V = cols.double(), volume
    if bin_size is None:
        if log_w is not None:
            bin_size = max(1, len(cols) // 256)
        else:
            bin_size = max(1, math.ceil(4 * max(tau_int(cols[:, k])[0] for k in (0, 1, 3))))

    estimators = {
        "abs_m": lambda b: b[0, 0],
        "chi2": lambda b: b[0, 1],
        "chi2_conn": lambda b: b[0, 1] - b[0, 2] ** 2 / V,
        "energy": lambda b: b[0, 3],
        "xi": _xi,
    }
    if log_w is not None:
        if log_w.shape != (len(cols),) or not bool(torch.isfinite(log_w).all()):
            raise ValueError(f"log_w must be {len(cols)} finite log-weights, got shape {tuple(log_w.shape)}")
        w = torch.exp(log_w.double() - log_w.max())
        cols = torch.cat([cols * w[:, None], w[:, None]], 1)

        def reweighted(fn):
            return lambda b: fn(b[:, :-1] / b[:, -1:])

        estimators = {k: reweighted(fn) for k, fn in estimators.items()}
    out = {k: binned_jackknife(cols, bin_size, fn) for k, fn in estimators.items()}
    out["bin_size"] = (float(bin_size), 0.0)
    return out

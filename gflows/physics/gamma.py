r"""Errors by Wolff's Gamma method with automatic windowing (U. Wolff, "Monte Carlo errors with less
errors", hep-lat/0306017), through ``pyerrors``, the lattice community's package.

The report's observables are functions of per-configuration means (``|M|/V``, ``M^2/V``, ``|M|``,
the energy density, ``C(0), C(1), C(2)``), so the Gamma method propagates the errors of those primary
observables, with their autocorrelations along the chain, to each derived one (``chi2_conn``,
``xi``): the counterpart of the binned jackknife in :func:`~gflows.physics.observables.measure`,
without a bin size to choose.
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from gflows.physics.observables import primaries

__all__ = ["measure_gamma"]


def measure_gamma(phi: Tensor, chains: int = 1, S: float = 2.0) -> dict[str, tuple[float, float, float]]:
    """The observables of :func:`~gflows.physics.observables.measure` as ``(value, error, error of
    the error)`` by the Gamma method, and ``tau_int_abs_m``: the integrated autocorrelation time of
    ``|M|`` with its error (and 0).

    Args:
        phi: configurations ``[N, L, L]``: ``chains`` Markov chains one after the other, consecutive
            rows of each consecutive in Monte Carlo time (pyerrors' replicas of one ensemble).
        chains: how many chains ``phi`` holds (equal lengths).
        S: Wolff's window parameter (pyerrors' default 2).
    """
    import pyerrors as pe

    cols, V = primaries(phi)
    if len(cols) % chains:
        raise ValueError(f"{len(cols)} configurations do not split into {chains} chains of equal length")
    reps = cols.T.numpy().reshape(cols.shape[1], chains, -1)
    names = [f"chain|r{i}" for i in range(chains)] if chains > 1 else ["chain"]
    obs = [pe.Obs([np.asarray(r) for r in c], names) for c in reps]
    abs_m_v, m2_v, abs_m, energy, c0, c1, c2 = obs
    arg = (c0 + c2) / (2 * c1)
    out = {"abs_m": abs_m_v, "chi2": m2_v, "chi2_conn": m2_v - abs_m * abs_m / V, "energy": energy}
    if arg.value > 1:
        out["xi"] = 1 / np.arccosh(arg)
    result = {}
    for k, o in out.items():
        o.gamma_method(S=S)
        result[k] = (float(o.value), float(o.dvalue), float(o.ddvalue))
    if "xi" not in result:  # no decaying correlator (a stuck chain): undefined, as in measure
        result["xi"] = (math.nan, math.nan, math.nan)
    abs_m_v.gamma_method(S=S)
    ens = abs_m_v.e_names[0]
    result["tau_int_abs_m"] = (float(abs_m_v.e_tauint[ens]), float(abs_m_v.e_dtauint[ens]), 0.0)
    return result

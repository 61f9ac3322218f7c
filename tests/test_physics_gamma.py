"""Gamma-method errors (pyerrors) against the binned jackknife and against known answers."""

import math

import pytest
import torch

from gflows.physics.gamma import measure_gamma
from gflows.physics.observables import measure


def ar1_fields(n: int, rho: float, L: int = 4, seed: int = 0) -> torch.Tensor:
    """Fields whose every site follows an AR(1) chain of correlation ``rho`` (tau_int of the field
    mean: (1 + rho) / (2 (1 - rho)))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, L, L, dtype=torch.float64)
    x[0] = torch.randn(L, L, generator=g, dtype=torch.float64)
    noise = torch.randn(n, L, L, generator=g, dtype=torch.float64) * math.sqrt(1 - rho**2)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + noise[t]
    return x + 0.5  # a non-zero mean, so that |M| behaves like M


def test_tau_of_an_ar1_chain_and_agreement_with_the_jackknife():
    rho = 0.8
    gamma = measure_gamma(ar1_fields(20000, rho))
    tau, dtau, _ = gamma["tau_int_abs_m"]
    assert abs(tau - (1 + rho) / (2 * (1 - rho))) < 3 * dtau + 0.2  # 4.5
    jk = measure(ar1_fields(20000, rho), bin_size=64)
    for k in ("abs_m", "chi2", "energy"):
        v, e, de = gamma[k]
        assert v == pytest.approx(jk[k][0], rel=1e-2)
        assert abs(e - jk[k][1]) < 3 * de + 0.25 * jk[k][1]


def test_independent_draws_have_tau_one_half_and_chains_are_replicas():
    phi = ar1_fields(8000, 0.0, seed=1)
    one, four = measure_gamma(phi), measure_gamma(phi, chains=4)
    assert abs(one["tau_int_abs_m"][0] - 0.5) < 3 * one["tau_int_abs_m"][1]
    assert four["chi2"][0] == pytest.approx(one["chi2"][0])
    assert four["chi2"][1] == pytest.approx(one["chi2"][1], rel=0.2)
    with pytest.raises(ValueError, match="do not split into 3 chains"):
        measure_gamma(phi, chains=3)

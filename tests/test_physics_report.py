"""The sampler report on samplers whose answer is known."""

import math

import pytest
import torch

from gflows.physics.observables import measure, measure_primaries, primaries
from gflows.physics.phi4 import Phi4
from gflows.physics.report import (
    OBSERVABLES,
    format_report,
    hmc_reference,
    log_partition,
    log_weights,
    sampler_report,
)


class Gaussian:
    """i.i.d. N(0, sigma^2) on every site: an exact sampler with a known density."""

    def __init__(self, L: int, sigma: float):
        self.L, self.sigma = L, sigma

    def sample_and_log_prob(self, n: int):
        x = self.sigma * torch.randn(n, 1, self.L, self.L, dtype=torch.float64)
        lq = (-0.5 * (x / self.sigma) ** 2 - math.log(self.sigma * math.sqrt(2 * math.pi))).flatten(1).sum(1)
        return x, lq


def test_log_weights_are_minus_action_minus_log_q():
    th, q = Phi4(4, -4.0, 6.0), Gaussian(4, 0.7)
    torch.manual_seed(0)
    phi, lw = log_weights(q, th, 100, batch=32)
    torch.manual_seed(0)
    x, lq = zip(*(q.sample_and_log_prob(m) for m in (32, 32, 32, 4)), strict=True)
    x, lq = torch.cat(x), torch.cat(lq)
    assert phi.shape == (100, 4, 4) and torch.allclose(lw, -th.action(x) - lq)


def test_report_runs_and_compares_with_hmc():
    th = Phi4(4, -4.0, 6.0)
    hmc = {"chains": 2, "trajectories": 100, "therm": 20, "n_steps": 10, "step_size": 0.1}
    report, arrays = sampler_report(Gaussian(4, 0.8), th, 512, hmc, seed=1)
    assert 0 < report["ess"] < 1 and 0 < report["mh_acceptance"] < 1  # a poor but valid sampler
    assert set(report["flow_gamma"]) >= set(OBSERVABLES) and set(report["errors_agree"]) == set(OBSERVABLES)
    cost = report["cost"]
    assert cost["flow_seconds_per_independent"] > 0 and cost["hmc_seconds_per_independent"] > 0
    assert set(report["z"]) == set(OBSERVABLES) and "m_hmc" in arrays and len(arrays["log_w"]) == 512
    text = format_report(report)
    assert "ESS/N on 512 fresh samples" in text and all(k in text for k in OBSERVABLES)
    ref, acc = hmc_reference(th, seed=2, **hmc)
    assert ref.shape == (200, 4, 4) and 0.5 < acc <= 1


@pytest.mark.parametrize("bin_size", [None, 100])
def test_hmc_reference_can_keep_only_the_primaries(bin_size):
    """The same chains (same seed) with only each configuration's primaries kept give the same
    rows, in the same chain-after-chain order, and the same observables."""
    th = Phi4(4, -4.0, 6.0)
    hmc = {"chains": 2, "trajectories": 100, "therm": 20, "n_steps": 10, "step_size": 0.1}
    ref, acc = hmc_reference(th, seed=2, **hmc)
    cols, acc_cols = hmc_reference(th, seed=2, observe=lambda c: primaries(c)[0], **hmc)
    assert acc_cols == acc and cols.shape == (200, 7)
    torch.testing.assert_close(cols, primaries(ref)[0], rtol=0, atol=0)
    assert measure_primaries(cols, th.volume, bin_size) == measure(ref, bin_size)
    with pytest.raises(ValueError, match=r"primaries must be \[N, 7\]"):
        measure_primaries(ref, th.volume)


def test_non_finite_log_weights_are_refused():
    class Broken(Gaussian):
        def sample_and_log_prob(self, n):
            x, lq = super().sample_and_log_prob(n)
            return x, lq * float("nan")

    with pytest.raises(RuntimeError, match="non-finite log-weights"):
        sampler_report(Broken(4, 1.0), Phi4(4, -4.0, 6.0), 64)


class ExactGaussian:
    """Samples of exactly the free theory's density ``exp(-S) / Z`` (precision ``2 A``); with
    ``width`` > 1 every mode's standard deviation that many times wider."""

    def __init__(self, theory: Phi4, width: float = 1.0):
        L = theory.L
        zero = torch.zeros(L * L, dtype=torch.float64)
        # S is quadratic, so exp(-S) is the normal density whose precision is S's Hessian
        precision = torch.autograd.functional.hessian(lambda v: theory.action(v.view(1, L, L))[0], zero)
        self.dist = torch.distributions.MultivariateNormal(zero, precision_matrix=precision / width**2)
        self.L = L

    def sample_and_log_prob(self, n):
        x = self.dist.sample((n,))
        return x.view(n, 1, self.L, self.L), self.dist.log_prob(x)


def test_log_z_of_the_free_theory():
    """Closed form (the Laplacian's eigenvalues) against importance sampling: exact for the exact
    Gaussian sampler (log w is constant), within 4 standard errors for a poorer one, 15% wider in
    every mode (over 100 seeds its z-scores had mean 0.02, SD 1.04, largest 3.7). A proposal
    narrower than the target in any mode, as an i.i.d. N(0, 0.7^2) is in the zero mode, gives
    weights of infinite variance, whose standard error means nothing."""
    th = Phi4(4, 0.5, 0.0)
    exact = th.gaussian_log_z()
    torch.manual_seed(0)
    _, lw = log_weights(ExactGaussian(th), th, 256)
    value, error = log_partition(lw)
    assert abs(value - exact) < 1e-6 and error < 1e-6
    _, lw = log_weights(ExactGaussian(th, width=1.15), th, 20000)
    value, error = log_partition(lw)
    assert 0 < error < 0.05 and abs(value - exact) < 4 * error
    with pytest.raises(ValueError, match="closed form only for lam = 0"):
        Phi4(4, -4.0, 6.0).gaussian_log_z()
    with pytest.raises(ValueError, match="unbounded below"):
        Phi4(4, -1.0, 0.0)

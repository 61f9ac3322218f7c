import math

import torch

from gflows.physics.mcmc import binned_jackknife, ess, hmc, independence_mh, tau_int
from gflows.physics.phi4 import Phi4


def test_ess_known_answers():
    assert abs(ess(torch.zeros(100)) - 1.0) < 1e-12
    # One weight e^2 and nine weights 1: (e^2 + 9)^2 / (10 (e^4 + 9)).
    lw = torch.zeros(10)
    lw[0] = 2.0
    e2 = math.exp(2)
    assert abs(ess(lw) - (e2 + 9) ** 2 / (10 * (e2**2 + 9))) < 1e-12
    assert abs(ess(lw + 1000.0) - ess(lw)) < 1e-12  # logsumexp: no overflow


def test_independence_mh_is_exact_on_a_discrete_target():
    """Target p = (0.5, 0.3, 0.2) on 3 states, uniform proposals: the chain's frequencies match p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    states = torch.randint(0, 3, (200_000,), generator=g)
    log_w = torch.log(p[states]) - math.log(1 / 3)
    idx, acc = independence_mh(log_w, g)
    chain = states[idx][1000:]
    freq = torch.bincount(chain, minlength=3).double() / len(chain)
    tau, _ = tau_int((chain == 0).double())
    se = torch.sqrt(p * (1 - p) * 2 * tau / len(chain))
    assert bool(((freq - p).abs() < 4 * se).all()), (freq, se)
    assert 0 < acc < 1


def test_tau_int_of_an_ar1_process():
    """AR(1) with coefficient a has tau_int = (1 + a) / (2 (1 - a))."""
    g = torch.Generator().manual_seed(1)
    a, n = 0.8, 200_000
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    x = torch.empty(n, dtype=torch.float64)
    x[0] = noise[0]
    for i in range(1, n):
        x[i] = a * x[i - 1] + noise[i] * math.sqrt(1 - a * a)
    tau, w = tau_int(x)
    assert abs(tau - (1 + a) / (2 * (1 - a))) < 0.4 and w > 0


def test_binned_jackknife_of_independent_data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10_000, generator=g, dtype=torch.float64) + 3
    mean, err = binned_jackknife(x, 10)
    assert abs(err - 0.01) < 0.002 and abs(mean - 3) < 4 * err
    # fn of means: <x^2> - <x>^2 is the variance, 1.
    pairs = torch.stack([x * x, x], 1)
    var, var_err = binned_jackknife(pairs, 10, lambda m: m[0, 0] - m[0, 1] ** 2)
    assert abs(var - 1) < 4 * var_err + 0.02


def test_hmc_samples_a_gaussian_exactly():
    """Free field with m2 > 0 and tiny lam: <phi^2> per site against exact Gaussian sampling."""
    g = torch.Generator().manual_seed(3)
    th = Phi4(4, m2=1.0, lam=1e-9)
    chains, acc = hmc(th.action, th.force, torch.zeros(64, 4, 4, dtype=torch.float64), 200,
                      n_steps=8, step_size=0.2, generator=g)
    # exact: covariance (2 (-Laplacian) + 2 m2)^-1 on the periodic lattice
    k = 2 * math.pi * torch.arange(4, dtype=torch.float64) / 4
    eig = 2 * (4 - 2 * torch.cos(k)[:, None] - 2 * torch.cos(k)[None, :]) + 2 * 1.0
    exact = float((1 / eig).mean())
    samples = chains[50:].pow(2).mean((2, 3))  # [traj, chain]
    est = float(samples.mean())
    err = float(samples.mean(0).std() / math.sqrt(samples.shape[1]))
    assert abs(est - exact) < 4 * err and acc > 0.7

"""Reweighting and Markov chains: effective sample size, independence Metropolis-Hastings, HMC,
integrated autocorrelation time and binned jackknife errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["binned_jackknife", "ess", "hmc", "independence_mh", "tau_int"]


def ess(log_w: Tensor) -> float:
    r"""Effective sample size per sample, :math:`(\sum w)^2 / (N \sum w^2)`, from ``log w``.

    Computed in log space (logsumexp), so it is safe for weights spanning many orders of magnitude.
    """
    log_w = log_w.double().flatten()
    if log_w.numel() == 0 or not bool(torch.isfinite(log_w).all()):
        raise ValueError("ess needs a non-empty vector of finite log-weights")
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)) / log_w.numel())


def independence_mh(log_w: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    """Independence Metropolis-Hastings over proposals with ``log w = log p - log q``.

    Proposal ``i`` is accepted with ``min(1, exp(log w_i - log w_current))``; the chain starts at
    proposal 0. Returns the index of the state at every step and the acceptance rate.
    """
    log_w = log_w.double().flatten()
    u = torch.rand(len(log_w), generator=generator, dtype=torch.float64)
    idx = torch.empty(len(log_w), dtype=torch.long)
    cur, accepted = 0, 0
    for i in range(len(log_w)):
        if i > 0 and math.log(float(u[i]) + 1e-300) < float(log_w[i] - log_w[cur]):
            cur, accepted = i, accepted + 1
        idx[i] = cur
    return idx, accepted / max(1, len(log_w) - 1)


def tau_int(x: Tensor, c: float = 5.0) -> tuple[float, int]:
    """Integrated autocorrelation time ``1/2 + sum_t rho(t)`` with the automatic window of
    Madras and Sokal (smallest ``W >= c tau(W)``). Returns ``(tau, W)``."""
    x = x.double().flatten()
    n = len(x)
    x = x - x.mean()
    var = float(x.pow(2).mean())
    if var == 0:
        return 0.5, 0
    f = torch.fft.rfft(x, 2 * n)
    acf = torch.fft.irfft(f * f.conj(), 2 * n)[:n] / (var * torch.arange(n, 0, -1, dtype=torch.float64))
    tau = 0.5
    for w in range(1, n):
        tau += float(acf[w])
        if w >= c * tau:
            return tau, w
    return tau, n - 1


def binned_jackknife(
    x: Tensor, bin_size: int, fn: Callable[[Tensor], Tensor] | None = None
) -> tuple[float, float]:
    """Mean of ``x`` (or ``fn`` of the means of its columns, given as ``[1, ...]``) and the jackknife
    error over consecutive bins of ``bin_size`` samples."""
    x = x.double()
    n_bins = len(x) // bin_size
    if n_bins < 2:
        raise ValueError(f"{len(x)} samples make fewer than 2 bins of {bin_size}")
    bins = x[: n_bins * bin_size].reshape(n_bins, bin_size, *x.shape[1:]).mean(1)
    fn = fn or (lambda b: b.mean(0))
    total = bins.sum(0)
    estimates = torch.stack([fn(((total - bins[i]) / (n_bins - 1))[None]) for i in range(n_bins)])
    full = fn(bins.mean(0)[None])
    err = math.sqrt((n_bins - 1) / n_bins * float((estimates - estimates.mean(0)).pow(2).sum()))
    return float(full), err


def hmc(action: Callable[[Tensor], Tensor], force: Callable[[Tensor], Tensor], phi: Tensor, n_traj: int,
        n_steps: int = 10, step_size: float = 0.1, generator: torch.Generator | None = None,
        observe: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, float]:
    """Hybrid Monte Carlo with a leapfrog integrator on a batch of independent chains.

    Returns the configurations after every trajectory ``[n_traj, batch, ...]`` (or, with
    ``observe``, what it makes of each trajectory's ``[batch, ...]`` configurations: long chains on
    large lattices need not be kept whole) and the acceptance rate.
    """
    out, acc = [], 0.0
    for _ in range(n_traj):
        p = torch.randn(phi.shape, generator=generator, dtype=phi.dtype)
        h0 = action(phi) + 0.5 * p.flatten(1).pow(2).sum(1)
        q = phi.clone()
        p = p - 0.5 * step_size * force(q)
        for s in range(n_steps):
            q = q + step_size * p
            if s < n_steps - 1:
                p = p - step_size * force(q)
        p = p - 0.5 * step_size * force(q)
        h1 = action(q) + 0.5 * p.flatten(1).pow(2).sum(1)
        accept = torch.rand(len(h0), generator=generator, dtype=phi.dtype) < torch.exp(h0 - h1)
        phi = torch.where(accept.view(-1, *([1] * (phi.dim() - 1))), q, phi)
        acc += float(accept.double().mean())
        out.append(phi.clone() if observe is None else observe(phi))
    return torch.stack(out), acc / n_traj

r"""How good a sampler of :math:`\phi^4` is: ESS on fresh samples, an independence
Metropolis-Hastings chain through them, observables with errors, and a comparison with HMC.

A *sampler* here is anything with ``sample_and_log_prob(n) -> (x [n, 1, L, L], log q [n])`` (a flow,
or :class:`~gflows.models.lattice.LatticeSymmetrised`); the report needs exact densities, so a
residual flow is passed inside ``logdet_mode(flow, "exact")``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gflows.physics.gamma import measure_gamma
from gflows.physics.mcmc import ess, hmc, independence_mh, tau_int
from gflows.physics.observables import measure, primaries
from gflows.physics.phi4 import Phi4

__all__ = ["OBSERVABLES", "format_report", "hmc_dataset", "hmc_reference", "log_partition", "log_weights",
           "sampler_report"]

OBSERVABLES = ("abs_m", "chi2", "chi2_conn", "energy", "xi")


@torch.no_grad()
def log_weights(sampler, theory: Phi4, n: int, batch: int = 1024) -> tuple[Tensor, Tensor]:
    """``n`` fresh samples ``[n, L, L]`` and their ``log w = -S - log q``."""
    xs, lws = [], []
    for i in range(0, n, batch):
        x, lq = sampler.sample_and_log_prob(min(batch, n - i))
        xs.append(x[:, 0])
        lws.append(-theory.action(x) - lq)
    return torch.cat(xs), torch.cat(lws)


def log_partition(log_w: Tensor) -> tuple[float, float]:
    r"""The importance-sampling estimate of :math:`\log Z` from the log-weights ``log w = -S - log q``
    of independent draws from ``q`` (Nicoli et al. 2020, arXiv 2007.07115), and its error.

    :math:`\hat Z = \frac1N\sum_i w_i` is unbiased; its relative standard error is
    :math:`\sqrt{(\overline{w^2}/\bar w^2 - 1)/N} = \sqrt{(1/\mathrm{ESS} - 1)/N}` with ESS the
    fraction :func:`~gflows.physics.mcmc.ess`, which is the error of :math:`\log \hat Z` to first
    order (its bias, about half its variance, is below the error for ESS not tiny).
    """
    lw = log_w.double()
    n = len(lw)
    log_z = float(torch.logsumexp(lw, 0)) - math.log(n)
    return log_z, math.sqrt(max(1 / ess(lw) - 1, 0.0) / n)


def hmc_reference(theory: Phi4, chains: int, trajectories: int, therm: int, n_steps: int,
                  step_size: float, seed: int, dtype: torch.dtype = torch.float64,
                  observe: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, float]:
    """HMC configurations ``[chains * trajectories, L, L]``, chain after chain (so that consecutive
    rows are consecutive in Monte Carlo time, as binning needs), and the acceptance rate. With
    ``observe`` (for example :func:`~gflows.physics.observables.primaries`' first output) the rows
    are what it makes of each trajectory's configurations, and no configuration is kept."""
    g = torch.Generator().manual_seed(seed)
    phi0 = 0.5 * torch.randn(chains, theory.L, theory.L, generator=g, dtype=dtype)
    phi, _ = hmc(theory.action, theory.force, phi0, therm, n_steps, step_size, g)
    out, acc = hmc(theory.action, theory.force, phi[-1], trajectories, n_steps, step_size, g, observe)
    return out.transpose(0, 1).reshape(-1, *out.shape[2:]), acc


def hmc_dataset(theory: Phi4, n_train: int, n_test: int, hmc_settings: dict, seed: int,
                dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """HMC configurations for maximum-likelihood training: ``hmc_settings['chains']`` chains (the
    other settings as for :func:`hmc_reference`, their length from the sizes), the first
    ``n_train / (n_train + n_test)`` of each chain for training and the rest, later in Monte Carlo
    time, held out: ``([n_train, L, L], [n_test, L, L])``."""
    chains = int(hmc_settings["chains"])
    if n_train <= 0 or n_test <= 0 or (n_train + n_test) % chains or n_train % chains:
        raise ValueError(f"{n_train} training and {n_test} test configurations must be positive "
                         f"multiples of the {chains} HMC chains")
    settings = {k: v for k, v in hmc_settings.items() if k != "trajectories"}
    phi, _ = hmc_reference(theory, trajectories=(n_train + n_test) // chains, seed=seed, dtype=dtype,
                           **settings)
    per_chain = phi.view(chains, -1, theory.L, theory.L)
    cut = n_train // chains
    L = theory.L
    return per_chain[:, :cut].reshape(-1, L, L), per_chain[:, cut:].reshape(-1, L, L)


def _slowest_tau(phi: Tensor, chains: int = 1) -> float:
    """The largest integrated autocorrelation time of ``|M|``, ``M^2`` and the energy along
    ``chains`` Markov chains stored one after the other in ``phi`` (the mean over the chains)."""
    cols = primaries(phi)[0][:, [0, 1, 3]].reshape(chains, -1, 3)
    return max(sum(tau_int(c[:, k])[0] for c in cols) / chains for k in range(3))


def _errors_agree(jackknife: dict, gamma: dict, n_bins: int) -> dict[str, bool]:
    """Whether the binned-jackknife and Gamma-method errors of each observable agree within twice
    their combined uncertainty (the jackknife error's own relative error is ``sqrt(2 / n_bins)``)."""
    out = {}
    for k in OBSERVABLES:
        (_, e_jk), (_, e_g, de_g) = jackknife[k], gamma[k]
        out[k] = bool(abs(e_jk - e_g) <= 2 * math.hypot(de_g, e_jk * math.sqrt(2 / max(n_bins, 1))))
    return out


def _compare(report: dict[str, Any], arrays: dict[str, Tensor], theory: Phi4, hmc_settings: dict,
             seed: int) -> None:
    """HMC's observables into ``report`` (jackknife and Gamma method), their distances to the
    flow's in combined standard errors, and HMC's seconds per independent configuration."""
    t0 = time.time()
    ref, hmc_acc = hmc_reference(theory, seed=seed, **hmc_settings)
    seconds = time.time() - t0
    hmc_obs = measure(ref)
    chains = int(hmc_settings["chains"])
    report["hmc"] = hmc_obs | {"acceptance": (hmc_acc, 0.0), "seconds": (seconds, 0.0)}
    report["hmc_gamma"] = measure_gamma(ref, chains)
    for key, obs in (("z", report["flow"]), ("z_reweighted", report["flow_reweighted"])):
        report[key] = {k: abs(obs[k][0] - hmc_obs[k][0]) / math.hypot(obs[k][1], hmc_obs[k][1])
                       for k in OBSERVABLES}
    per_trajectory = seconds / (chains * (int(hmc_settings["trajectories"]) + int(hmc_settings["therm"])))
    report["cost"]["hmc_seconds_per_independent"] = per_trajectory * 2 * _slowest_tau(ref, chains)
    arrays["m_hmc"] = ref.flatten(1).sum(1) / theory.volume


def _cost(sampling_seconds: float, n: int, tau: float, train_seconds: float | None,
          amortise: int) -> dict[str, Any]:
    """Seconds per independent sample of flow + MH: sampling (with densities) per proposal, plus the
    training time spread over ``amortise`` proposals, times the ``2 tau`` proposals of the chain per
    independent sample (``tau``: the slowest observable's)."""
    per_proposal = sampling_seconds / n + (train_seconds or 0.0) / amortise
    return {"train_seconds": train_seconds, "amortised_over": amortise,
            "sampling_seconds_per_proposal": sampling_seconds / n,
            "flow_seconds_per_independent": per_proposal * 2 * tau}


def sampler_report(sampler, theory: Phi4, n_samples: int, hmc_settings: dict | None = None, seed: int = 0,
                   train_seconds: float | None = None, amortise: int = 1_000_000,
                   ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """ESS/N on ``n_samples`` fresh samples, the free energy from the same samples
    (:func:`log_partition`), an independence-MH chain through them (acceptance, ``tau_int`` of
    ``|M|``), its observables with binned-jackknife and Gamma-method errors
    (:func:`~gflows.physics.gamma.measure_gamma`), the same observables by reweighting the fresh
    samples, the seconds per independent sample (training, ``train_seconds``, amortised over
    ``amortise`` samples) and, with ``hmc_settings`` (the arguments of :func:`hmc_reference` but the
    seed), HMC's observables, the differences in combined standard errors (``z`` for MH,
    ``z_reweighted``) and HMC's seconds per independent configuration.
    Returns the report and the arrays the plots need."""
    torch.manual_seed(seed)
    t0 = time.time()
    phi, lw = (t.cpu() for t in log_weights(sampler, theory, n_samples))  # MCMC and plots on the CPU
    sampling = time.time() - t0
    if not bool(torch.isfinite(lw).all()):
        raise RuntimeError("the flow produced non-finite log-weights: the sampler is unusable")
    idx, acc = independence_mh(lw, torch.Generator().manual_seed(seed))
    chain = phi[idx].double()
    tau, window = tau_int(chain.flatten(1).sum(1).abs())
    log_z, log_z_err = log_partition(lw)
    flow = measure(chain)
    gamma = measure_gamma(chain)
    report: dict[str, Any] = {
        "theory": {"L": theory.L, "m2": theory.m2, "lam": theory.lam},
        "n_samples": n_samples,
        "ess": ess(lw),
        "log_z": (log_z, log_z_err),
        "free_energy_density": (-log_z / theory.volume, log_z_err / theory.volume),
        "mh_acceptance": acc,
        "tau_int_abs_m": tau,
        "tau_window": window,
        "flow": flow,
        "flow_gamma": gamma,
        "errors_agree": _errors_agree(flow, gamma, n_samples // int(flow["bin_size"][0])),
        "flow_reweighted": measure(phi, log_w=lw),
        "cost": _cost(sampling, n_samples, _slowest_tau(chain), train_seconds, amortise),
    }
    arrays = {"log_w": lw.double(), "m_flow": chain.flatten(1).sum(1) / theory.volume}
    if hmc_settings is not None:
        _compare(report, arrays, theory, hmc_settings, seed + 1)
    return report, arrays


def _summary(report: dict[str, Any]) -> list[str]:
    th, cost = report["theory"], report["cost"]
    (lz, dlz), (f, df) = report["log_z"], report["free_energy_density"]
    hmc = report.get("hmc")
    lines = [
        f"phi4 L={th['L']} m2={th['m2']} lam={th['lam']}",
        f"ESS/N on {report['n_samples']} fresh samples: {report['ess']:.4f}"
        + (" (the flow mixed over the 32 lattice-symmetry cosets)" if report.get("symmetrised") else ""),
        f"log Z = {lz:.5f} +- {dlz:.5f}, free energy density F/V = {f:.6f} +- {df:.6f} "
        "(importance sampling on the same samples)",
        f"independence MH: acceptance {report['mh_acceptance']:.3f}, tau_int(|M|) "
        f"{report['tau_int_abs_m']:.2f} (window {report['tau_window']}); Gamma method "
        f"{report['flow_gamma']['tau_int_abs_m'][0]:.2f} +- {report['flow_gamma']['tau_int_abs_m'][1]:.2f}",
        f"bin size: flow MH {int(report['flow']['bin_size'][0])}, reweighted "
        f"{int(report['flow_reweighted']['bin_size'][0])}"
        + (f", HMC {int(hmc['bin_size'][0])} (HMC acceptance {hmc['acceptance'][0]:.3f})" if hmc else ""),
        f"seconds per independent sample: flow + MH {cost['flow_seconds_per_independent']:.3g} "
        f"(training {cost['train_seconds'] or 0:.0f} s over {cost['amortised_over']:,} samples)"
        + (f", HMC {cost['hmc_seconds_per_independent']:.3g}" if hmc else ""),
    ]
    if report.get("init_from"):
        lines.insert(1, f"started from the weights of {report['init_from']}")
    disagree = [k for k, ok in report["errors_agree"].items() if not ok]
    if disagree:
        lines.append(f"jackknife and Gamma-method errors of the MH chain disagree for {', '.join(disagree)}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as a table: flow (MH with binned-jackknife and Gamma-method errors, and
    reweighted) and HMC observables with errors and their distances in combined standard errors."""
    hmc_head = f" {'HMC':>22s} {'z MH':>5s} {'z rw':>5s}" if "hmc" in report else ""
    lines = _summary(report) + [
        f"{'observable':10s} {'flow (MH)':>22s} {'Gamma err':>9s} {'flow (reweighted)':>22s}" + hmc_head]
    for k in OBSERVABLES:
        (v, e), (vr, er) = report["flow"][k], report["flow_reweighted"][k]
        row = f"{k:10s} {v:12.5f} +- {e:7.5f} {report['flow_gamma'][k][1]:9.5f} {vr:12.5f} +- {er:7.5f}"
        if "hmc" in report:
            hv, he = report["hmc"][k]
            row += f" {hv:12.5f} +- {he:7.5f} {report['z'][k]:5.2f} {report['z_reweighted'][k]:5.2f}"
        lines.append(row)
    return "\n".join(lines)

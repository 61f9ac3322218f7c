r"""How good a sampler of :math:`\phi^4` is: ESS on fresh samples, an independence
Metropolis-Hastings chain through them, observables with errors, and a comparison with HMC.

A *sampler* here is anything with ``sample_and_log_prob(n) -> (x [n, 1, L, L], log q [n])`` (a flow,
or :class:`~gflows.models.lattice.LatticeSymmetrised`); the report needs exact densities, so a
residual flow is passed inside ``logdet_mode(flow, "exact")``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from gflows.physics.mcmc import ess, hmc, independence_mh, tau_int
from gflows.physics.observables import measure
from gflows.physics.phi4 import Phi4

__all__ = ["OBSERVABLES", "format_report", "hmc_reference", "log_weights", "sampler_report"]

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


def hmc_reference(theory: Phi4, chains: int, trajectories: int, therm: int, n_steps: int,
                  step_size: float, seed: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, float]:
    """HMC configurations ``[chains * trajectories, L, L]``, chain after chain (so that consecutive
    rows are consecutive in Monte Carlo time, as binning needs), and the acceptance rate."""
    g = torch.Generator().manual_seed(seed)
    phi0 = 0.5 * torch.randn(chains, theory.L, theory.L, generator=g, dtype=dtype)
    phi, _ = hmc(theory.action, theory.force, phi0, therm, n_steps, step_size, g)
    phi, acc = hmc(theory.action, theory.force, phi[-1], trajectories, n_steps, step_size, g)
    return phi.transpose(0, 1).reshape(-1, theory.L, theory.L), acc


def _compare(report: dict[str, Any], arrays: dict[str, Tensor], theory: Phi4, hmc_settings: dict,
             seed: int) -> None:
    """HMC's observables into ``report`` and their distances to the flow's in combined standard errors."""
    t0 = time.time()
    ref, hmc_acc = hmc_reference(theory, seed=seed, **hmc_settings)
    hmc_obs = measure(ref)
    report["hmc"] = hmc_obs | {"acceptance": (hmc_acc, 0.0), "seconds": (time.time() - t0, 0.0)}
    for key, obs in (("z", report["flow"]), ("z_reweighted", report["flow_reweighted"])):
        report[key] = {k: abs(obs[k][0] - hmc_obs[k][0]) / math.hypot(obs[k][1], hmc_obs[k][1])
                       for k in OBSERVABLES}
    arrays["m_hmc"] = ref.flatten(1).sum(1) / theory.volume


def sampler_report(sampler, theory: Phi4, n_samples: int, hmc_settings: dict | None = None, seed: int = 0,
                   ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """ESS/N on ``n_samples`` fresh samples, an independence-MH chain through them (acceptance,
    ``tau_int`` of ``|M|``), its observables with errors, the same observables by reweighting the
    fresh samples and, with ``hmc_settings`` (the arguments of :func:`hmc_reference` but the seed),
    HMC's and the differences in combined standard errors (``z`` for MH, ``z_reweighted``).
    Returns the report and the arrays the plots need."""
    torch.manual_seed(seed)
    phi, lw = (t.cpu() for t in log_weights(sampler, theory, n_samples))  # MCMC and plots on the CPU
    if not bool(torch.isfinite(lw).all()):
        raise RuntimeError("the flow produced non-finite log-weights: the sampler is unusable")
    idx, acc = independence_mh(lw, torch.Generator().manual_seed(seed))
    chain = phi[idx].double()
    tau, window = tau_int(chain.flatten(1).sum(1).abs())
    report: dict[str, Any] = {
        "theory": {"L": theory.L, "m2": theory.m2, "lam": theory.lam},
        "n_samples": n_samples,
        "ess": ess(lw),
        "mh_acceptance": acc,
        "tau_int_abs_m": tau,
        "tau_window": window,
        "flow": measure(chain),
        "flow_reweighted": measure(phi, log_w=lw),
    }
    arrays = {"log_w": lw.double(), "m_flow": chain.flatten(1).sum(1) / theory.volume}
    if hmc_settings is not None:
        _compare(report, arrays, theory, hmc_settings, seed + 1)
    return report, arrays


def format_report(report: dict[str, Any]) -> str:
    """The report as a table: flow (MH and reweighted) and HMC observables with errors and their
    distances in combined standard errors."""
    th = report["theory"]
    hmc_head = f" {'HMC':>22s} {'z MH':>5s} {'z rw':>5s}" if "hmc" in report else ""
    lines = [
        f"phi4 L={th['L']} m2={th['m2']} lam={th['lam']}",
        f"ESS/N on {report['n_samples']} fresh samples: {report['ess']:.4f}"
        + (" (the flow mixed over the 32 lattice-symmetry cosets)" if report.get("symmetrised") else ""),
        f"independence MH: acceptance {report['mh_acceptance']:.3f}, tau_int(|M|) "
        f"{report['tau_int_abs_m']:.2f} (window {report['tau_window']})",
        f"bin size: flow MH {int(report['flow']['bin_size'][0])}, reweighted "
        f"{int(report['flow_reweighted']['bin_size'][0])}"
        + (f", HMC {int(report['hmc']['bin_size'][0])} (HMC acceptance {report['hmc']['acceptance'][0]:.3f})"
           if "hmc" in report else ""),
        f"{'observable':10s} {'flow (MH)':>22s} {'flow (reweighted)':>22s}" + hmc_head,
    ]
    for k in OBSERVABLES:
        row = f"{k:10s}" + "".join(f" {v:12.5f} +- {e:7.5f}" for v, e in
                                   (report["flow"][k], report["flow_reweighted"][k]))
        if "hmc" in report:
            hv, he = report["hmc"][k]
            row += f" {hv:12.5f} +- {he:7.5f} {report['z'][k]:5.2f} {report['z_reweighted'][k]:5.2f}"
        lines.append(row)
    return "\n".join(lines)

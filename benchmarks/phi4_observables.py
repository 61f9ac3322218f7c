"""Lattice phi^4: are a trained sampler's observables those of the theory? One run, three estimates.

For a finished ``python train.py data=phi4 ...`` run directory (its checkpoint and Hydra config):

* flow + independence MH on ``--mh-samples`` fresh proposals (what the run's report shows);
* flow reweighting: self-normalised importance weights on ``--samples`` fresh draws, jackknife
  errors over bins of independent draws;
* a long HMC reference, ``--chains`` independent chains of ``--trajectories``, errors by the
  jackknife over whole chains (no autocorrelation estimate involved) and by the binned jackknife;
* the flow's own, unweighted averages, to show which way (and how far) ``q`` alone is off.

    python benchmarks/phi4_observables.py <run_dir> --samples 262144 --chains 64 --trajectories 10000
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gflows.physics import ess, independence_mh
from gflows.physics.observables import measure
from gflows.training import lattice as tl
from gflows.training.checkpoint import load_checkpoint


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--samples", type=int, default=262144)
    p.add_argument("--mh-samples", type=int, default=16384)
    p.add_argument("--chains", type=int, default=64)
    p.add_argument("--trajectories", type=int, default=10000)
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args()
    cfg = OmegaConf.load(a.run_dir / "hydra" / "config.yaml")
    theory = tl.theory_from_cfg(cfg.data)
    model = tl.build_lattice_model(cfg, theory)
    model.load_state_dict(load_checkpoint(a.run_dir / "checkpoint.pt")["model"])
    model.eval()
    print(f"# {datetime.date.today()}  {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; {a.run_dir}: L={theory.L} m2={theory.m2} lam={theory.lam}")
    rows: dict[str, dict] = {}
    t0 = time.time()
    torch.manual_seed(a.seed)
    phi, lw = tl.log_weights(model, theory, a.samples, 4096)
    phi, lw = phi.double(), lw.double()
    rows[f"flow reweighted ({a.samples} draws)"] = measure(phi, log_w=lw)
    rows[f"flow q alone ({a.samples} draws, biased)"] = measure(phi, bin_size=max(1, a.samples // 256))
    idx, acc = independence_mh(lw[: a.mh_samples], torch.Generator().manual_seed(a.seed))
    rows[f"flow + MH ({a.mh_samples} proposals)"] = measure(phi[idx])
    print(f"flow: ESS/N {ess(lw):.4f} on {a.samples} draws, MH acceptance {acc:.3f}, "
          f"{time.time() - t0:.0f} s")
    t0 = time.time()
    h = cfg.data.hmc
    ref, hmc_acc = tl.hmc_reference(theory, a.chains, a.trajectories, int(h.therm), int(h.n_steps),
                                 float(h.step_size), a.seed + 1)
    rows[f"HMC {a.chains} x {a.trajectories}, chain jackknife"] = measure(ref, bin_size=a.trajectories)
    rows[f"HMC {a.chains} x {a.trajectories}, binned"] = measure(ref)
    print(f"HMC: acceptance {hmc_acc:.3f}, {time.time() - t0:.0f} s")
    hmc_key = f"HMC {a.chains} x {a.trajectories}, chain jackknife"
    print(f"{'estimate':44s} {'bin':>5s} " + " ".join(f"{k:>22s}" for k in tl.OBSERVABLES))
    for name, obs in rows.items():
        print(f"{name:44s} {int(obs['bin_size'][0]):5d} "
              + " ".join(f"{obs[k][0]:10.5f} +- {obs[k][1]:8.5f}" for k in tl.OBSERVABLES))
    print(f"|difference| / combined SE against {hmc_key}:")
    for name, obs in rows.items():
        if name != hmc_key:
            ref_obs = rows[hmc_key]
            print(f"{name:44s} " + " ".join(
                f"{k}={abs(obs[k][0] - ref_obs[k][0]) / math.hypot(obs[k][1], ref_obs[k][1]):.1f}"
                for k in tl.OBSERVABLES))


if __name__ == "__main__":
    main()

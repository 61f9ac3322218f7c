"""Lattice phi^4: are a trained sampler's observables those of the theory? One run, three estimates.

For a finished ``python train.py data=phi4 ...`` run directory (its checkpoint and Hydra config):

* the draws: ``--seeds`` batches of ``--mh-samples`` fresh samples, batch ``s`` drawn after
  ``torch.manual_seed(s)`` exactly as the run's report draws its own (seed 0: the report's);
* flow + independence MH on the seed-0 batch (the report's chain);
* flow reweighting: self-normalised importance weights on all draws, jackknife errors over bins
  of independent draws;
* a long HMC reference, ``--chains`` independent chains of ``--trajectories``, errors by the
  jackknife over whole chains (no autocorrelation estimate involved) and by the binned jackknife;
  only each configuration's primary observables are kept, so chains of any length fit in memory;
* the flow's own, unweighted averages, to show which way (and how far) ``q`` alone is off;
* whether the errors the sampler report states for ``--mh-samples`` draws are honest: each seed's
  batch reweighted as the report does, the spread of their estimates against their mean stated
  error, and each seed's distance from the long HMC.

    python benchmarks/phi4_observables.py <run_dir> --seeds 16 --chains 64 --trajectories 10000
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from bench_machine import header  # this folder, first on sys.path when run as a script
from omegaconf import OmegaConf

from gflows.models.config import lattice_model_from_config
from gflows.physics import ess, independence_mh, report
from gflows.physics.observables import measure, measure_primaries, primaries
from gflows.physics.phi4 import Phi4
from gflows.training.checkpoint import load_checkpoint


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--mh-samples", type=int, default=16384)
    p.add_argument("--chains", type=int, default=64)
    p.add_argument("--trajectories", type=int, default=10000)
    p.add_argument("--seed", type=int, default=11, help="seed of the HMC reference (plus one)")
    a = p.parse_args()
    cfg = OmegaConf.load(a.run_dir / "hydra" / "config.yaml")
    d = cfg.data
    theory = Phi4.from_settings(d.preset, d.L, d.m2, d.lam, d.kappa, d.lambda_h)
    model = lattice_model_from_config(cfg.flow, theory.L)
    model.load_state_dict(load_checkpoint(a.run_dir / "checkpoint.pt")["model"])
    model.eval()
    print(header(f"{a.run_dir}: L={theory.L} m2={theory.m2} lam={theory.lam}"))
    rows: dict[str, dict] = {}
    t0 = time.time()
    batches = []
    for seed in range(a.seeds):
        torch.manual_seed(seed)
        batches.append(report.log_weights(model, theory, a.mh_samples))
    phi, lw = (torch.cat(t).double() for t in zip(*batches, strict=True))
    a.samples = len(lw)
    rows[f"flow reweighted ({a.samples} draws)"] = measure(phi, log_w=lw)
    rows[f"flow q alone ({a.samples} draws, biased)"] = measure(phi, bin_size=max(1, a.samples // 256))
    idx, acc = independence_mh(lw[: a.mh_samples], torch.Generator().manual_seed(0))
    rows[f"flow + MH ({a.mh_samples} proposals, seed 0)"] = measure(phi[idx])
    print(f"flow: ESS/N {ess(lw):.4f} on {a.samples} draws, MH acceptance {acc:.3f}, "
          f"{time.time() - t0:.0f} s")
    t0 = time.time()
    h = cfg.data.hmc
    ref, hmc_acc = report.hmc_reference(theory, a.chains, a.trajectories, int(h.therm), int(h.n_steps),
                                        float(h.step_size), a.seed + 1, observe=lambda c: primaries(c)[0])
    V = theory.volume
    rows[f"HMC {a.chains} x {a.trajectories}, chain jackknife"] = measure_primaries(ref, V, a.trajectories)
    rows[f"HMC {a.chains} x {a.trajectories}, binned"] = measure_primaries(ref, V)
    print(f"HMC: acceptance {hmc_acc:.3f}, {time.time() - t0:.0f} s")
    hmc_key = f"HMC {a.chains} x {a.trajectories}, chain jackknife"
    print(f"{'estimate':44s} {'bin':>5s} " + " ".join(f"{k:>22s}" for k in report.OBSERVABLES))
    for name, obs in rows.items():
        print(f"{name:44s} {int(obs['bin_size'][0]):5d} "
              + " ".join(f"{obs[k][0]:10.5f} +- {obs[k][1]:8.5f}" for k in report.OBSERVABLES))
    n_sub = a.seeds
    if n_sub >= 4:
        subs = [measure(phi[i * a.mh_samples:(i + 1) * a.mh_samples],
                        log_w=lw[i * a.mh_samples:(i + 1) * a.mh_samples]) for i in range(n_sub)]
        print(f"{n_sub} seeds of {a.mh_samples} draws, reweighted: spread of the estimates "
              f"(SD) / mean stated error (1 if the errors are honest):")
        ratios = {k: torch.tensor([o[k][0] for o in subs]).std().item() / (sum(o[k][1] for o in subs) / n_sub)
                  for k in report.OBSERVABLES}
        print("   " + " ".join(f"{k}={r:.2f}" for k, r in ratios.items())
              + f"  (an SD of {n_sub} values is uncertain by ~{100 / math.sqrt(2 * (n_sub - 1)):.0f}%)")
        ref_obs = rows[hmc_key]
        for k in ("chi2", "chi2_conn"):
            print(f"   {k}, (seed value - HMC) / combined SE, seeds 0..{n_sub - 1}: " + " ".join(
                f"{(o[k][0] - ref_obs[k][0]) / math.hypot(o[k][1], ref_obs[k][1]):+.1f}" for o in subs))
    print(f"|difference| / combined SE against {hmc_key}:")
    for name, obs in rows.items():
        if name != hmc_key:
            ref_obs = rows[hmc_key]
            print(f"{name:44s} " + " ".join(
                f"{k}={abs(obs[k][0] - ref_obs[k][0]) / math.hypot(obs[k][1], ref_obs[k][1]):.1f}"
                for k in report.OBSERVABLES))


if __name__ == "__main__":
    main()

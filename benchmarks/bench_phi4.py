"""Lattice phi^4: a gflows flow against the review's RealNVP (or another gflows flow), same wall clock,
one run.

Both train by reverse KL in one process. They take turns in slices of ``--slice`` seconds until
each has had ``--minutes`` of wall clock, so that load from elsewhere on a shared machine hits both
alike. Then each reports ESS/N on ``--samples`` fresh samples, independence-MH acceptance and
tau_int of |M| along the chain.

* gflows: the lattice model of ``--flow`` (default ``lattice_g_coupling``) as ``configs/`` define it, with
  ``--set key=value`` Hydra overrides, and the batch size, learning rate, gradient estimator and
  gradient clipping of ``trainer/phi4.yaml``;
* baseline: :func:`gflows.models.lattice.realnvp_baseline` (16 couplings, [1, 8, 8, 2], kernel 3,
  LeakyReLU, final tanh, circular padding), Adam at the review's lr 1e-3, no clipping; or, with
  ``--against FLOW``, a second gflows flow trained like the first.

Densities of residual flows are evaluated with the exact log-det for the report.

    python benchmarks/bench_phi4.py --presets review E2 E3 E4 E5 --minutes 8 2 2 2 2
    python benchmarks/bench_phi4.py --flow lattice_coupling --set flow.n_layers=12 trainer.lr=3e-3
    python benchmarks/bench_phi4.py --flow lattice_g_residual --against lattice_coupling --minutes 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_machine import header  # this folder, first on sys.path when run as a script
from hydra import compose, initialize_config_dir

from gflows.models.config import lattice_model_from_config
from gflows.models.lattice import realnvp_baseline
from gflows.physics import Phi4, ess, independence_mh, tau_int
from gflows.physics.report import log_weights
from gflows.training.lattice import reverse_kl_loss
from gflows.training.schedule import cosine_decay
from gflows.transforms.residual import logdet_mode

ROOT = Path(__file__).resolve().parents[1]


class Trainer:
    """Reverse-KL Adam steps on one flow, with a cosine learning rate over its time budget."""

    def __init__(self, name: str, flow, theory: Phi4, batch: int, lr: float, seconds: float, cosine: bool,
                 estimator: str = "reparam", clip: float | None = None):
        self.name, self.flow, self.theory, self.batch = name, flow, theory, batch
        self.estimator, self.clip = estimator, clip
        self.lr, self.budget, self.cosine = lr, seconds, cosine
        self.opt = torch.optim.Adam(flow.parameters(), lr=lr)
        self.used, self.steps = 0.0, 0

    def run_for(self, seconds: float) -> None:
        t0 = time.time()
        while time.time() - t0 < seconds and self.used + (time.time() - t0) < self.budget:
            frac = min(1.0, (self.used + time.time() - t0) / self.budget)
            for g in self.opt.param_groups:
                g["lr"] = self.lr * (cosine_decay(frac) if self.cosine else 1.0)
            loss, _ = reverse_kl_loss(self.flow, self.theory.action, self.batch, self.estimator)
            self.opt.zero_grad()
            loss.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.flow.parameters(), self.clip)
            self.opt.step()
            self.steps += 1
        self.used += time.time() - t0

    def report(self, n: int) -> str:
        self.flow.eval()
        with logdet_mode(self.flow, "exact"):
            phi, lw = log_weights(self.flow, self.theory, n)
        idx, acc = independence_mh(lw)
        tau, _ = tau_int(phi[idx].flatten(1).sum(1).abs())
        return (f"{self.name:10s} steps {self.steps:6d} ({self.used / 60:.1f} min, "
                f"{self.used / max(self.steps, 1):.3f} s/step)  "
                f"ESS/N (N={n}) {ess(lw):.4f}  MH acceptance {acc:.3f}  tau_int(|M|) {tau:.2f}")


def gflows_trainer(flow: str, overrides: list[str], preset: str, theory: Phi4, minutes: float, seed: int,
                   name: str) -> Trainer:
    """A gflows lattice flow of ``configs/`` with its trainer settings (cosine over the budget)."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", ["data=phi4", f"data.preset={preset}", f"flow={flow}", *overrides])
    torch.manual_seed(seed)
    model = lattice_model_from_config(cfg.flow, theory.L)
    print(f"# {name}: flow={flow} {' '.join(overrides)}: {dict(cfg.flow)}; batch "
          f"{cfg.trainer.batch_size}, lr {cfg.trainer.lr} cosine over the budget, {cfg.trainer.gradient} "
          f"gradients, clipping at {cfg.trainer.grad_clip}; seed {seed}")
    return Trainer(name, model, theory, int(cfg.trainer.batch_size), float(cfg.trainer.lr), 60 * minutes,
                   True, str(cfg.trainer.gradient), float(cfg.trainer.grad_clip))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["review"])
    p.add_argument("--minutes", nargs="+", type=float, default=[5.0], help="per preset (or one for all)")
    p.add_argument("--slice", type=float, default=20.0)
    p.add_argument("--flow", default="lattice_g_coupling")
    p.add_argument("--against", default="realnvp", help="realnvp (the review's) or a gflows flow config")
    p.add_argument("--set", nargs="*", default=[], help="Hydra overrides, e.g. flow.n_layers=12")
    p.add_argument("--samples", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    minutes = a.minutes * len(a.presets) if len(a.minutes) == 1 else a.minutes
    print(header())
    for preset, mins in zip(a.presets, minutes, strict=True):
        theory = Phi4.preset(preset)
        runs = [gflows_trainer(a.flow, a.set, preset, theory, mins, a.seed, a.flow)]
        if a.against == "realnvp":
            print(f"# baseline: review RealNVP, batch 64, lr 1e-3. Turns of {a.slice} s, seed {a.seed}")
            torch.manual_seed(a.seed)
            runs.append(Trainer("realnvp", realnvp_baseline(theory.L), theory, 64, 1e-3, 60 * mins, False))
        else:
            runs.append(gflows_trainer(a.against, a.set, preset, theory, mins, a.seed, a.against))
        while any(r.used < r.budget for r in runs):
            for r in runs:
                if r.used < r.budget:
                    r.run_for(a.slice)
        print(f"## {preset}: L={theory.L} m2={theory.m2} lam={theory.lam}, {mins} min each")
        for r in runs:
            print(r.report(a.samples), flush=True)


if __name__ == "__main__":
    main()

"""Lattice phi^4: the gflows symmetric flow against the review's RealNVP, same wall clock, one run.

Both train by reverse KL in one process. They take turns in slices of ``--slice`` seconds until
each has had ``--minutes`` of wall clock, so that load from elsewhere on a shared machine hits both
alike. Then each reports ESS/N on ``--samples`` fresh samples, independence-MH acceptance and
tau_int of |M| along the chain.

* gflows: the lattice model of ``--flow`` (default ``g_coupling``) as ``configs/`` define it, with
  ``--set key=value`` Hydra overrides, and the batch size, learning rate, gradient estimator and
  gradient clipping of ``trainer/phi4.yaml``;
* baseline: :func:`gflows.models.lattice.realnvp_baseline` (16 couplings, [1, 8, 8, 2], kernel 3,
  LeakyReLU, final tanh, circular padding), Adam at the review's lr 1e-3, no clipping.

    python benchmarks/bench_phi4.py --presets review E2 E3 E4 E5 --minutes 8 2 2 2 2
    python benchmarks/bench_phi4.py --flow coupling --set flow.lattice.n_layers=12 trainer.lr=3e-3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from gflows.models.lattice import realnvp_baseline
from gflows.physics import Phi4, ess, independence_mh, tau_int
from gflows.training.common import cosine_decay
from gflows.training.lattice import build_lattice_model, log_weights, reverse_kl_loss

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
        phi, lw = log_weights(self.flow, self.theory, n)
        idx, acc = independence_mh(lw)
        tau, _ = tau_int(phi[idx].flatten(1).sum(1).abs())
        return (f"{self.name:8s} steps {self.steps:6d} ({self.used / 60:.1f} min)  "
                f"ESS/N (N={n}) {ess(lw):.4f}  MH acceptance {acc:.3f}  tau_int(|M|) {tau:.2f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["review"])
    p.add_argument("--minutes", nargs="+", type=float, default=[5.0], help="per preset (or one for all)")
    p.add_argument("--slice", type=float, default=20.0)
    p.add_argument("--flow", default="g_coupling")
    p.add_argument("--set", nargs="*", default=[], help="Hydra overrides, e.g. flow.lattice.n_layers=12")
    p.add_argument("--samples", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    minutes = a.minutes * len(a.presets) if len(a.minutes) == 1 else a.minutes
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# {datetime.date.today()}  {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, GPU: {gpu}")
    for preset, mins in zip(a.presets, minutes, strict=True):
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("config", ["data=phi4", f"data.preset={preset}", f"flow={a.flow}", *a.set])
        theory = Phi4.preset(preset)
        torch.manual_seed(a.seed)
        ours = build_lattice_model(cfg, theory)
        print(f"# gflows: flow={a.flow} {' '.join(a.set)}: {dict(cfg.flow.lattice)}; batch "
              f"{cfg.trainer.batch_size}, lr {cfg.trainer.lr} cosine over the budget, {cfg.trainer.gradient} "
              f"gradients, clipping at {cfg.trainer.grad_clip}. baseline: review "
              f"RealNVP, batch 64, lr 1e-3. Turns of {a.slice} s, seed {a.seed}")
        torch.manual_seed(a.seed)
        base = realnvp_baseline(theory.L)
        batch, lr = int(cfg.trainer.batch_size), float(cfg.trainer.lr)
        runs = [Trainer("gflows", ours, theory, batch, lr, 60 * mins, True, str(cfg.trainer.gradient),
                        float(cfg.trainer.grad_clip)),
                Trainer("realnvp", base, theory, 64, 1e-3, 60 * mins, False)]
        while any(r.used < r.budget for r in runs):
            for r in runs:
                if r.used < r.budget:
                    r.run_for(a.slice)
        print(f"## {preset}: L={theory.L} m2={theory.m2} lam={theory.lam}, {mins} min each")
        for r in runs:
            print(r.report(a.samples), flush=True)


if __name__ == "__main__":
    main()

"""Training-step time of the lattice samplers: periodic padding by ``F.pad`` against concatenation,
and escnn's basis against the orbit basis, side by side in one process.

One reverse-KL step (path gradients, batch 64, Adam) of each configured sampler of ``configs/``
(``--flows``, default: the recommended ``lattice_coupling`` and ``lattice_g_residual``) at the
review's point, for each variant: ``pad=F.pad`` swaps :func:`gflows.nn.equivariant.circular_pad` for
``F.pad(mode='circular')`` (what the layers used before), ``basis=escnn`` builds the filters from
escnn's basis. Steps of all variants are interleaved; the script prints the median seconds per step
and each variant's ratio to the first.

    python benchmarks/bench_lattice_step.py --steps 20
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import gflows.nn.equivariant as equivariant
from gflows.models.config import lattice_model_from_config
from gflows.physics import Phi4
from gflows.training.lattice import reverse_kl_loss

ROOT = Path(__file__).resolve().parents[1]
CONCAT = equivariant.circular_pad


def f_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    return F.pad(x, (p, p, p, p), mode="circular")


VARIANTS = {  # name: (padding, basis)
    "concat pad, escnn basis": (CONCAT, "escnn"),
    "F.pad, escnn basis": (f_pad, "escnn"),
    "concat pad, orbit basis": (CONCAT, "auto"),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--flows", nargs="+", default=["lattice_coupling", "lattice_g_residual"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; review point, batch {a.batch}, "
          f"path gradients, median of {a.steps} interleaved steps after 3 warm-up steps")
    theory = Phi4.preset("review")
    for flow in a.flows:
        runs = {}
        for name, (pad, basis) in VARIANTS.items():
            with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
                cfg = compose("config", ["data=phi4", f"flow={flow}", f"flow.basis={basis}"])
            torch.manual_seed(0)
            model = lattice_model_from_config(cfg.flow, theory.L)
            runs[name] = (pad, model, torch.optim.Adam(model.parameters(), lr=1e-4), [])

        def step(pad, model, opt) -> float:
            equivariant.circular_pad = pad
            t0 = time.perf_counter()
            loss, _ = reverse_kl_loss(model, theory.action, a.batch, "path")
            opt.zero_grad()
            loss.backward()
            opt.step()
            return time.perf_counter() - t0

        for i in range(a.steps + 3):
            for pad, model, opt, times in runs.values():
                t = step(pad, model, opt)
                if i >= 3:
                    times.append(t)
        equivariant.circular_pad = CONCAT
        first = None
        for name, (*_, times) in runs.items():
            med = statistics.median(times)
            first = first or med
            print(f"{flow:12s} {name:26s} {med:.4f} s/step  ({med / first:.2f}x the first)")


if __name__ == "__main__":
    main()

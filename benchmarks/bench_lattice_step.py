"""Training-step time of the lattice samplers: periodic padding by ``F.pad`` against concatenation,
and escnn's basis against the orbit basis, side by side in one process.

One reverse-KL step (path gradients, batch 64, Adam) of each configured sampler of ``configs/``
(``--flows``, default: the recommended ``lattice_coupling`` and ``lattice_g_residual``) at the
review's point, for each variant: ``pad=F.pad`` swaps :func:`gflows.nn.equivariant.circular_pad` for
``F.pad(mode='circular')`` (what the layers used before), ``basis=escnn`` builds the filters from
escnn's basis. Steps of all variants are interleaved; the script prints the median seconds per step
and each variant's ratio to the first. ``--variants`` times other variants instead, each a
comma-separated list of Hydra overrides (for example the groups of ``flow=lattice_g_coupling``),
again interleaved, so that the ratios hold however the machine's speed moves during the run.

    python benchmarks/bench_lattice_step.py --steps 20
    python benchmarks/bench_lattice_step.py --flows lattice_g_coupling --variants group=trivial \\
        group=d4 group=d4,flow.hidden_channels=16
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


VARIANTS = {  # name: (padding, Hydra overrides)
    "concat pad, escnn basis": (CONCAT, ["flow.basis=escnn"]),
    "F.pad, escnn basis": (f_pad, ["flow.basis=escnn"]),
    "concat pad, orbit basis": (CONCAT, ["flow.basis=auto"]),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--flows", nargs="+", default=["lattice_coupling", "lattice_g_residual"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=None, metavar="OVERRIDES",
                   help="comma-separated Hydra overrides per variant, instead of padding and basis")
    a = p.parse_args()
    variants = VARIANTS if a.variants is None else {v: (CONCAT, v.split(",")) for v in a.variants}
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; review point, batch {a.batch}, "
          f"path gradients, median of {a.steps} interleaved steps after 3 warm-up steps")
    theory = Phi4.preset("review")
    for flow in a.flows:
        runs = {}
        for name, (pad, overrides) in variants.items():
            with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
                cfg = compose("config", ["data=phi4", f"flow={flow}", *overrides])
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
            n = sum(q.numel() for q in runs[name][1].parameters())
            print(f"{flow:12s} {name:26s} {n:7d} params  {med:.4f} s/step  ({med / first:.2f}x the first)")


if __name__ == "__main__":
    main()

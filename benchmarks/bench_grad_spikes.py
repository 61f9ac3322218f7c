"""Gradient spikes of one ``bench_symmetry.py`` CIFAR run: the same model, batches and schedule,
printing every 25 steps the mean training loss and the largest and median gradient norm (before
clipping), with the gradient's norm clipped at ``--clip`` (0: none). Shows why some runs failed to
start unclipped (RESULTS.md, "a guard against gradient spikes").

    python benchmarks/bench_grad_spikes.py --variant trivial --seed 2 --clip 0 --steps 600
    python benchmarks/bench_grad_spikes.py --variant trivial --seed 2 --clip 50 --steps 1200
"""

from __future__ import annotations

import argparse
import math
import statistics

import bench_symmetry as bs  # this folder, first on sys.path when run as a script
import torch
from bench_machine import header


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=sorted(bs.VARIANTS["cifar"]), default="trivial")
    p.add_argument("--width", type=int, default=None, help="default: trivial 24 channels, else 29 fields")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=600, help="steps run (the cosine's length stays --schedule)")
    p.add_argument("--schedule", type=int, default=2400)
    p.add_argument("--size", type=int, default=4577)
    a = p.parse_args()
    group, augment, relaxed = bs.VARIANTS["cifar"][a.variant]
    if relaxed:
        raise SystemExit("--variant: the strict and augmented variants only")
    width = a.width or (24 if group == "trivial" else 29)
    print(header(f"CIFAR-10 {a.variant} ({width}), seed {a.seed}, {a.size} images, clip {a.clip or 'none'}"))
    pool = bs.splits("cifar")[0]
    x = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(a.seed))[: a.size]]
    torch.manual_seed(a.seed)
    model = bs.build("cifar", group, width)
    bs.start("cifar", model, x, 32, a.seed)  # as bench_symmetry.train from here on
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    losses, norms = [], []
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = bs.learning_rate(3e-3, step, a.schedule)
        loss = bs.nll("cifar", model, bs.batch("cifar", x, step, 32, a.seed, augment)).mean()
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, a.clip or math.inf)))
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            print(f"steps {step - 23:5d}-{step + 1:5d}: loss {statistics.mean(losses):9.4f}, gradient norm "
                  f"max {max(norms):10.2f} median {statistics.median(norms):.2f}", flush=True)
            losses, norms = [], []


if __name__ == "__main__":
    main()

"""Where symmetry pays: learning curves on exactly D4-invariant data (the bundled 8x8 digits).

For each training-set size and seed, four G-residual flows (the digits have one grey channel, which
a coupling cannot split) of about equal parameter count, trained
for equal steps with early stopping on a validation split (the last tenth of the training images;
test bits/dim reported at the best validation step):

* ``trivial``: no symmetry;
* ``trivial+aug``: no symmetry, every training image moved by a random D4 element (augmentation);
* ``d4``: strictly D4-equivariant (orbit basis), hidden width raised to match the trivial model's
  parameter count;
* ``d4-relaxed``: the same with relaxed filters, ``relax`` chosen on validation among ``--relax``.

Prints one row per (size, variant) with the mean and spread over seeds, and writes a PNG of the
curves. Test and validation bits/dim use exact log-dets (64 dimensions: a dense Jacobian).

    python benchmarks/bench_symmetry.py --sizes 64 256 1350 --seeds 0 1 2 --steps 1500
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gflows.data.digits import LEVELS, load_digits
from gflows.groups import Group
from gflows.models.image import image_model
from gflows.nn.lipschitz import update_lipschitz
from gflows.training.images import batch_at, bits_per_dim, evaluate
from gflows.transforms.residual import logdet_mode

D4 = Group("d4")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(group: str, hidden_fields: int, relax: float = 0.0):
    return image_model("residual", group, (1, 8, 8), alpha=0.05, levels=LEVELS, n_scales=2,
                       blocks_per_scale=3, hidden_fields=hidden_fields, kernel_sizes=(3, 1, 3),
                       basis="orbit", relax=relax, n_exact_terms=2, lipschitz_kwargs={"train_iters": 5})


def matched_d4_fields(trivial_params: int) -> int:
    """The D4 width (regular fields) whose parameter count is nearest the trivial model's."""
    return min(range(1, 33), key=lambda f: abs(n_params(build("d4", f)) - trivial_params))


def train(model, x_train: torch.Tensor, x_val: torch.Tensor, x_test: torch.Tensor, steps: int, batch: int,
          lr: float, seed: int, augment: bool, eval_every: int) -> tuple[float, float, int]:
    """Adam with warm-up and cosine decay; returns (test bits/dim at the best validation step, that
    validation bits/dim, the step)."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        model.log_prob(batch_at(x_train, 0, batch, seed, False).float())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best = (math.inf, None, 0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = batch_at(x_train, step, batch, seed, False, D4 if augment else None).float()
        loss = bits_per_dim(model.log_prob(x), x[0].numel()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_lipschitz(model)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            with logdet_mode(model, "exact"):
                val = evaluate(model, x_val, 512)["test_bpd"]
            if val < best[0]:
                best = (val, copy.deepcopy(model.state_dict()), step + 1)
            model.train()
    model.load_state_dict(best[1])
    with logdet_mode(model, "exact"):
        return evaluate(model, x_test, 512)["test_bpd"], best[0], best[2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1350])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=32, help="hidden channels of the trivial model")
    p.add_argument("--relax", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--d4-fields", type=int, default=None,
                   help="the D4 width in regular fields (default: matched to the trivial parameter count)")
    p.add_argument("--plot", type=Path, default=Path("benchmarks/bench_symmetry.png"))
    a = p.parse_args()
    train_all, _ = load_digits("train")
    test, _ = load_digits("test")
    n_val = len(train_all) // 10
    pool, val = train_all[:-n_val], train_all[-n_val:]
    if max(a.sizes) > len(pool):
        raise SystemExit(f"--sizes: at most {len(pool)} training images (the rest is the validation split)")
    trivial_params = n_params(build("trivial", a.hidden))
    d4_fields = a.d4_fields or matched_d4_fields(trivial_params)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, no GPU; digits made D4-invariant, {len(val)} validation, {len(test)} test; "
          f"{a.steps} steps of batch {a.batch}, Adam {a.lr}, cosine; parameters: trivial {trivial_params}, "
          f"d4 {n_params(build('d4', d4_fields))} ({d4_fields} regular fields)")
    variants = {"trivial": ("trivial", a.hidden, False, [0.0]),
                "trivial+aug": ("trivial", a.hidden, True, [0.0]),
                "d4": ("d4", d4_fields, False, [0.0]), "d4-relaxed": ("d4", d4_fields, False, a.relax)}
    rows = {}
    for size in a.sizes:
        for name, (group, width, augment, relaxes) in variants.items():
            tests = []
            for seed in a.seeds:
                x = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:size]]
                runs = []
                for relax in relaxes:
                    torch.manual_seed(seed)
                    model = build(group, width, relax)
                    result = train(model, x, val, test, a.steps, min(a.batch, size), a.lr, seed, augment,
                                   a.eval_every)
                    runs.append((*result, relax))
                t, v, step, relax = min(runs, key=lambda r: r[1])  # the relaxation that wins on validation
                tests.append(t)
                print(f"size {size:5d} {name:12s} seed {seed}: test {t:.4f} (val {v:.4f} at step {step}"
                      + (f", relax {relax:g}" if len(relaxes) > 1 else "") + ")", flush=True)
            spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
            rows[size, name] = (statistics.mean(tests), spread)
    print(f"{'size':>6} " + " ".join(f"{n:>20s}" for n in variants))
    for size in a.sizes:
        cells = [f"{rows[size, n][0]:11.4f} +- {rows[size, n][1]:.4f}" for n in variants]
        print(f"{size:6d} " + " ".join(cells))
    _plot(a.plot, a.sizes, variants, rows)


def _plot(path: Path, sizes, variants, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in variants:
        m = [rows[s, n][0] for s in sizes]
        e = [rows[s, n][1] for s in sizes]
        ax.errorbar(sizes, m, yerr=e, marker="o", capsize=3, label=n)
    ax.set(xscale="log", xlabel="training images", ylabel="test bits/dim (17 levels)",
           title="D4-invariant digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

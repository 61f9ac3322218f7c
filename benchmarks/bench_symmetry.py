"""Where symmetry pays: learning curves on exactly D4-invariant data (the bundled 8x8 digits).

For each training-set size and seed, four G-residual flows (the digits have one grey channel, which
a coupling cannot split) of about equal parameter count, trained
for at most equal steps with early stopping on a validation split (the last tenth of the training images;
test bits/dim reported at the best validation step):

* ``trivial``: no symmetry;
* ``trivial+aug``: no symmetry, every training image moved by a random D4 element (augmentation);
* ``d4``: strictly D4-equivariant (orbit basis), hidden width raised to match the trivial model's
  parameter count;
* ``d4-relaxed``: the same with relaxed filters, ``relax`` chosen on validation among ``--relax``.

Prints one row per (size, variant) with the mean and spread over seeds, and writes a PNG of the
curves. Test and validation bits/dim use exact log-dets (64 dimensions: a dense Jacobian).

    python benchmarks/bench_symmetry.py --sizes 64 256 1350 --seeds 0 1 2 --steps 1500 --patience 4
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import math
import multiprocessing
import os
import platform
import signal
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
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
    """The D4 width (regular fields) whose parameter count is nearest the trivial model's (the count
    grows with the width: bisection, since every build computes orbit bases)."""
    lo, hi = 1, 64
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if n_params(build("d4", mid)) <= trivial_params else (lo, mid)
    return min((lo, hi), key=lambda f: abs(n_params(build("d4", f)) - trivial_params))


def train(model, x_train: torch.Tensor, x_val: torch.Tensor, x_test: torch.Tensor, steps: int, batch: int,
          lr: float, seed: int, augment: bool, eval_every: int,
          patience: int) -> tuple[float, float, int, int]:
    """Adam with warm-up and cosine decay, stopped once validation bits/dim has not improved for
    ``patience`` evaluations; returns (test bits/dim at the best validation step, that validation
    bits/dim, the best step, the steps run)."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        model.log_prob(batch_at(x_train, 0, batch, seed, False).float())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best = (math.inf, None, 0)
    step = 0
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
            elif step + 1 - best[2] >= patience * eval_every:
                break
            model.train()
    model.load_state_dict(best[1])
    with logdet_mode(model, "exact"):
        return evaluate(model, x_test, 512)["test_bpd"], best[0], best[2], step + 1


def _worker_init() -> None:
    # one thread each, so that two runs share 2 cores without oversubscribing OpenMP
    torch.set_num_threads(1)
    with contextlib.suppress(OSError, AttributeError):
        # a killed benchmark must not leave its workers training (Linux: PR_SET_PDEATHSIG)
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)


def splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the pool training subsets are drawn from, validation: the last tenth of the training images,
    test)."""
    train_all, _ = load_digits("train")
    n_val = len(train_all) // 10
    return train_all[:-n_val], train_all[-n_val:], load_digits("test")[0]


def run_job(job: dict) -> dict:
    """One training run, in a worker process."""
    pool, val, test = splits()
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(job["seed"]))
    x = pool[perm[: job["size"]]]
    torch.manual_seed(job["seed"])
    model = build(job["group"], job["width"], job["relax"])
    t0 = time.perf_counter()
    t, v, best, ran = train(model, x, val, test, job["steps"], min(job["batch"], job["size"]), job["lr"],
                            job["seed"], job["augment"], job["eval_every"], job["patience"])
    return {**job, "test": t, "val": v, "best_step": best, "steps_run": ran,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1350])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500, help="at most this many steps (cosine length)")
    p.add_argument("--patience", type=int, default=4, help="evaluations without a better validation")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=32, help="hidden channels of the trivial model")
    p.add_argument("--relax", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--d4-fields", type=int, default=None,
                   help="the D4 width in regular fields (default: matched to the trivial parameter count)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each")
    p.add_argument("--out", type=Path, default=Path("benchmarks/bench_symmetry.jsonl"),
                   help="one line per finished run; runs already there are not repeated (resume)")
    p.add_argument("--plot", type=Path, default=Path("benchmarks/bench_symmetry.png"))
    a = p.parse_args()
    pool, val, test = splits()
    if max(a.sizes) > len(pool):
        raise SystemExit(f"--sizes: at most {len(pool)} training images (the rest is the validation split)")
    trivial_params = n_params(build("trivial", a.hidden))
    d4_fields = a.d4_fields or matched_d4_fields(trivial_params)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, no GPU; digits made D4-invariant, {len(val)} validation, {len(test)} test; "
          f"at most {a.steps} steps of batch {a.batch} (patience {a.patience} x {a.eval_every}), Adam "
          f"{a.lr}, cosine; parameters: trivial {trivial_params}, d4 {n_params(build('d4', d4_fields))} "
          f"({d4_fields} regular fields); {a.workers} workers of one thread", flush=True)
    variants = {"trivial": ("trivial", a.hidden, False, [0.0]),
                "trivial+aug": ("trivial", a.hidden, True, [0.0]),
                "d4": ("d4", d4_fields, False, [0.0]), "d4-relaxed": ("d4", d4_fields, False, a.relax)}
    common = {"steps": a.steps, "batch": a.batch, "lr": a.lr, "eval_every": a.eval_every,
              "patience": a.patience}
    jobs = [{"size": s, "variant": n, "seed": seed, "group": g, "width": w, "augment": aug, "relax": r,
             **common}
            for s in a.sizes for n, (g, w, aug, rs) in variants.items() for seed in a.seeds for r in rs]

    def key(j: dict) -> tuple:
        return tuple(j[k] for k in ("size", "variant", "seed", "group", "width", "augment", "relax", *common))

    done = {}
    if a.out.exists():
        for line in a.out.read_text().splitlines():
            r = json.loads(line)
            done[key(r)] = r
    todo = [j for j in jobs if key(j) not in done]
    print(f"# {len(jobs) - len(todo)} of {len(jobs)} runs already in {a.out}", flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(a.workers, mp_context=ctx, initializer=_worker_init) as ex, a.out.open("a") as f:
        for r in ex.map(run_job, todo):
            f.write(json.dumps(r) + "\n")
            f.flush()
            done[key(r)] = r
            print(f"size {r['size']:5d} {r['variant']:12s} seed {r['seed']} relax {r['relax']:g}: test "
                  f"{r['test']:.4f} (val {r['val']:.4f} at step {r['best_step']} of {r['steps_run']}, "
                  f"{r['seconds']:.0f} s)", flush=True)
    rows = {}
    for size in a.sizes:
        for name in variants:
            tests = []
            for seed in a.seeds:
                runs = [done[key(j)] for j in jobs
                        if (j["size"], j["variant"], j["seed"]) == (size, name, seed)]
                tests.append(min(runs, key=lambda r: r["val"])["test"])  # relaxation chosen on validation
            spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
            rows[size, name] = (statistics.mean(tests), spread)
    print(f"{'size':>6} " + " ".join(f"{n:>20s}" for n in variants) + f" {'aug - d4':>10s}")
    for size in a.sizes:
        cells = [f"{rows[size, n][0]:11.4f} +- {rows[size, n][1]:.4f}" for n in variants]
        gap = rows[size, "trivial+aug"][0] - rows[size, "d4"][0]
        print(f"{size:6d} " + " ".join(cells) + f" {gap:10.4f}")
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

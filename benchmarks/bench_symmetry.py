"""Where symmetry pays: learning curves on exactly invariant data.

``--data digits`` (the default): the bundled 8x8 digits, each moved by a random D4 element.
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

``--data phi4``: maximum likelihood (forward KL) of the lattice coupling sampler on HMC
configurations of phi^4 at the review's point (L=8), whose distribution is exactly invariant under
translations, D4 and phi -> -phi; test negative log-likelihood per site on held-out configurations
(later in every HMC chain). The four variants are the lattice sampler's: trivial conditioners;
the same with every configuration moved by a random symmetry of the action (``Phi4.random_symmetry``);
D4-steerable conditioners symmetrised over phi -> -phi (every symmetry of the action exact); and
those with relaxed D4 filters.

    python benchmarks/bench_symmetry.py --data phi4 --sizes 64 512 4096 --seeds 0 1 2 --steps 800

``--data cifar``: the CIFAR-10 subset at ``../shared/data/cifar10-subset`` beside the checkout
(``CIFAR_ROOT``; the last tenth of its training images is the validation split), whose exact
symmetry is the horizontal mirror while turns are broken (RESULTS.md: 0.03 bits/dim per quarter
turn). G-coupling flows (3 scales x 2 blocks, squeeze first, G-invertible
1x1 convolutions, kernels 3-1-3, orbit basis) of the trivial group, the flip group, D4, and D4 with
relaxed filters, each group's width matched to the trivial model's parameter count (the relaxed
model's free filters come on top, as in every ``relax`` layer), and two augmented trivial models:
``trivial+flip`` (half the training images mirrored, the data's exact symmetry) and ``trivial+aug``
(each moved by a random D4 element, as the digits'), and ``d4-relaxed-flip``: D4 relaxed towards the
mirror (``relax_to='flip'``: the free filters mirror-equivariant, so the mirror stays exact and only
the turns are relaxed, the data's own partial symmetry). The questions are the issue's: does the
relaxation that matches the data's partial symmetry beat strict D4, strict flip and no symmetry, and
does augmentation replace the strict group (``flip-aug - flip``, ``d4-aug - d4``). The gradient's norm
is clipped at 50 (``--clip``), which only spikes reach.

    python benchmarks/bench_symmetry.py --data cifar --seeds 0 1 2 --steps 800 --batch 32 --relax 0.05 0.2

``--penalty q ...`` trains the relaxed variants also under Finzi et al.'s prior (``q * sum |relax V|^2``
added to the loss, as ``trainer.relax_penalty``), ``relax`` and ``q`` chosen together on validation.

``--merge A.jsonl B.jsonl ...`` trains nothing: it prints the table and draws one plot from the runs
of several ``--out`` files (sizes run with their own step budgets or evaluation intervals).
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
import signal
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from bench_machine import header  # this folder, first on sys.path when run as a script

from gflows.data.cifar10 import load_cifar10
from gflows.data.digits import LEVELS, load_digits
from gflows.groups import Group
from gflows.models.image import image_model
from gflows.models.lattice import lattice_flow
from gflows.nn.equivariant import symmetry_breaking_sq_norm
from gflows.nn.lipschitz import lipschitz_layers
from gflows.physics.phi4 import Phi4
from gflows.physics.report import hmc_dataset
from gflows.training.images import batch_at, bits_per_dim, evaluate
from gflows.transforms.residual import logdet_mode

D4 = Group("d4")
THEORY = Phi4.preset("review")
# HMC configurations of --data phi4, made once by main() for every worker: 16 chains, of each the
# first 288 configurations the training pool (256) and validation (32), the next 64 the test set
PHI4_HMC = {"chains": 16, "therm": 500, "n_steps": 10, "step_size": 0.1}
PHI4_POOL, PHI4_VAL, PHI4_TEST, PHI4_SEED = 4096, 512, 1024, 7
PHI4_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / f"gflows-bench-symmetry-phi4-{PHI4_SEED}.pt"
CIFAR_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"


# the model settings of runs recorded before --activation and --flow existed: LipSwish residual flows
LEGACY = {"activation": "lipswish", "flow": "residual"}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(data: str, group: str, width: int, relax: float = 0.0, activation: str = "lipswish",
          flow: str = "residual", relax_to: str | None = None):
    """The model of ``data`` with ``width`` hidden channels (trivial) or regular fields; for the digits
    ``flow`` is the family, and ``activation`` is the one between the residual blocks' convolutions;
    ``relax_to`` the subgroup that relaxed filters keep exactly."""
    if data == "phi4":
        # the recommended sampler's architecture at half the depth, escnn's basis (as the configs);
        # D4 with the phi -> -phi symmetrisation: every symmetry of the action exact
        return lattice_flow(THEORY.L, n_layers=8, hidden_fields=width, group=group,
                            sign_symmetric=group != "trivial", site_spline_bins=8, momentum_scale=True,
                            relax=relax, relax_to=relax_to)
    if data == "cifar":
        return image_model("coupling", group, (3, 32, 32), n_scales=3, blocks_per_scale=2,
                           hidden_fields=width, squeeze_first=True, invconv=True, kernel_sizes=(3, 1, 3),
                           basis="orbit", relax=relax, relax_to=relax_to)
    if flow == "coupling":
        # the one grey channel is split by the mirrored checkerboard (exact for D4) in turn
        return image_model("coupling", group, (1, 8, 8), alpha=0.05, levels=LEVELS, n_scales=2,
                           blocks_per_scale=4, hidden_fields=width, squeeze_first=True, invconv=True,
                           kernel_sizes=(3, 1, 3), basis="orbit", relax=relax, relax_to=relax_to)
    return image_model("residual", group, (1, 8, 8), alpha=0.05, levels=LEVELS, n_scales=2,
                       blocks_per_scale=3, hidden_fields=width, kernel_sizes=(3, 1, 3),
                       basis="orbit", relax=relax, relax_to=relax_to, n_exact_terms=2,
                       lipschitz_kwargs={"train_iters": 5}, activation=activation)


def matched_fields(data: str, group: str, trivial_params: int, activation: str = "lipswish",
                   flow: str = "residual") -> int:
    """The width (regular fields of ``group``) whose parameter count is nearest the trivial model's
    (the count grows with the width: bisection, since every build computes bases)."""
    def count(fields: int) -> int:
        return n_params(build(data, group, fields, activation=activation, flow=flow))

    lo, hi = 1, 128
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= trivial_params else (lo, mid)
    return min((lo, hi), key=lambda f: abs(count(f) - trivial_params))


def nll(data: str, model, x: torch.Tensor) -> torch.Tensor:
    """The reported loss of each sample: bits/dim (images) or ``-log q`` per site (phi4)."""
    if data == "phi4":
        return -model.log_prob(x) / THEORY.volume
    return bits_per_dim(model.log_prob(x), x[0].numel())


@torch.no_grad()
def test_loss(data: str, model, x: torch.Tensor) -> float:
    """The mean loss over ``x`` in evaluation mode, with exact log-dets."""
    with logdet_mode(model, "exact"):
        if data == "phi4":
            model.eval()
            return float(torch.cat([nll(data, model, b) for b in x.split(512)]).mean())
        return evaluate(model, x, 512)["test_bpd"]


def batch(data: str, x: torch.Tensor, step: int, size: int, seed: int, augment: bool | str) -> torch.Tensor:
    """Training batch ``step`` (a per-epoch shuffle), each sample moved by a random symmetry of the
    data's distribution when ``augment`` is True (images: D4), or mirrored at random when it is
    ``"flip"``."""
    if data == "phi4":
        b = batch_at(x, step, size, seed, False)
        if augment:
            b = Phi4.random_symmetry(b, torch.Generator().manual_seed(seed * 1_000_003 + step))
        return b
    return batch_at(x, step, size, seed, augment == "flip", D4 if augment is True else None).float()


def start(data: str, model, x_train: torch.Tensor, size: int, seed: int) -> None:
    """Seed the run and initialise the data-dependent layers (actnorm) on the first batch."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        model.log_prob(batch(data, x_train, 0, size, seed, False))


def learning_rate(lr: float, step: int, steps: int) -> float:
    """``lr`` after a 50-step linear warm-up, under a cosine decay over ``steps``."""
    return lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))


def train(data: str, model, x_train: torch.Tensor, x_val: torch.Tensor, x_test: torch.Tensor, steps: int,
          size: int, lr: float, seed: int, augment: bool | str, eval_every: int,
          patience: int, penalty: float = 0.0,
          clip: float | None = None) -> tuple[float, float, int, int, int]:
    """Adam with warm-up and cosine decay, stopped once the validation loss has not improved for
    ``patience`` evaluations; returns (the test loss at the best validation step, that validation
    loss, the best step, the steps run, the steps whose gradient was clipped). ``penalty`` adds
    ``penalty * sum |relax V|^2`` over the relaxed filters to the training loss, as
    ``trainer.relax_penalty`` does; ``clip`` bounds the gradient's norm, as ``trainer.grad_clip``
    does (None: no clipping)."""
    start(data, model, x_train, size, seed)
    params, lipschitz = list(model.parameters()), lipschitz_layers(model)
    opt = torch.optim.Adam(params, lr=lr)
    best = (math.inf, None, 0)
    step = clipped = 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(lr, step, steps)
        loss = nll(data, model, batch(data, x_train, step, size, seed, augment)).mean()
        if penalty:
            loss = loss + penalty * symmetry_breaking_sq_norm(model)
        opt.zero_grad()
        loss.backward()
        if clip:  # a norm below the bound leaves the gradient bit-for-bit as it was
            clipped += int(torch.nn.utils.clip_grad_norm_(params, clip) > clip)
        opt.step()
        for m in lipschitz:
            m.update()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = test_loss(data, model, x_val)
            if val < best[0]:
                best = (val, copy.deepcopy(model.state_dict()), step + 1)
            elif step + 1 - best[2] >= patience * eval_every:
                break
            model.train()
    model.load_state_dict(best[1])
    return test_loss(data, model, x_test), best[0], best[2], step + 1, clipped


def _worker_init() -> None:
    # one thread each, so that two runs share 2 cores without oversubscribing OpenMP
    torch.set_num_threads(1)
    with contextlib.suppress(OSError, AttributeError):
        # a killed benchmark must not leave its workers training (Linux: PR_SET_PDEATHSIG)
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)


def splits(data: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the pool training subsets are drawn from, validation, test). Digits: validation is the last
    tenth of the training images. phi4: the HMC configurations of ``PHI4_CACHE`` (made on first use).
    cifar: likewise the last tenth of the subset's training images at ``CIFAR_ROOT``."""
    if data == "phi4":
        if not PHI4_CACHE.exists():
            train, test = hmc_dataset(THEORY, PHI4_POOL + PHI4_VAL, PHI4_TEST, PHI4_HMC, PHI4_SEED,
                                      torch.float32)
            chains = PHI4_HMC["chains"]
            per_chain = train.view(chains, -1, THEORY.L, THEORY.L)[:, :, None]
            cut = PHI4_POOL // chains
            tmp = PHI4_CACHE.with_suffix(".tmp")
            torch.save((per_chain[:, :cut].flatten(0, 1), per_chain[:, cut:].flatten(0, 1), test[:, None]),
                       tmp)
            tmp.replace(PHI4_CACHE)
        return torch.load(PHI4_CACHE)
    if data == "cifar":
        try:
            train_all, test = (load_cifar10(CIFAR_ROOT, s, verify=False)[0] for s in ("train", "test"))
        except FileNotFoundError as e:
            raise SystemExit(f"--data cifar needs the CIFAR-10 subset at {CIFAR_ROOT}: {e}") from None
    else:
        train_all, test = load_digits("train")[0], load_digits("test")[0]
    n_val = len(train_all) // 10
    return train_all[:-n_val], train_all[-n_val:], test


def run_job(job: dict) -> dict:
    """One training run, in a worker process."""
    data = job.get("data", "digits")
    pool, val, test = splits(data)
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(job["seed"]))
    x = pool[perm[: job["size"]]]
    torch.manual_seed(job["seed"])
    settings = {k: job.get(k, v) for k, v in LEGACY.items()}
    model = build(data, job["group"], job["width"], job["relax"], **settings, relax_to=job.get("relax_to"))
    t0 = time.perf_counter()
    t, v, best, ran, clipped = train(data, model, x, val, test, job["steps"], min(job["batch"], job["size"]),
                            job["lr"], job["seed"], job["augment"], job["eval_every"], job["patience"],
                            job.get("penalty", 0.0), job.get("clip", legacy_clip(data)))
    return {**job, "test": t, "val": v, "best_step": best, "steps_run": ran, "clipped_steps": clipped,
            "seconds": time.perf_counter() - t0}


def legacy_clip(data: str) -> float | None:
    """The gradient clipping of the runs recorded before ``--clip`` existed: the lattice trainer's
    ``trainer.grad_clip`` for phi4, none for the images (CIFAR-10 runs before 2026-12-07 22:30)."""
    return 100.0 if data == "phi4" else None


# per --data: the default --clip. phi4 as trainer/phi4.yaml; the digits never clipped. CIFAR-10: a
# guard against spikes only. Unclipped, the trivial model's gradient norm at seed 2 reached 5e4 in
# its warm-up and the run never recovered (the "failed starts" of the rows before 2026-12-07 22:30),
# while ordinary steps stay below about 20; trainer/cifar10.yaml's bound of 1 acts at every step of
# these models and cost the trivial one 0.08 bits/dim of training loss by step 1,200 (seed 0)
CLIP = {"digits": None, "phi4": 100.0, "cifar": 50.0}
DEFAULTS = {  # per --data: sizes, trivial width, learning rate, unit, title
    "digits": ([64, 256, 1350], 32, 2e-3, "test bits/dim (17 levels)", "D4-invariant digits"),
    "phi4": ([64, 512, 4096], 8, 3e-3, "test -log q per site", "phi^4 HMC configurations (L=8)"),
    "cifar": ([4577], 24, 3e-3, "test bits/dim", "CIFAR-10 subset (flip exact, turns broken)"),
}
# per --data: variant -> (group, augmentation, relaxed), the augmentation True for the data's symmetry
# (D4; phi4: the action's) or "flip" for mirrors, relaxed True for free filters or the subgroup they
# keep; exactly invariant data compare augmentation with the strict group, CIFAR-10 the groups (and
# relaxations) that match its symmetry more or less well
VARIANTS = {
    "digits": {"trivial": ("trivial", False, False), "trivial+aug": ("trivial", True, False),
               "d4": ("d4", False, False), "d4-relaxed": ("d4", False, True)},
    "cifar": {"trivial": ("trivial", False, False), "trivial+flip": ("trivial", "flip", False),
              "trivial+aug": ("trivial", True, False), "flip": ("flip", False, False),
              "d4": ("d4", False, False), "d4-relaxed": ("d4", False, True),
              "d4-relaxed-flip": ("d4", False, "flip")},
}
VARIANTS["phi4"] = VARIANTS["digits"]
# per --data: the questions as (label, A, B): the mean test loss of A minus B's (A None: the
# best of the other variants); augmentation against the strict group, the relaxed model against the rest
COMPARISONS = {
    "digits": [("aug - d4", "trivial+aug", "d4")],
    "phi4": [("aug - d4", "trivial+aug", "d4")],
    "cifar": [("others - relaxed", None, "d4-relaxed"), ("others - to flip", None, "d4-relaxed-flip"),
              ("flip-aug - flip", "trivial+flip", "flip"),
              ("d4-aug - d4", "trivial+aug", "d4")],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", choices=sorted(DEFAULTS), default="digits")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="training-set sizes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500, help="at most this many steps (cosine length)")
    p.add_argument("--patience", type=int, default=4, help="evaluations without a better validation")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--hidden", type=int, default=None, help="hidden channels of the trivial model")
    p.add_argument("--relax", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--penalty", type=float, nargs="+", default=[0.0],
                   help="relaxed variants: Finzi et al.'s prior, penalty x sum |relax V|^2 added to the loss "
                        "(trainer.relax_penalty), chosen on validation with relax")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--clip", type=float, default=None,
                   help="bound on the gradient's norm, 0 for none (default per data, CLIP: cifar 50, a guard "
                        "that only spikes reach; phi4 100, as trainer.grad_clip; digits none)")
    p.add_argument("--d4-fields", type=int, default=None,
                   help="the D4 width in regular fields (default: matched to the trivial parameter count)")
    p.add_argument("--activation", choices=["lipswish", "tanh"], default="lipswish",
                   help="between the digits' residual convolutions (the figures before 2026-12-05: lipswish)")
    p.add_argument("--flow", choices=["residual", "coupling"], default="residual",
                   help="the digits' flow family (the figures before 2026-12-05: residual)")
    p.add_argument("--variants", nargs="+", default=None, help="a subset of the variants (default: all)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each")
    p.add_argument("--out", type=Path, default=None,
                   help="one line per finished run; runs already there are not repeated (resume)")
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="no training: the table and one plot from the runs of these --out files (for "
                        "example sizes run with different settings)")
    a = p.parse_args()
    sizes, hidden, lr, unit, title = DEFAULTS[a.data]
    title += f" ({a.flow} flows{', tanh' if a.activation == 'tanh' else ''})" if a.data == "digits" else ""
    a.sizes, a.hidden, a.lr = a.sizes or sizes, a.hidden or hidden, a.lr or lr
    a.clip = CLIP[a.data] if a.clip is None else a.clip or None
    if a.clip is not None and a.clip < 0:
        raise SystemExit(f"--clip: a bound >= 0 (0: no clipping), got {a.clip}")
    stem = "bench_symmetry" if a.data == "digits" else f"bench_symmetry_{a.data}"
    stem += "_coupling" if a.flow == "coupling" else "_tanh" if a.activation == "tanh" else ""
    a.out = a.out or Path(f"benchmarks/{stem}.jsonl")
    a.plot = a.plot or Path(f"benchmarks/{stem}.png")
    if a.merge:
        runs = [json.loads(line) for f in a.merge for line in f.read_text().splitlines() if line.strip()]
        runs = [r for r in runs if r.get("data", "digits") == a.data]
        if not runs:
            raise SystemExit(f"--merge: no --data {a.data} runs in {', '.join(map(str, a.merge))}")
        print(header(f"{title}: the runs of {', '.join(map(str, a.merge))}"))
        summarise(a.data, runs, unit, title, a.plot)
        return
    if (a.activation != "lipswish" or a.flow != "residual") and a.data != "digits":
        raise SystemExit(f"--activation and --flow choose the digits' flow, not --data {a.data}'s")
    if a.activation != "lipswish" and a.flow != "residual":
        raise SystemExit("--activation: only the residual flow has residual convolutions")
    unknown = set(a.variants or []) - set(VARIANTS[a.data])
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)} for --data {a.data}; "
                         f"known: {', '.join(VARIANTS[a.data])}")
    if min(a.relax) <= 0:
        raise SystemExit(f"--relax: values > 0 (the strict model is its own variant), got {a.relax}")
    if min(a.penalty) < 0:
        raise SystemExit(f"--penalty: values >= 0, got {a.penalty}")
    pool, val, test = splits(a.data)
    if max(a.sizes) > len(pool):
        raise SystemExit(f"--sizes: at most {len(pool)} training samples (the rest is the validation split)")
    chosen = {n: v for n, v in VARIANTS[a.data].items() if a.variants is None or n in a.variants}
    model = {"activation": a.activation, "flow": a.flow}
    trivial_params = n_params(build(a.data, "trivial", a.hidden, **model))
    groups = sorted({g for g, _, _ in chosen.values()} - {"trivial"})
    widths = {"trivial": a.hidden,
              **{g: matched_fields(a.data, g, trivial_params, **model) for g in groups}}
    if a.d4_fields:
        widths["d4"] = a.d4_fields
    flow = {"phi4": "lattice coupling flow", "cifar": "coupling flow"}.get(
        a.data, f"{a.flow} flow ({a.activation})")  # only the digits' flow is chosen by --flow
    counts = ", ".join(f"{g} {n_params(build(a.data, g, w, **model))} ({w} "
                       f"{'channels' if g == 'trivial' else 'fields'})" for g, w in widths.items())
    print(header(f"{title}: {len(val)} validation, {len(test)} test; at most {a.steps} steps of batch "
                 f"{a.batch} (patience {a.patience} x {a.eval_every}), Adam {a.lr}, cosine, "
                 f"{'gradient norm clipped at ' + format(a.clip, 'g') if a.clip else 'no clipping'}, {flow}; "
                 f"parameters: {counts}; {a.workers} workers of one thread"), flush=True)
    relaxations = [(r, q) for r in a.relax for q in a.penalty]  # chosen on validation
    variants = {n: (g, widths[g], aug, relaxations if relaxed else [(0.0, 0.0)])
                for n, (g, aug, relaxed) in chosen.items()}
    common = {"steps": a.steps, "batch": a.batch, "lr": a.lr, "eval_every": a.eval_every,
              "patience": a.patience, "clip": a.clip, **model}
    jobs = [{"data": a.data, "size": s, "variant": n, "seed": seed, "group": g, "width": w, "augment": aug,
             "relax": r, **({"penalty": q} if q else {}), **common,
             **({"relax_to": chosen[n][2]} if isinstance(chosen[n][2], str) else {})}
            for s in a.sizes for n, (g, w, aug, rs) in variants.items() for seed in a.seeds for r, q in rs]

    def key(j: dict) -> tuple:
        fields = ("size", "variant", "seed", "group", "width", "augment", "relax", *common)
        data = j.get("data", "digits")
        return (data, j.get("penalty", 0.0), j.get("relax_to")) + tuple(
            j[k] if k in j else legacy_clip(data) if k == "clip" else LEGACY[k] for k in fields)

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
            print(f"size {r['size']:5d} {r['variant']:15s} seed {r['seed']} relax {r['relax']:g}"
                  f"{' penalty ' + format(r['penalty'], 'g') if r.get('penalty') else ''}: test "
                  f"{r['test']:.4f} (val {r['val']:.4f} at step {r['best_step']} of {r['steps_run']}, "
                  f"{r['clipped_steps']} clipped, "
                  f"{r['seconds']:.0f} s)", flush=True)
    summarise(a.data, [done[key(j)] for j in jobs], unit, title, a.plot)


def summarise(data: str, runs: list[dict], unit: str, title: str, plot: Path) -> None:
    """Print the table of test losses (mean +- SD over seeds; for relaxed variants the ``relax`` with
    the best validation loss at each seed) per training-set size and variant, and plot the curves."""
    sizes = sorted({r["size"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    variants = [n for n in VARIANTS[data] if any(r["variant"] == n for r in runs)]
    rows = {}
    for size in sizes:
        for name in variants:
            tests = []
            for seed in seeds:
                chosen = _chosen_on_validation(runs, size, seed, [name])  # relax chosen on validation
                if chosen:
                    tests.append(chosen["test"])
            if tests:
                spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
                rows[size, name] = (statistics.mean(tests), spread)
    print(f"{unit}, mean +- standard deviation over seeds {seeds}")
    compared = [(label, a, b) for label, a, b in COMPARISONS[data]
                if b in variants and (a in variants if a else len(variants) > 1)]
    print(f"{'size':>6} " + " ".join(f"{n:>20s}" for n in variants)
          + "".join(f" {label:>16s}" for label, _, _ in compared))
    for size in sizes:
        cells = [f"{rows[size, n][0]:11.4f} +- {rows[size, n][1]:.4f}" if (size, n) in rows else f"{'-':>20s}"
                 for n in variants]
        here = [n for n in variants if (size, n) in rows]
        for _, a, b in compared:
            if b in here and (a in here if a else len(here) > 1):
                other = rows[size, a][0] if a else min(rows[size, n][0] for n in here if n != b)
                cells.append(f"{other - rows[size, b][0]:16.4f}")
            else:
                cells.append(f"{'-':>16s}")
        print(f"{size:6d} " + " ".join(cells))
    _relaxations_chosen(runs, sizes, seeds, [n for n in variants if VARIANTS[data][n][2]])
    _plot(plot, sizes, variants, rows, unit, title)


def _chosen_on_validation(runs: list[dict], size: int, seed: int, variants: list[str]) -> dict | None:
    """Of the runs of these variants at one size and seed, the one with the best validation loss."""
    pool = [r for r in runs if (r["size"], r["seed"]) == (size, seed) and r["variant"] in variants]
    return min(pool, key=lambda r: r["val"]) if pool else None


def _relaxations_chosen(runs: list[dict], sizes, seeds, relaxed: list[str]) -> None:
    """Where several relaxed variants ran (for example free and towards the mirror), the one the
    validation split chooses at each seed among all their runs, with its test loss."""
    if len(relaxed) < 2:
        return
    print(f"relaxation chosen on validation among {', '.join(relaxed)} (variant: val / test):")
    for size in sizes:
        picks = []
        for seed in seeds:
            best = _chosen_on_validation(runs, size, seed, relaxed)
            if best:
                picks.append(f"seed {seed} {best['variant']} {best['val']:.4f} / {best['test']:.4f}")
        if picks:
            print(f"{size:6d} " + "; ".join(picks))


def _plot(path: Path, sizes, variants, rows, unit: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in variants:
        at = [s for s in sizes if (s, n) in rows]
        ax.errorbar(at, [rows[s, n][0] for s in at], yerr=[rows[s, n][1] for s in at], marker="o", capsize=3,
                    label=n)
    ax.set(xscale="log", xlabel="training samples", ylabel=unit, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

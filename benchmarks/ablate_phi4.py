"""Lattice phi^4: architecture ablation of ``lattice_flow`` at an equal number of steps or minutes.

Each variant is one JSON object of :func:`gflows.models.lattice.lattice_flow` keywords (plus
``seed``, ``preset``, ``gradient`` (``reparam`` or ``path``, see
:func:`gflows.training.lattice.reverse_kl_loss`), ``compile`` (true: through ``torch.compile``; the
compilation counts against ``--minutes``), ``equalise_filter_lr`` (see
:func:`gflows.training.optim.param_groups`), and ``batch`` / ``lr`` overriding the command
line's), trained by reverse KL for ``--steps`` Adam steps (or ``--minutes`` of wall clock each,
the cosine learning rate then following the elapsed time) with gradient clipping at 100, then
measured on 16,384 fresh samples: ESS/N and the acceptance of independence Metropolis-Hastings.
Equal steps do not depend on the load; equal minutes do, so run those alone on the machine.

    python benchmarks/ablate_phi4.py --steps 800 --lr 1e-3 \\
        '{"n_layers":16,"hidden_fields":8,"group":"trivial","sign_symmetric":false}' \\
        '{"n_layers":16,"hidden_fields":8,"group":"trivial","sign_symmetric":false,"site_spline_bins":8}'
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_machine import header  # this folder, first on sys.path when run as a script

from gflows.models.lattice import lattice_flow
from gflows.physics import Phi4, ess, independence_mh
from gflows.physics.report import log_weights
from gflows.training.lattice import compiled_sampler, reverse_kl_loss
from gflows.training.optim import param_groups
from gflows.training.schedule import cosine_decay


def run(variant: dict, steps: int, batch: int, lr0: float, samples: int,
        minutes: float | None = None) -> str:
    kw = dict(variant)
    batch, lr0 = int(kw.pop("batch", batch)), float(kw.pop("lr", lr0))
    theory = Phi4.preset(kw.pop("preset", "review"))
    estimator = kw.pop("gradient", "reparam")
    compiled = bool(kw.pop("compile", False))
    equalise = bool(kw.pop("equalise_filter_lr", False))
    torch.manual_seed(kw.pop("seed", 0))
    flow = lattice_flow(theory.L, **kw)
    groups = param_groups(flow, equalise)
    opt = torch.optim.Adam(groups, lr0, fused=True)
    params = [p for g in groups for p in g["params"]]  # walking escnn's module tree costs ms per step
    sampler, action = compiled_sampler(flow, theory.action) if compiled else (flow, theory.action)
    t0, step = time.time(), 0

    def progress() -> float:
        return step / steps if minutes is None else (time.time() - t0) / (60 * minutes)

    while (frac := progress()) < 1:
        for g in opt.param_groups:
            g["lr"] = lr0 * g["lr_multiple"] * cosine_decay(frac)
        loss, _ = reverse_kl_loss(sampler, action, batch, estimator)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 100.0)
        opt.step()
        step += 1
    seconds = time.time() - t0
    flow.eval()
    torch.manual_seed(123)
    _, lw = log_weights(flow, theory, samples)
    _, acc = independence_mh(lw, torch.Generator().manual_seed(0))
    return (f"{json.dumps(variant)}  batch {batch}  lr {lr0}  steps {step}  {seconds:.0f} s  "
            f"ESS/N {ess(lw):.4f}  MH acceptance {acc:.3f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("variants", nargs="+", help="JSON objects of lattice_flow keywords")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=16384)
    p.add_argument("--minutes", type=float, default=None, help="train each variant this long instead")
    a = p.parse_args()
    print(header(f"batch {a.batch}, lr {a.lr} cosine over "
                 + (f"{a.minutes} minutes" if a.minutes else f"{a.steps} steps")))
    for v in a.variants:
        print(run(json.loads(v), a.steps, a.batch, a.lr, a.samples, a.minutes), flush=True)


if __name__ == "__main__":
    main()

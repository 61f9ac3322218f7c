"""Training-step time of the lattice samplers, variants side by side in one process.

One reverse-KL step (path gradients, batch 64, Adam) of each configured sampler of ``configs/``
(``--flows``, default: the recommended ``lattice_coupling`` and ``lattice_g_residual``) at the
review's point, for each variant of the step's machinery:

* ``now``: the library's step (``Flow.push_and_score``'s forward recursion for ``grad log q``,
  :func:`gflows.nn.equivariant.circular_conv2d`, fused Adam);
* ``two-pass path``: ``grad log q`` from a second, density pass through the flow and its
  backward (the library's path gradient before), otherwise as now;
* ``two-pass path, autograd conv, Adam`` (the step when the fast-G-layers issue was filed, but for
  the padding by concatenation of 2026-12-01, which it was 1.23x slower than): also ``F.pad`` and
  ``F.conv2d`` differentiated by autograd, and the per-tensor Adam;
* ``reparam``: the reparameterisation estimator (no score at all), for scale;
* ``orbit basis``: now, with the orbit basis instead of escnn's;
* ``compiled`` (with ``--compiled``): ``trainer.compile=true``'s sampler (the transform through
  ``torch.compile``; its score then comes from a compiled density pass), with the cold compile time.

Steps of all variants are interleaved; the script prints the median seconds per step and each
variant's ratio to the first. ``--variants`` times other variants instead, each a comma-separated
list of Hydra overrides (for example the groups of ``flow=lattice_g_coupling``), again interleaved,
so that the ratios hold however the machine's speed moves during the run. ``--preset`` picks
the lattice (``L20`` for 20 x 20).

    python benchmarks/bench_lattice_step.py --steps 20
    python benchmarks/bench_lattice_step.py --flows lattice_g_coupling --variants group=trivial \\
        group=d4 group=d4,flow.hidden_channels=16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_machine import header  # this folder, first on sys.path when run as a script
from hydra import compose, initialize_config_dir

import gflows.nn.equivariant as equivariant
from gflows.models.config import lattice_model_from_config
from gflows.physics import Phi4
from gflows.training.lattice import compiled_sampler, reverse_kl_loss

ROOT = Path(__file__).resolve().parents[1]
NOW = equivariant.circular_conv2d


def autograd_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The periodic convolution as the layers computed it when the issue was filed: ``F.pad`` and
    ``F.conv2d``, differentiated by autograd."""
    p = w.shape[-1] // 2
    return F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), w, b)


def two_pass_path_loss(flow, action, batch: int) -> torch.Tensor:
    """The path-gradient surrogate as the library computed it before: ``grad_x (log q + S)`` from a
    density pass with the parameters held fixed."""
    x, _ = flow.sample_and_log_prob(batch)
    xd = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad((flow.log_prob(xd) + action(xd)).sum(), xd)
    return (g * x).flatten(1).sum(1).mean()


def library_loss(estimator: str):
    return lambda flow, action, batch: reverse_kl_loss(flow, action, batch, estimator)[0]


def compiled_loss(flow, action, batch: int) -> torch.Tensor:
    """``trainer.compile=true``: the path surrogate of the compiled sampler (built at the first call)."""
    if not hasattr(flow, "_compiled"):
        flow._compiled = compiled_sampler(flow, action)
        t0 = time.perf_counter()
        reverse_kl_loss(*flow._compiled, batch, "path")[0].backward()
        print(f"# compiled: first call (cold compile) {time.perf_counter() - t0:.0f} s")
    return reverse_kl_loss(*flow._compiled, batch, "path")[0]


VARIANTS = {  # name: (periodic convolution, loss, fused Adam, Hydra overrides)
    "now": (NOW, library_loss("path"), True, ["flow.basis=escnn"]),
    "two-pass path": (NOW, two_pass_path_loss, True, ["flow.basis=escnn"]),
    "two-pass path, autograd conv, Adam": (autograd_conv, two_pass_path_loss, False, ["flow.basis=escnn"]),
    "reparam": (NOW, library_loss("reparam"), True, ["flow.basis=escnn"]),
    "orbit basis": (NOW, library_loss("path"), True, ["flow.basis=auto"]),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--flows", nargs="+", default=["lattice_coupling", "lattice_g_residual"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--preset", default="review", help="lattice preset (review: L=8; L20, ...)")
    p.add_argument("--compiled", action="store_true", help="add trainer.compile=true's step")
    p.add_argument("--variants", nargs="+", default=None, metavar="OVERRIDES",
                   help="comma-separated Hydra overrides per variant, instead of the step's machinery")
    a = p.parse_args()
    variants = dict(VARIANTS) if a.variants is None else {
        v: (NOW, library_loss("path"), True, v.split(",")) for v in a.variants}
    if a.compiled:
        variants["compiled"] = (NOW, compiled_loss, True, ["flow.basis=escnn"])
    theory = Phi4.preset(a.preset)
    print(header(f"{a.preset} (L={theory.L}), batch {a.batch}, median of {a.steps} interleaved "
                 "steps after 3 warm-up steps"))
    for flow in a.flows:
        runs = {}
        for name, (conv, loss_fn, fused, overrides) in variants.items():
            with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
                cfg = compose("config", ["data=phi4", f"flow={flow}", *overrides])
            torch.manual_seed(0)
            model = lattice_model_from_config(cfg.flow, theory.L)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused)
            runs[name] = (conv, loss_fn, model, opt, [])

        def step(conv, loss_fn, model, opt) -> float:
            equivariant.circular_conv2d = conv
            t0 = time.perf_counter()
            loss = loss_fn(model, theory.action, a.batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return time.perf_counter() - t0

        for i in range(a.steps + 3):
            for conv, loss_fn, model, opt, times in runs.values():
                t = step(conv, loss_fn, model, opt)
                if i >= 3:
                    times.append(t)
        equivariant.circular_conv2d = NOW
        first = None
        for name, (*_, model, _, times) in runs.items():
            med = statistics.median(times)
            first = first or med
            n = sum(q.numel() for q in model.parameters())
            print(f"{flow:18s} {name:36s} {n:7d} params  {med:.4f} s/step  ({med / first:.2f}x the first)")


if __name__ == "__main__":
    main()

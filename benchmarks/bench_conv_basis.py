"""Training-step time of an image model with escnn's steerable basis against the orbit basis.

``GConv2d(basis='escnn')`` expands every filter from escnn's basis on every call (block-wise
products); ``basis='orbit'`` gathers it from one weight per orbit of filter entries (the same space
of filters, see :mod:`gflows.nn.equivariant`). Both models are built from the same seed, so they
start from the same filters, and take Adam steps on the same batch of real-size random images,
interleaved in one process; the script prints median seconds per step (forward, backward, Adam) and
the ratio, per group.

    python benchmarks/bench_conv_basis.py --groups flip d4 --hidden 128 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_machine import header  # this folder, first on sys.path when run as a script
from hydra import compose, initialize_config_dir

from gflows.models.config import image_model_from_config

ROOT = Path(__file__).resolve().parents[1]


def model_for(group: str, basis: str, a) -> torch.nn.Module:
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", [f"flow={a.flow}", f"group={group}", f"flow.hidden_channels={a.hidden}",
                                 f"flow.block.basis={basis}", f"seed={a.seed}"])
    torch.manual_seed(a.seed)
    return image_model_from_config(cfg.flow, cfg.data.shape, cfg.data.alpha)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    opt.zero_grad()
    (-model.log_prob(x).mean()).backward()
    opt.step()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--groups", nargs="+", default=["flip", "d4"])
    p.add_argument("--flow", default="g_coupling")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    a = p.parse_args()
    print(header(f"device {a.device}; {a.flow}, hidden {a.hidden}, batch {a.batch}, "
                 f"median of {a.steps} steps"))
    print(f"{'group':>6} {'params':>9} {'escnn s/step':>13} {'orbit s/step':>13} {'escnn/orbit':>12}")
    x = torch.randint(0, 256, (a.batch, 3, 32, 32)).float().to(a.device)
    for group in a.groups:
        models = {b: model_for(group, b, a).to(a.device) for b in ("escnn", "orbit")}
        opts = {b: torch.optim.Adam(m.parameters(), 1e-4) for b, m in models.items()}
        times: dict[str, list[float]] = {b: [] for b in models}

        for b in models:  # warm-up: ActNorm's data-dependent initialisation, allocator
            step(models[b], opts[b], x)
            step(models[b], opts[b], x)
        for _ in range(a.steps):
            for b in models:
                times[b].append(step(models[b], opts[b], x))
        med = {b: statistics.median(v) for b, v in times.items()}
        n = sum(p.numel() for p in models["orbit"].parameters())
        print(f"{group:>6} {n:9d} {med['escnn']:13.3f} {med['orbit']:13.3f} "
              f"{med['escnn'] / med['orbit']:12.2f}")


if __name__ == "__main__":
    main()

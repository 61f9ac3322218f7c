"""Hutchinson probes of the residual log-det: Rademacher against Gaussian, on a trained image model.

Loads a checkpoint of ``train.py``'s run (the overrides that built it, after ``--``) and measures,
for each probe distribution (``flow.block.probe``):

* per residual block, the variance over probes of the log-det estimate of every image of a fixed
  batch (the block's own input, every image probed, training mode: ``n_exact_terms`` plus the
  roulette), averaged over the images;
* the variance over draws of the training loss's gradient (bits/dim, every parameter, the
  configured ``probe_fraction``) at a fixed batch, as ``E |grad - mean grad|^2``: what the
  optimiser sees. It includes the dequantisation noise, which both distributions share.

Every figure is a ratio measured in this one process; no timing.

    python benchmarks/bench_probe_variance.py --checkpoint RUN/checkpoint.pt -- flow=g_residual \\
        group=d4 flow.hidden_channels=128 flow.n_scales=3 flow.blocks_per_scale=4 \\
        flow.squeeze_first=true flow.invconv=true flow.fc_blocks=0 \\
        data.root=../shared/data/cifar10-subset data.verify=false
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from gflows.data.cifar10 import load_cifar10
from gflows.models.config import image_model_from_config
from gflows.training.checkpoint import load_checkpoint
from gflows.training.images import bits_per_dim
from gflows.transforms.residual import PROBES, ResidualTransform

ROOT = Path(__file__).resolve().parents[1]


def block_variances(model, x: torch.Tensor, draws: int) -> dict[str, list[float]]:
    """Per residual block and probe distribution: the log-det estimate's variance over ``draws``
    probes at the block's input for ``x``, averaged over the images."""
    blocks = [m for m in model.modules() if isinstance(m, ResidualTransform)]
    inputs: dict[ResidualTransform, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0].detach())) for b in blocks]
    with torch.no_grad():
        model.log_prob(x)
    for h in hooks:
        h.remove()
    out: dict[str, list[float]] = {}
    for probe in PROBES:
        out[probe] = []
        for b in blocks:
            b.probe, fraction, b.probe_fraction = probe, b.probe_fraction, 1.0
            with torch.no_grad():
                lds = torch.stack([b(inputs[b])[1] for _ in range(draws)])
            b.probe_fraction = fraction
            out[probe].append(float(lds.var(0).mean()))
    return out


def gradient_variance(model, x: torch.Tensor, probe: str, draws: int) -> float:
    """``E |grad - mean grad|^2`` of the mean bits/dim's gradient over ``draws`` passes at ``x``."""
    for b in model.modules():
        if isinstance(b, ResidualTransform):
            b.probe = probe
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(draws):
        torch.manual_seed(i)
        loss = bits_per_dim(model.log_prob(x), x[0].numel()).mean()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, allow_unused=True,
                                                                         materialize_grads=True)]))
    g = torch.stack(grads)
    return float((g - g.mean(0)).pow(2).sum(1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of the run the overrides built")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--draws", type=int, default=64, help="probes per block for the estimates' variance")
    p.add_argument("--grad-draws", type=int, default=24, help="passes per probe kind for the gradient's")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights instead of the raw ones")
    p.add_argument("overrides", nargs="*", help="train.py overrides of the run")
    a = p.parse_args()
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; {time.strftime('%Y-%m-%d %H:%M')}")
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", a.overrides)
    model = image_model_from_config(cfg.flow, cfg.data.shape, cfg.data.alpha)
    state = load_checkpoint(a.checkpoint)
    model.load_state_dict({**state["model"], **state["ema"]} if a.ema else state["model"])
    model.train()
    x, _ = load_cifar10(cfg.data.root, "test", verify=False, download=False)
    x = x[: a.batch].to(model.dtype)
    torch.manual_seed(0)
    per_block = block_variances(model, x, a.draws)
    print(f"# {cfg.flow.name} ({cfg.group.name}), step {state['step']}; {a.batch} test images, "
          f"{a.draws} probes")
    print(f"{'block':>5s} {'gaussian var':>13s} {'rademacher var':>15s} {'ratio':>7s}")
    for i, (g, r) in enumerate(zip(per_block["gaussian"], per_block["rademacher"], strict=True)):
        print(f"{i:5d} {g:13.4g} {r:15.4g} {r / g:7.3f}")
    total = {probe: sum(v) for probe, v in per_block.items()}
    print(f"sum over blocks: gaussian {total['gaussian']:.4g}, rademacher {total['rademacher']:.4g}, "
          f"ratio {total['rademacher'] / total['gaussian']:.3f}")
    grad = {probe: gradient_variance(model, x, probe, a.grad_draws) for probe in ("gaussian", "rademacher")}
    print(f"training gradient E|g - Eg|^2 ({a.grad_draws} passes each, probe_fraction "
          f"{cfg.flow.block.probe_fraction}): gaussian {grad['gaussian']:.4g}, rademacher "
          f"{grad['rademacher']:.4g}, ratio {grad['rademacher'] / grad['gaussian']:.3f}")


if __name__ == "__main__":
    main()

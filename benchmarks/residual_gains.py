"""How much each residual block of an image model changes its input: ``|g(x)| / |x|`` on test images.

A residual block ``x + g(x)`` with ``Lip(g) <= c`` may move its input by up to ``c |x|``, but on data
it moves it by the *typical* gain of ``g``: the product of each layer's gain on the data it sees,
which for spectrally normalised convolutions (bounded by their worst-case frequency and
direction) and activations of slope 1/2 at zero (LipSwish) is far below the bound. A flow whose
blocks barely move their inputs is nearly linear. For every residual block of the model, in
order: ``|g(x)| / |x|`` over a batch of test images, the block's log-det in bits per dimension of
its input, and per convolution the raw filter's spectral norm over the bound (``> 1``: the
normalisation is active). ``--run`` reads a trained run (its newest checkpoint, the raw weights,
and its Hydra config, or the overrides' for runs that have none); without it the model of the
overrides at initialisation (``seed``).

    python benchmarks/residual_gains.py --run <run_dir>
    python benchmarks/residual_gains.py -- flow=g_residual group=flip flow.hidden_channels=128 \\
        flow.squeeze_first=true flow.invconv=true flow.fc_blocks=0 flow.block.activation=tanh
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gflows.data.cifar10 import load_cifar10
from gflows.models.config import image_model_from_config
from gflows.nn.lipschitz import SpectralNormalised
from gflows.training.checkpoint import load_latest
from gflows.transforms.residual import ResidualTransform

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a trained image run (else the model of the overrides, at init)")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-subset"))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    if a.run and (a.run / "hydra" / "config.yaml").exists():
        cfg = OmegaConf.load(a.run / "hydra" / "config.yaml")
    else:  # the model of the overrides (for runs made without train.py's Hydra folder, bench_cifar's)
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("config", a.overrides)
    model = image_model_from_config(cfg.flow, cfg.data.shape, cfg.data.alpha)
    if a.run:
        state, _ = load_latest(a.run / "checkpoint.pt")
        model.load_state_dict(state["model"])
    model.eval()
    x = load_cifar10(a.data, "test", verify=False)[0][: a.images].float()

    rows = []

    def record(block, inputs, output):
        h = inputs[0]
        gx = block.g(h)
        sigmas = [float(m.sigma / (m.coeff * m.input_scale)) for m in block.g.modules()
                  if isinstance(m, SpectralNormalised)]
        rows.append((float(gx.norm() / h.norm()), float(output[1].mean()) / (h[0].numel() * math.log(2)),
                     sigmas, tuple(h.shape[1:])))

    for m in model.modules():
        if isinstance(m, ResidualTransform):
            m.register_forward_hook(record)
    with torch.no_grad():
        bpd = float(-model.log_prob(x).mean()) / (x[0].numel() * math.log(2))
    print(f"# {a.run or 'initialisation'}; {a.images} test images, {bpd:.4f} bits/dim")
    print(f"{'block':>5s} {'input':>14s} {'|g|/|x|':>8s} {'log-det bpd':>12s}  raw sigma / bound per layer")
    for i, (gain, logdet, sigmas, shape) in enumerate(rows):
        print(f"{i:5d} {str(shape):>14s} {gain:8.4f} {logdet:12.4f}  {' '.join(f'{s:.2f}' for s in sigmas)}")
    gains = [r[0] for r in rows]
    print(f"mean |g|/|x| {sum(gains) / len(gains):.4f}; sum of block log-dets "
          f"{sum(r[1] * math.prod(r[3]) for r in rows) / x[0].numel():.4f} bits/dim")


if __name__ == "__main__":
    main()

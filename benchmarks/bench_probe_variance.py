"""Where the residual flow's gradient noise comes from: Hutchinson probes (Rademacher against
Gaussian), the probed fraction of the batch, the roulette's exact terms, and the batch itself.

Loads a checkpoint of ``train.py``'s run (the overrides that built it, after ``--``), in training
mode, and measures:

* per residual block, the variance over probes of the log-det estimate of every image of a fixed
  batch (the block's own input, every image probed: ``n_exact_terms`` plus the roulette), averaged
  over the images, with Gaussian and with Rademacher probes;
* the noise of the training loss's gradient (bits/dim, every parameter), ``E |g - E g|^2`` over
  passes: at one fixed batch of test images (the log-det estimator's noise plus the dequantisation
  noise), for each probe distribution and probed fraction ``q`` and, with ``--terms``, each number of
  exact terms and roulette parameter; and over successive batches of training images (the
  minibatch noise as well), for each ``q``.

Every figure comes from this one process; no timing.

    python benchmarks/bench_probe_variance.py --checkpoint RUN/checkpoint.pt --terms -- \\
        flow=g_residual group=d4 flow.hidden_channels=128 flow.n_scales=3 flow.blocks_per_scale=4 \\
        flow.squeeze_first=true flow.invconv=true flow.fc_blocks=0 \\
        data.root=../shared/data/cifar10-subset data.verify=false
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from bench_machine import header  # this folder, first on sys.path when run as a script
from hydra import compose, initialize_config_dir

from gflows.data.cifar10 import load_cifar10
from gflows.models.config import image_model_from_config
from gflows.training.checkpoint import load_checkpoint
from gflows.training.images import bits_per_dim
from gflows.transforms.residual import PROBES, ResidualTransform

ROOT = Path(__file__).resolve().parents[1]


def _blocks(model) -> list[ResidualTransform]:
    return [m for m in model.modules() if isinstance(m, ResidualTransform)]


def _set(model, **options) -> None:
    for b in _blocks(model):
        for k, v in options.items():
            setattr(b, k, v)


def block_variances(model, x: torch.Tensor, draws: int) -> dict[str, list[float]]:
    """Per residual block and probe distribution: the log-det estimate's variance over ``draws``
    probes at the block's input for ``x`` (every image probed), averaged over the images."""
    blocks = _blocks(model)
    inputs: dict[ResidualTransform, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0].detach())) for b in blocks]
    with torch.no_grad():
        model.log_prob(x)
    for h in hooks:
        h.remove()
    probe, fraction = blocks[0].probe, blocks[0].probe_fraction
    out: dict[str, list[float]] = {}
    for kind in PROBES:
        _set(model, probe=kind, probe_fraction=1.0)
        with torch.no_grad():
            out[kind] = [float(torch.stack([b(inputs[b])[1] for _ in range(draws)]).var(0).mean())
                         for b in blocks]
    _set(model, probe=probe, probe_fraction=fraction)
    return out


def gradient_noise(model, batches: Sequence[torch.Tensor]) -> tuple[float, float]:
    """``E |g - E g|^2`` and ``|E g|^2`` of the mean bits/dim's gradient, one pass per batch (seeded
    by its position)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i, x in enumerate(batches):
        torch.manual_seed(i)
        loss = bits_per_dim(model.log_prob(x), x[0].numel()).mean()
        grad = torch.autograd.grad(loss, params, materialize_grads=True)
        grads.append(torch.cat([g.flatten() for g in grad]))
    g = torch.stack(grads)
    return float((g - g.mean(0)).pow(2).sum(1).mean()), float(g.mean(0).pow(2).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of the run the overrides built")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--draws", type=int, default=64, help="probes per block for the estimates' variance")
    p.add_argument("--passes", type=int, default=24, help="gradient passes per setting")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    p.add_argument("--terms", action="store_true",
                   help="also vary n_exact_terms and geom_p (Gaussian probes)")
    p.add_argument("overrides", nargs="*", help="train.py overrides of the run")
    a = p.parse_args()
    print(header())
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", a.overrides)
    model = image_model_from_config(cfg.flow, cfg.data.shape, cfg.data.alpha)
    state = load_checkpoint(a.checkpoint)
    model.load_state_dict(state["model"])
    model.train()
    test_x, _ = load_cifar10(cfg.data.root, "test", verify=False, download=False)
    x = test_x[: a.batch].to(model.dtype)
    train_x, _ = load_cifar10(cfg.data.root, "train", verify=False, download=False)
    fresh = [train_x[i * a.batch:(i + 1) * a.batch].to(model.dtype) for i in range(a.passes)]
    base = {k: getattr(_blocks(model)[0], k) for k in ("probe", "probe_fraction", "n_exact_terms", "geom_p")}
    print(f"# {cfg.flow.name} ({cfg.group.name}), step {state['step']}, batch {a.batch}; "
          f"as configured: {base}")

    torch.manual_seed(0)
    per_block = block_variances(model, x, a.draws)
    print(f"\nlog-det estimate's variance per image, {a.draws} probes, every image probed")
    print(f"{'block':>5s} {'gaussian':>11s} {'rademacher':>11s} {'ratio':>7s}")
    for i, (g, r) in enumerate(zip(per_block["gaussian"], per_block["rademacher"], strict=True)):
        print(f"{i:5d} {g:11.4g} {r:11.4g} {r / g:7.3f}")
    total = {probe: sum(v) for probe, v in per_block.items()}
    print(f"{'sum':>5s} {total['gaussian']:11.4g} {total['rademacher']:11.4g} "
          f"{total['rademacher'] / total['gaussian']:7.3f}")

    print(f"\ngradient noise E|g - Eg|^2 over {a.passes} passes (|Eg|^2 in brackets)")
    print(f"{'q':>6s} {'fixed batch, gaussian':>24s} {'fixed, rademacher':>24s} "
          f"{'new batches, gaussian':>24s}")
    for q in a.fractions:
        _set(model, probe_fraction=q, probe="gaussian")
        gauss = gradient_noise(model, [x] * a.passes)
        _set(model, probe="rademacher")
        rad = gradient_noise(model, [x] * a.passes)
        _set(model, probe="gaussian")
        new = gradient_noise(model, fresh)
        print(f"{q:6.3f} " + " ".join(f"{v:12.4g} ({m:8.3g})" for v, m in (gauss, rad, new)))
    _set(model, **base)
    if a.terms:
        print(f"\nfixed batch, Gaussian probes, q = {base['probe_fraction']}: E|g - Eg|^2 by the "
              "roulette's settings")
        for n, geom in ((2, 0.5), (3, 0.5), (4, 0.5), (6, 0.5), (2, 0.25), (2, 0.75)):
            _set(model, n_exact_terms=n, geom_p=geom, probe="gaussian")
            print(f"n_exact_terms {n}, geom_p {geom}: {gradient_noise(model, [x] * a.passes)[0]:.4g}")
        _set(model, **base)


if __name__ == "__main__":
    main()

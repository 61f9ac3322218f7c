"""Maximum likelihood on images: the objective of ``python train.py data=cifar10 flow=...``.

The loss of a step is the bits per dimension of a batch (dequantisation and logit log-dets
counted); the batches come from a per-epoch shuffle fixed by ``(seed, step)``, so a resumed or
multi-process run sees the same batches. At the end: test bits/dim (also averaged over the group
orbit) and a grid of samples.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gflows._checks import is_count, is_number
from gflows.data.cifar10 import load_cifar10
from gflows.data.digits import load_digits
from gflows.equivariance import density_gaps
from gflows.flow import Flow
from gflows.groups import Group, get_group
from gflows.models.config import image_model_from_config
from gflows.training.distributed import Dist, device_of, reseed_for_step
from gflows.training.engine import StepLoss, data_dtype
from gflows.transforms.residual import logdet_mode

__all__ = ["ImageTask", "batch_at", "bits_per_dim", "evaluate"]


#: data set -> ``(cfg.data, split) -> (images, labels)``
LOADERS = {
    "cifar10": lambda d, split: load_cifar10(d.root, split, verify=d.verify, download=d.download),
    "digits": lambda d, split: load_digits(split, d.symmetry, d.test_size, d.split_seed),
}


def bits_per_dim(log_prob: Tensor, dims: int) -> Tensor:
    """``-log p / (D ln 2)``: ``log_prob`` already counts dequantisation and logit log-dets."""
    return -log_prob / (dims * math.log(2))


def batch_at(x: Tensor, step: int, batch_size: int, seed: int, hflip: bool,
             augment: Group | None = None) -> Tensor:
    """Batch ``step`` of a per-epoch shuffle that depends only on (seed, step): resumable. With
    ``hflip`` half the images are mirrored; with ``augment`` each image is moved by a random element
    of that group."""
    per_epoch = max(1, len(x) // batch_size)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    idx = torch.randperm(len(x), generator=g)[i * batch_size : (i + 1) * batch_size]
    b = x[idx].float()
    if hflip:
        flip = torch.rand(len(b), generator=g) < 0.5
        b[flip] = torch.flip(b[flip], (-1,))
    if augment is not None:
        b = augment.random_act(b, g)
    return b


@torch.no_grad()
def evaluate(model: Flow, x: Tensor, batch_size: int, group: Group | None = None) -> dict[str, float]:
    """Test bits/dim over all of ``x`` (eval mode: more exact log-det terms), and averaged over
    the group orbit: ``log (1/|G|) sum_g p(g . x)``."""
    model.eval()
    dims = x[0].numel()
    total, orbit_total = 0.0, 0.0
    orbit = group is not None and group.order > 1
    for i in range(0, len(x), batch_size):
        b = x[i : i + batch_size].to(device=model.device, dtype=model.dtype)
        total += float(bits_per_dim(model.log_prob(b), dims).sum())
        if orbit:
            lps = torch.stack([model.log_prob(group.act(g, b)) for g in group.grid_elements])
            orbit_total += float(bits_per_dim(torch.logsumexp(lps, 0) - math.log(len(lps)), dims).sum())
    return {"test_bpd": total / len(x)} | ({"test_bpd_orbit": orbit_total / len(x)} if orbit else {})


def _check_sizes(cfg) -> None:
    """Name a training or test limit, or a sample count or temperature, out of range."""
    for split in ("train", "test"):
        limit = cfg.data.get(f"limit_{split}")
        if limit is not None and not is_count(limit, 1):
            raise ValueError(f"data.limit_{split} must be a whole number >= 1 (or null: every image), "
                             f"got {limit!r}")
    n, temperature = cfg.sample.n, cfg.sample.temperature
    if not (is_count(n, 1) and is_number(temperature, 0)):
        raise ValueError(f"sample.n must be a whole number >= 1 and sample.temperature a number > 0, "
                         f"got {n!r} and {temperature!r}")


class ImageTask:
    """The image objective, evaluation and sampling for a run's ``cfg`` (see ``configs/``)."""

    loss_name = "loss_bpd"
    resume_keys = ("seed", "data.name", "data.symmetry", "data.split_seed", "data.test_size", "data.levels",
                   "data.alpha", "data.hflip", "data.augment", "data.limit_train")

    def __init__(self, cfg):
        if cfg.init_from:
            raise ValueError(f"init_from={cfg.init_from}: transfer between lattice sizes is for data=phi4")
        if cfg.trainer.get("compile"):
            raise ValueError("trainer.compile is for data=phi4: compiled image steps were no faster on CPU "
                             "after minutes of compiling (benchmarks/bench_compile_image.py)")
        self.cfg = cfg
        self.group = get_group(cfg.flow.group)
        self.augment = get_group(cfg.data.augment) if cfg.data.augment else None
        if self.augment is not None:
            self.augment.check_exact(f"data.augment={cfg.data.augment}")
            self.augment.check_grid(*cfg.data.shape[1:], f"data.augment={cfg.data.augment}")
        if cfg.data.name not in LOADERS:
            raise ValueError(f"unknown image data set {cfg.data.name!r}: expected one of {sorted(LOADERS)}")
        dtype = data_dtype(cfg.data.dtype)
        _check_sizes(cfg)
        self.model = image_model_from_config(cfg.flow, cfg.data.shape, cfg.data.alpha, cfg.data.levels)
        self.model.to(device=device_of(cfg.device), dtype=dtype)
        self.dims = math.prod(cfg.data.shape)
        self.label = f"{cfg.flow.name}/{self.group.name}"
        self._train: Tensor | None = None

    def data(self, split: str) -> Tensor:
        d = self.cfg.data
        x, _ = LOADERS[d.name](d, split)
        limit = d.get(f"limit_{split}")
        if limit is not None and limit > len(x):
            raise ValueError(f"data.limit_{split}={limit}: {d.name} has only {len(x)} {split} images")
        x = x[:limit] if limit is not None else x
        top = int(x.max()) if len(x) else 0
        if top >= d.levels:
            raise ValueError(f"data.levels={d.levels}, but the {d.name} {split} images hold values up to "
                             f"{top}: set data.levels to at least {top + 1}")
        print(f"data: read {len(x)} {split} images of {d.name}")
        return x

    def _batch(self, step: int, dd: Dist, hflip: bool, augment: Group | None = None) -> Tensor:
        t = self.cfg.trainer
        if t.batch_size % dd.world:
            raise ValueError(f"trainer.batch_size {t.batch_size} does not split over {dd.world} processes")
        if self._train is None:
            self._train = self.data("train")
        x = dd.shard(batch_at(self._train, step, t.batch_size, self.cfg.seed, hflip, augment))
        return x.to(device=self.model.device, dtype=self.model.dtype)

    def prepare(self, dd: Dist) -> None:
        with torch.no_grad():  # ActNorm's data-dependent initialisation sees the first (whole) batch
            self.model.log_prob(self._batch(0, Dist(), False))

    def loss(self, step: int, dd: Dist) -> StepLoss:
        x = self._batch(step, dd, self.cfg.data.hflip, self.augment)
        reseed_for_step(self.cfg.seed, step, dd, x.numel())  # the dequantisation noise
        loss = bits_per_dim(self.model.log_prob(x), self.dims).mean()
        return StepLoss(loss, dd.gather(loss.detach().reshape(1)).mean())

    def checkpoint_info(self) -> dict[str, Any]:
        return {}

    def check_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        pass

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """``mode=eval``: test bits/dim, also averaged over the group orbit when ``trainer.eval_orbit``."""
        t = self.cfg.trainer
        result = evaluate(model, self.data("test"), t.eval_batch_size, self.group if t.eval_orbit else None)
        print(json.dumps(result))
        return result

    def sample(self, model: nn.Module) -> dict[str, Any]:
        """``mode=sample``: a grid of ``sample.n`` samples at ``sample.temperature`` to ``sample.path``."""
        from torchvision.utils import save_image

        s = self.cfg.sample
        model.eval()
        with torch.no_grad():
            x = model.sample(s.n, temperature=s.temperature)
        Path(s.path).parent.mkdir(parents=True, exist_ok=True)
        save_image(x.float().cpu() / (self.cfg.data.levels - 1), s.path, nrow=int(math.sqrt(s.n)) or 1)
        print(f"samples: wrote {s.n} samples at temperature {s.temperature} to {s.path}")
        return {"samples": s.path}

    def symmetry(self, model: nn.Module) -> dict[str, Any]:
        """``mode=symmetry``: on the test images, the model's log-density gaps
        ``E[log p(x) - log p(g x)]`` for every element of ``symmetry_group`` (under a model trained
        without symmetry: the data's asymmetry under ``g``), and the mean absolute gap (under a
        ``G``-invariant model, its invariance error), and the mean gap, which bounds how far behind
        an exactly invariant model must be (:func:`~gflows.equivariance.density_gaps`). Residual
        models use exact log-dets for images of at most 1,024 dimensions, their eval-mode estimate
        otherwise (its noise then adds to the gaps)."""
        name = self.cfg.symmetry_group
        get_group(name).check_exact(f"symmetry_group={name}")  # gaps of off-grid turns are not exact
        model.eval()
        x = self.data("test").to(device=model.device, dtype=model.dtype)
        # residual log-dets exact (a dense Jacobian) on small images, so that gaps are not estimator noise
        exact = logdet_mode(model, "exact") if self.dims <= 1024 else contextlib.nullcontext()
        with exact:
            gaps = density_gaps(model, name, x, batch_size=self.cfg.trainer.eval_batch_size)
        dims = self.dims * math.log(2)
        print(f"log-density gaps E[log p(x) - log p(g x)] in bits/dim, {self.cfg.flow.name} "
              f"({self.group.name}), {self.cfg.data.name} test images:")
        labels = {"|gap|": "mean |gap|", "mean": "mean gap (bounds the cost of exact invariance)"}
        for g, (v, e) in gaps.items():
            print(f"  {labels.get(g, g):28s} {v / dims:+.5f} +- {e / dims:.5f}")
        return {"gaps_bpd": {g: (v / dims, e / dims) for g, (v, e) in gaps.items()}}

    def finish(self, model: nn.Module, run_dir: Path, wb) -> dict[str, Any]:
        import wandb

        result = self.evaluate(model) | self.sample(model)
        wb.log({k: v for k, v in result.items() if k.startswith("test")}
               | {"samples": wandb.Image(result["samples"])})
        return result

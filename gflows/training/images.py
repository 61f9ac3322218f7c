"""Maximum likelihood on images: the objective of ``python train.py data=cifar10 flow=...``.

The loss of a step is the bits per dimension of a batch (dequantisation and logit log-dets
counted); the batches come from a per-epoch shuffle fixed by ``(seed, step)``, so a resumed or
multi-process run sees the same batches. At the end: test bits/dim (also averaged over the group
orbit) and a grid of samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gflows.data.cifar10 import load_cifar10
from gflows.flow import Flow
from gflows.groups import Group, get_group
from gflows.models.config import image_model_from_config
from gflows.training.distributed import Dist, device_of, reseed_for_step
from gflows.training.engine import StepLoss

__all__ = ["ImageTask", "batch_at", "bits_per_dim", "evaluate"]


def bits_per_dim(log_prob: Tensor, dims: int) -> Tensor:
    """``-log p / (D ln 2)``: ``log_prob`` already counts dequantisation and logit log-dets."""
    return -log_prob / (dims * math.log(2))


def batch_at(x: Tensor, step: int, batch_size: int, seed: int, hflip: bool) -> Tensor:
    """Batch ``step`` of a per-epoch shuffle that depends only on (seed, step): resumable."""
    per_epoch = max(1, len(x) // batch_size)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    idx = torch.randperm(len(x), generator=g)[i * batch_size : (i + 1) * batch_size]
    b = x[idx].float()
    if hflip:
        flip = torch.rand(len(b), generator=g) < 0.5
        b[flip] = torch.flip(b[flip], (-1,))
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


class ImageTask:
    """The image objective, evaluation and sampling for a run's ``cfg`` (see ``configs/``)."""

    loss_name = "loss_bpd"

    def __init__(self, cfg):
        if cfg.init_from:
            raise ValueError(f"init_from={cfg.init_from}: transfer between lattice sizes is for data=phi4")
        self.cfg = cfg
        self.group = get_group(cfg.flow.group)
        self.model = image_model_from_config(cfg.flow, cfg.data.shape, cfg.data.alpha)
        self.model.to(device=device_of(cfg.device), dtype=getattr(torch, cfg.data.dtype))
        self.dims = math.prod(cfg.data.shape)
        self.label = f"{cfg.flow.name}/{self.group.name}"
        self._train: Tensor | None = None

    def data(self, split: str) -> Tensor:
        d = self.cfg.data
        x, _ = load_cifar10(d.root, split, verify=d.verify, download=d.download)
        limit = d[f"limit_{split}"]
        x = x[: int(limit)] if limit else x
        print(f"data: read {len(x)} {split} images from {d.root}")
        return x

    def _batch(self, step: int, dd: Dist, hflip: bool) -> Tensor:
        t = self.cfg.trainer
        if t.batch_size % dd.world:
            raise ValueError(f"trainer.batch_size {t.batch_size} does not split over {dd.world} processes")
        if self._train is None:
            self._train = self.data("train")
        x = dd.shard(batch_at(self._train, step, t.batch_size, self.cfg.seed, hflip))
        return x.to(device=self.model.device, dtype=self.model.dtype)

    def prepare(self, dd: Dist) -> None:
        with torch.no_grad():  # ActNorm's data-dependent initialisation sees the first (whole) batch
            self.model.log_prob(self._batch(0, Dist(), False))

    def loss(self, step: int, dd: Dist) -> StepLoss:
        x = self._batch(step, dd, self.cfg.data.hflip)
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
        save_image(x.float().cpu() / 255.0, s.path, nrow=int(math.sqrt(s.n)) or 1)
        print(f"samples: wrote {s.n} samples at temperature {s.temperature} to {s.path}")
        return {"samples": s.path}

    def finish(self, model: nn.Module, run_dir: Path, wb) -> dict[str, Any]:
        import wandb

        result = self.evaluate(model) | self.sample(model)
        wb.log({k: v for k, v in result.items() if k.startswith("test")}
               | {"samples": wandb.Image(result["samples"])})
        return result

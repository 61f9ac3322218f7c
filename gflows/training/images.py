"""Train, evaluate and sample exact-likelihood image flows from a Hydra config (see ``configs/``)."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gflows.flow import Flow
from gflows.groups import Group
from gflows.models.image import FLOW_KINDS, image_model
from gflows.nn.lipschitz import update_lipschitz
from gflows.training.checkpoint import (
    exists,
    load_latest,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gflows.training.common import (
    device_of,
    disabled,
    learning_rate,
    log_metrics,
    open_wandb,
    out_of_time,
    skip_or_restore,
    truncate_metrics,
)
from gflows.training.distributed import reseed_for_step, setup, wrap
from gflows.training.lattice import LATTICE_KINDS

__all__ = ["bits_per_dim", "build_model", "evaluate", "run"]

MODES = ("train", "eval", "sample")


def build_model(cfg) -> Flow:
    """The flow named by ``cfg.flow`` for the group of ``cfg.group`` (or ``cfg.flow.group``)."""
    if cfg.flow.kind not in FLOW_KINDS and cfg.flow.kind in LATTICE_KINDS:
        raise ValueError(f"flow={cfg.flow.name} (kind {cfg.flow.kind!r}) is not available for "
                         f"data={cfg.data.name}: it is a lattice flow (data=phi4); image flows are "
                         "flow=g_residual, residual, g_coupling, coupling, g_iaf or glow_butterfly")
    group = Group(cfg.flow.group or cfg.group.name)
    hidden_fields = max(1, int(cfg.flow.hidden_channels) // group.order)
    block = dict(cfg.flow.get("block") or {})
    if "kernel_sizes" in block:
        block["kernel_sizes"] = tuple(block["kernel_sizes"])
    if "lipschitz_kwargs" in block:
        block["lipschitz_kwargs"] = dict(block["lipschitz_kwargs"] or {})
    return image_model(
        cfg.flow.kind, group, tuple(cfg.data.shape), alpha=cfg.data.alpha, n_scales=cfg.flow.n_scales,
        blocks_per_scale=cfg.flow.blocks_per_scale, hidden_fields=hidden_fields,
        fc_blocks=int(cfg.flow.get("fc_blocks") or 0), fc_hidden=int(cfg.flow.get("fc_hidden") or 128),
        squeeze_first=bool(cfg.flow.get("squeeze_first") or False),
        invconv=bool(cfg.flow.get("invconv") or False), factor_out=bool(cfg.flow.get("factor_out") or False),
        **block,
    )


def bits_per_dim(log_prob: Tensor, dims: int) -> Tensor:
    """``-log p / (D ln 2)``: ``log_prob`` already counts dequantisation and logit log-dets."""
    return -log_prob / (dims * math.log(2))


def _data(cfg, split: str) -> Tensor:
    from gflows.data.cifar10 import load_cifar10

    if cfg.data.name != "cifar10":
        raise ValueError(f"unknown data set {cfg.data.name!r} for image training: expected 'cifar10'")
    x, _ = load_cifar10(cfg.data.root, split, verify=cfg.data.verify, download=cfg.data.download)
    limit = cfg.data.get(f"limit_{split}")
    if limit:
        x = x[: int(limit)]
    print(f"data: read {len(x)} {split} images from {cfg.data.root}")
    return x


def _batch(x: Tensor, step: int, batch_size: int, seed: int, hflip: bool) -> Tensor:
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


def _ema_update(ema: dict[str, Tensor], model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for k, p in model.named_parameters():
            ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)


def _with_ema(model: Flow, ema: dict[str, Tensor]) -> Flow:
    m = copy.deepcopy(model)
    state = m.state_dict()
    state.update(ema)
    m.load_state_dict(state)
    return m


@torch.no_grad()
def evaluate(model: Flow, x: Tensor, batch_size: int, group: Group | None = None) -> dict[str, float]:
    """Test bits/dim over all of ``x`` (eval mode: more exact log-det terms), and averaged over
    the group orbit: ``log (1/|G|) sum_g p(g . x)``."""
    model.eval()
    dims = x[0].numel()
    total, orbit_total = 0.0, 0.0
    for i in range(0, len(x), batch_size):
        b = x[i : i + batch_size].float().to(model.base._dummy.device)
        total += float(bits_per_dim(model.log_prob(b), dims).sum())
        if group is not None and group.order > 1:
            lps = torch.stack([model.log_prob(group.act(g, b)) for g in group.grid_elements])
            orbit = torch.logsumexp(lps, 0) - math.log(len(lps))
            orbit_total += float(bits_per_dim(orbit, dims).sum())
    out = {"test_bpd": total / len(x)}
    if group is not None and group.order > 1:
        out["test_bpd_orbit"] = orbit_total / len(x)
    return out


def _save_samples(model: Flow, n: int, temperature: float, path: str) -> str:
    from torchvision.utils import save_image

    model.eval()
    with torch.no_grad():
        z = model.base.sample(n, temperature)
        x, _ = model.transform.inverse(z)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(x.cpu() / 255.0, path, nrow=int(math.sqrt(n)) or 1)
    print(f"samples: wrote {n} samples at temperature {temperature} to {path}")
    return path


def run(cfg) -> dict[str, Any]:
    """Entry point of ``train.py``: train, evaluate or sample according to ``cfg.mode``."""
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}: expected one of {MODES}")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg)  # validates the flow and group settings before any data is read
    device = device_of(cfg.device)
    group = Group(cfg.flow.group or cfg.group.name)
    run_dir = Path(cfg.run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    dims = math.prod(cfg.data.shape)

    if cfg.mode in ("eval", "sample"):
        if not exists(ckpt_path):
            raise FileNotFoundError(f"no checkpoint at {ckpt_path}: train first (mode=train)")
        state, used = load_latest(ckpt_path)
        load_model_state(model, state["model"], used)
        model = _with_ema(model, state["ema"]).to(device)
        if cfg.mode == "sample":
            return {"samples": _save_samples(model, cfg.sample.n, cfg.sample.temperature, cfg.sample.path)}
        result = evaluate(model, _data(cfg, "test"), cfg.trainer.eval_batch_size, group)
        print(json.dumps(result))
        return result

    dd = setup(cfg.device)
    model.to(device)
    if cfg.trainer.batch_size % dd.world:
        raise ValueError(
            f"trainer.batch_size {cfg.trainer.batch_size} does not split over {dd.world} processes"
        )
    train_x = _data(cfg, "train")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)
    step, restores, lr_scale = 0, 0, 1.0
    metrics = run_dir / "metrics.jsonl"
    # ActNorm's data-dependent initialisation sees the first batch.
    model.train()
    with torch.no_grad():
        model.log_prob(_batch(train_x, 0, cfg.trainer.batch_size, cfg.seed, False).to(device))
    ema = {k: p.detach().clone() for k, p in model.named_parameters()}

    def load() -> dict[str, Any]:
        """Weights, optimiser and EMA from the checkpoint; the logged curve is cut back to its step."""
        state, used = load_latest(ckpt_path)
        load_model_state(model, state["model"], used)
        opt.load_state_dict(state["optimizer"])
        ema.update({k: v.to(device) for k, v in state["ema"].items()})
        if dd.main:
            truncate_metrics(metrics, state["step"])
        return state

    if cfg.resume and exists(ckpt_path):
        state = load()
        step, restores, lr_scale = state["step"], state["restores"], state["lr_scale"]
        set_rng_state(state["rng"])
        print(f"resume: continuing from step {step} of {ckpt_path}")

    def checkpoint() -> None:
        if not dd.main:
            return
        save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema,
                         "step": step, "restores": restores, "lr_scale": lr_scale, "rng": rng_state()},
                        ckpt_path)

    run_dir.mkdir(parents=True, exist_ok=True)
    wb = open_wandb(cfg if dd.main else disabled(cfg), run_dir)
    train_module = wrap(model, dd, device)
    from tqdm import tqdm

    bar = tqdm(total=cfg.trainer.steps, initial=step, desc=f"{cfg.flow.name}/{group.name}",
               disable=os.environ.get("CI") == "true" or not dd.main)
    bad, t0, last = 0, time.time(), {}
    while step < cfg.trainer.steps and not dd.any(out_of_time(cfg, t0)):
        model.train()
        lr = learning_rate(cfg, step) * lr_scale
        for pg in opt.param_groups:
            pg["lr"] = lr
        x = dd.shard(_batch(train_x, step, cfg.trainer.batch_size, cfg.seed, cfg.data.hflip)).to(device)
        reseed_for_step(cfg.seed, step, dd, x.numel())
        loss = bits_per_dim(train_module(x), dims).mean()
        if not dd.all_finite(loss):
            bad += 1
            wb.log({"skipped_step": step}, step=step)
            opt.zero_grad(set_to_none=True)
            if skip_or_restore(cfg, step, bad, restores, exists(ckpt_path)):
                step = load()["step"]
                restores, lr_scale, bad = restores + 1, lr_scale * 0.5, 0
                print(f"restored step {step} from {ckpt_path}; learning rate scaled by {lr_scale}")
            continue
        bad = 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        opt.step()
        update_lipschitz(model)
        _ema_update(ema, model, cfg.trainer.ema_decay)
        step += 1
        bar.update(1)
        bpd = float(loss.detach())
        last = {"step": step, "loss_bpd": bpd, "lr": lr, "grad_norm": float(gnorm),
                "seconds": time.time() - t0}
        bar.set_postfix(bpd=f"{bpd:.3f}")
        if dd.main:
            log_metrics(metrics, last)
        if step % cfg.trainer.log_every == 0:
            wb.log({"train/bpd": bpd, "lr": lr, "grad_norm": float(gnorm)}, step=step)
        if step % cfg.trainer.ckpt_every == 0 or step == cfg.trainer.steps:
            checkpoint()
    bar.close()
    if step < cfg.trainer.steps:
        print(f"trainer.max_minutes={cfg.trainer.max_minutes} reached at step {step}")
        checkpoint()
    dd.barrier()
    result: dict[str, Any] = {"step": step, **({"train_bpd": last["loss_bpd"]} if last else {})}
    if cfg.trainer.eval_at_end and dd.main:
        ema_model = _with_ema(model, ema)
        orbit_group = group if cfg.trainer.get("eval_orbit", True) else None
        result.update(evaluate(ema_model, _data(cfg, "test"), cfg.trainer.eval_batch_size, orbit_group))
        path = _save_samples(ema_model, cfg.sample.n, cfg.sample.temperature, cfg.sample.path)
        import wandb

        wb.log({k: v for k, v in result.items() if k.startswith("test")} | {"samples": wandb.Image(path)},
               step=step)
    wb.finish()
    print(json.dumps(result))
    return result

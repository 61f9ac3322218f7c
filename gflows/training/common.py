"""What the image and lattice trainers share: device, wandb, the learning-rate warm-up and the
logged curve that a resumed run continues."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

__all__ = [
    "cosine_decay",
    "device_of",
    "disabled",
    "learning_rate",
    "log_metrics",
    "open_wandb",
    "out_of_time",
    "skip_or_restore",
    "truncate_metrics",
]


def device_of(name: str) -> torch.device:
    """``cpu`` or ``cuda``; under torchrun each process takes the GPU of its ``LOCAL_RANK``."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}: expected 'cpu' or 'cuda'")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def open_wandb(cfg, run_dir: Path):
    """A wandb run: ``wandb.mode=auto`` is online when the user is logged in, else offline."""
    import wandb
    from omegaconf import OmegaConf

    mode = cfg.wandb.mode
    if mode == "auto":
        netrc = Path.home() / ".netrc"
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
            netrc.exists() and "api.wandb.ai" in netrc.read_text()
        )
        mode = "online" if logged_in else "offline"
    return wandb.init(project=cfg.wandb.project, dir=str(run_dir), mode=mode, reinit=True,
                      config=OmegaConf.to_container(cfg, resolve=True), name=run_dir.name)


def disabled(cfg):
    """``cfg`` with wandb disabled (the processes other than rank 0)."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    c["wandb"]["mode"] = "disabled"
    return OmegaConf.create(c)


SCHEDULES = ("constant", "cosine")


def learning_rate(cfg, step: int) -> float:
    """``trainer.lr`` with a linear warm-up over ``trainer.warmup_steps``, then constant or, with
    ``trainer.schedule=cosine``, a cosine decay to zero at ``trainer.steps``."""
    schedule = cfg.trainer.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown trainer.schedule {schedule!r}: expected one of {SCHEDULES}")
    warm = max(1, int(cfg.trainer.warmup_steps))
    lr = float(cfg.trainer.lr) * min(1.0, (step + 1) / warm)
    if schedule == "cosine":
        lr *= cosine_decay(step / max(1, int(cfg.trainer.steps)))
    return lr


def cosine_decay(progress: float) -> float:
    """The cosine schedule's factor: 1 at ``progress`` 0, 0 at 1 and after."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def out_of_time(cfg, start: float) -> bool:
    """Whether this invocation has used its ``trainer.max_minutes`` of wall clock (``null``: never).
    The budget counts from the start of the process's training loop, so a resumed run gets a new one."""
    minutes = cfg.trainer.get("max_minutes")
    return minutes is not None and time.time() - start >= 60 * float(minutes)


def log_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the logged curve up to ``step``, so a resumed run continues it without overlap."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


def skip_or_restore(cfg, step: int, bad: int, restores: int, can_restore: bool) -> bool:
    """After a non-finite loss (the ``bad``-th in a row, already kept from the weights): whether to
    restore the last checkpoint now. Raises once ``trainer.max_restores`` restores have not helped."""
    print(f"step {step}: non-finite loss skipped ({bad} in a row)")
    if bad < cfg.trainer.max_bad_steps:
        return False
    if restores >= cfg.trainer.max_restores or not can_restore:
        raise RuntimeError(f"training diverged: {bad} non-finite losses in a row at step {step}"
                           f" after {restores} restores; lower trainer.lr")
    return True

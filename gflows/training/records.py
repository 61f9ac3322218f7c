"""What a run writes as it goes: ``metrics.jsonl`` (one JSON record per step, cut back on resume
so that the curve continues without overlap) and the wandb run."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["log_metrics", "open_wandb", "read_metrics", "truncate_metrics"]


def open_wandb(cfg, run_dir: Path, enabled: bool = True):
    """A wandb run for ``cfg`` (disabled where ``enabled`` is false: the ranks other than 0).
    ``wandb.mode=auto`` is online when the user is logged in, else offline."""
    import wandb
    from omegaconf import OmegaConf

    mode = cfg.wandb.mode if enabled else "disabled"
    if mode == "auto":
        netrc = Path.home() / ".netrc"
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
            netrc.exists() and "api.wandb.ai" in netrc.read_text()
        )
        mode = "online" if logged_in else "offline"
    return wandb.init(project=cfg.wandb.project, dir=str(run_dir), mode=mode, reinit=True,
                      config=OmegaConf.to_container(cfg, resolve=True), name=run_dir.name)


def log_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the logged curve up to ``step``, so a resumed run continues it without overlap."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)

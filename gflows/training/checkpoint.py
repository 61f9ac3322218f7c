"""Atomic checkpoints that load with ``torch.load(weights_only=True)``, with the previous one kept.

Writing ``checkpoint.pt`` first keeps the existing file as ``checkpoint.prev.pt``, so a checkpoint
damaged on disk (truncated, empty, foreign content, or one that would need arbitrary unpickling)
costs at most one interval: :func:`load_latest` says which file it rejected and why, and falls back.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["exists", "load_checkpoint", "load_latest", "load_model_state", "previous", "rng_state",
           "save_checkpoint", "set_rng_state"]


def previous(path: str | Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def exists(path: str | Path) -> bool:
    """Whether ``path`` or the checkpoint kept before it exists."""
    return Path(path).exists() or previous(path).exists()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A reader (or a resumed run after SIGKILL) sees either the old or the new checkpoint, never a
    partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():  # keep it as the previous one; path itself never goes missing
            kept = tmp + ".prev"
            try:
                os.link(path, kept)
            except OSError:  # a file system without hard links
                shutil.copy2(path, kept)
            os.replace(kept, previous(path))
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp + ".prev"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The newest readable checkpoint of ``path`` and :func:`previous`, and which file it was.

    Raises:
        FileNotFoundError: neither file exists.
        ValueError: none could be read; the message names each file and why it was rejected.
    """
    rejected = []
    for candidate in (Path(path), previous(path)):
        if not candidate.exists():
            continue
        try:
            state = load_checkpoint(candidate)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a checkpoint")
        except Exception as e:  # zip, pickle and torch errors alike: the file is unusable
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                reason = "it needs unpickling of arbitrary code, which weights-only loading refuses"
            print(f"resume: rejected {candidate} ({reason})")
            rejected.append(f"{candidate}: {reason}")
            continue
        if rejected:
            print(f"resume: using the older checkpoint {candidate}")
        return state, candidate
    if not rejected:
        raise FileNotFoundError(f"no checkpoint at {path}")
    raise ValueError("no readable checkpoint: " + "; ".join(rejected))


def load_model_state(model: torch.nn.Module, state: dict[str, Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)``, refusing a checkpoint of another model with the keys named."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

        parts = [f"{name} {few(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("with other shapes", shapes)) if keys]
        raise ValueError(f"{path} holds a checkpoint of another model ({'; '.join(parts)}): set another "
                         "run_dir, or resume=false to start over there")
    model.load_state_dict(state)


def rng_state() -> dict[str, Any]:
    """Python and torch RNG states, as plain data."""
    py = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, inner, gauss = state["python"]
    random.setstate((v, tuple(inner), gauss))

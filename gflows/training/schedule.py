"""The learning-rate schedule: linear warm-up, then constant or a cosine decay."""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "cosine_decay", "learning_rate"]

SCHEDULES = ("constant", "cosine")


def learning_rate(trainer, step: int) -> float:
    """``trainer.lr`` with a linear warm-up over ``trainer.warmup_steps``, then constant or, with
    ``trainer.schedule=cosine``, a cosine decay to zero at ``trainer.steps``.

    >>> from types import SimpleNamespace as S
    >>> t = S(lr=0.1, warmup_steps=10, schedule="cosine", steps=110)
    >>> round(learning_rate(t, 55), 12), learning_rate(t, 110)
    (0.05, 0.0)
    """
    if trainer.schedule not in SCHEDULES:
        raise ValueError(f"unknown trainer.schedule {trainer.schedule!r}: expected one of {SCHEDULES}")
    warm = max(1, int(trainer.warmup_steps))
    lr = float(trainer.lr) * min(1.0, (step + 1) / warm)
    if trainer.schedule == "cosine":
        lr *= cosine_decay(step / max(1, int(trainer.steps)))
    return lr


def cosine_decay(progress: float) -> float:
    """The cosine schedule's factor: 1 at ``progress`` 0, 0 at 1 and after."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

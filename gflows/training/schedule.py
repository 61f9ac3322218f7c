"""The learning-rate schedule: linear warm-up, then constant or a cosine decay over the run's steps
or over its wall-clock budget."""

from __future__ import annotations

import math

__all__ = ["CLOCKS", "SCHEDULES", "check_schedule", "cosine_decay", "learning_rate"]

SCHEDULES = ("constant", "cosine")
CLOCKS = ("steps", "time")


def check_schedule(trainer) -> None:
    """Raise ``ValueError`` naming an unknown ``trainer.schedule`` or ``trainer.schedule_clock``, or a
    time clock without a budget."""
    if trainer.schedule not in SCHEDULES:
        raise ValueError(f"unknown trainer.schedule {trainer.schedule!r}: expected one of {SCHEDULES}")
    clock = getattr(trainer, "schedule_clock", "steps")
    if clock not in CLOCKS:
        raise ValueError(f"unknown trainer.schedule_clock {clock!r}: expected one of {CLOCKS}")
    if clock == "time" and not (trainer.max_minutes is not None and float(trainer.max_minutes) > 0):
        raise ValueError("trainer.schedule_clock=time anneals over the wall-clock budget: set "
                         f"trainer.max_minutes > 0 (got {trainer.max_minutes})")


def learning_rate(trainer, step: int, seconds: float = 0.0) -> float:
    """``trainer.lr`` with a linear warm-up over ``trainer.warmup_steps``, then constant or, with
    ``trainer.schedule=cosine``, a cosine decay to zero at ``trainer.steps``.

    With ``trainer.schedule_clock=time`` the cosine's progress is the larger of ``step / steps`` and
    ``seconds / (60 max_minutes)``, ``seconds`` being the wall clock trained so far: a run that its
    budget ends still ends annealed, however fast its steps turn out on the day.

    >>> from types import SimpleNamespace as S
    >>> t = S(lr=0.1, warmup_steps=10, schedule="cosine", steps=110)
    >>> round(learning_rate(t, 55), 12), learning_rate(t, 110)
    (0.05, 0.0)
    >>> t = S(lr=0.1, warmup_steps=10, schedule="cosine", steps=1000, schedule_clock="time", max_minutes=2)
    >>> round(learning_rate(t, 55, seconds=60.0), 12), learning_rate(t, 56, seconds=120.0)
    (0.05, 0.0)
    """
    check_schedule(trainer)
    warm = max(1, int(trainer.warmup_steps))
    lr = float(trainer.lr) * min(1.0, (step + 1) / warm)
    if trainer.schedule == "cosine":
        progress = step / max(1, int(trainer.steps))
        if getattr(trainer, "schedule_clock", "steps") == "time":
            progress = max(progress, seconds / (60 * float(trainer.max_minutes)))
        lr *= cosine_decay(progress)
    return lr


def cosine_decay(progress: float) -> float:
    """The cosine schedule's factor: 1 at ``progress`` 0, 0 at 1 and after."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

"""Input validation shared by every layer: errors name what is wrong."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_event", "check_finite", "is_count", "is_number"]


def is_count(value: object, least: int) -> bool:
    """Whether ``value`` is a whole number (a Python, NumPy or torch integer, not a bool) of at least
    ``least``."""
    return not isinstance(value, bool) and hasattr(value, "__index__") and value >= least


def is_number(value: object, above: float) -> bool:
    """Whether ``value`` is a real number (not a bool) greater than ``above``."""
    return not isinstance(value, bool) and isinstance(value, int | float) and value > above


def check_finite(x: Tensor, what: str = "input") -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or Inf (skipped inside ``torch.compile``d code, where
    a data-dependent branch would split the graph at every layer: :class:`gflows.flow.Compiled`
    checks its input before the compiled call instead)."""
    if torch.compiler.is_compiling() or x.numel() == 0:
        return
    # The sum is NaN if any entry is, and infinite if any is (or if finite entries overflow, which
    # the exact count below then clears): one reduction and one read, 5-14x cheaper than
    # isfinite(x).all() on CPU (benchmarks/bench_checks.py), and this runs in every layer.
    if not math.isfinite(x.detach().sum()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        if n_nan == n_inf == 0:
            return
        raise ValueError(f"{what} holds non-finite values ({n_nan} NaN, {n_inf} Inf)")


def check_event(x: Tensor, event_shape: Sequence[int], what: str = "input") -> None:
    """Check that ``x`` is a finite floating tensor of shape ``[batch, *event_shape]``.

    Raises:
        TypeError: if ``x`` is not a tensor or not of a floating dtype.
        ValueError: if the rank, channel count or spatial size is wrong, or ``x`` is not finite.
    """
    event_shape = tuple(event_shape)
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must have a floating dtype, got {x.dtype}")
    if x.dim() != len(event_shape) + 1:
        raise ValueError(
            f"{what} must have rank {len(event_shape) + 1} [batch, {', '.join(map(str, event_shape))}]"
            f", got rank {x.dim()} with shape {tuple(x.shape)}"
        )
    got = tuple(x.shape[1:])
    if got != event_shape:
        names = ["channels", "height", "width"] if len(event_shape) == 3 else ["size"] * len(event_shape)
        diffs = [
            f"{names[i] if i < len(names) else f'dim {i + 1}'} {got[i]} != {event_shape[i]}"
            for i in range(len(event_shape))
            if got[i] != event_shape[i]
        ]
        raise ValueError(
            f"{what} has event shape {got}, expected {event_shape} ({'; '.join(diffs)})"
        )
    check_finite(x, what)

"""The exponential moving average of the weights that the trainer evaluates with.

``ema <- decay * ema + (1 - decay) * p`` after every optimiser step (Polyak averaging with
exponential weights, as Glow's and Residual Flows' training code), written as one fused
``ema + (1 - decay) (p - ema)`` over all tensors at once, as ``torch.optim.swa_utils``'
``get_ema_multi_avg_fn`` does: one kernel per tensor group instead of two per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ema_update"]


@torch.no_grad()
def ema_update(ema: Sequence[Tensor], params: Sequence[Tensor], decay: float) -> None:
    """Move every average in ``ema`` toward its parameter in ``params``, in place.

    Args:
        ema: the averages, each of its parameter's shape, dtype and device.
        params: the current parameters, in the same order.
        decay: in ``[0, 1]``; the weight of the old average.
    """
    if len(ema) != len(params):
        raise ValueError(f"{len(ema)} averages for {len(params)} parameters")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"the EMA decay must lie in [0, 1], got {decay}")
    if ema:
        torch._foreach_lerp_(list(ema), list(params), 1.0 - decay)

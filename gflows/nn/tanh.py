r""":math:`\tanh` through the logistic function where that is the faster kernel.

:math:`\tanh x = \operatorname{sign}(x)\,(2\sigma(2|x|) - 1)`: the same function, exactly odd by
construction. On this project's 2-core CPU PyTorch's float32 ``tanh`` kernel with its backward
takes 1.2-1.7x the time of this form on a 16 x 128 x 16 x 16 tensor (``python
benchmarks/bench_pointwise.py --tanh``, three runs on 2026-12-07; the forward alone ranged from
2.6x faster to 0.7x, as the allocator served its temporaries: see benchmarks/RESULTS.md), so
float32 CPU tensors of at least :data:`LOGISTIC_FROM` entries go through it. Its absolute error
stays below ``2e-7`` (``torch.tanh``'s: ``3e-8``); the relative error grows where
:math:`|x| < 10^{-3}`, like any absolute round-off of a hidden activation. float64, other
devices, other dtypes, smaller tensors and code traced by ``torch.compile`` or ``torch.export``
use ``torch.tanh``. The derivative is :math:`1 - y^2` from the output ``y``
(``tanh_backward``), as for ``torch.tanh``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LOGISTIC_FROM", "tanh"]

#: the smallest float32 CPU tensor (entries) that takes the logistic form: below it the Function's
#: own overhead costs more than the kernel saves (2 cores: 0.58 against 0.97 ms with the backward
#: at 16 x 128 x 16 x 16, 0.21 against 0.22 at 16 x 128 x 8 x 8, 0.15 against 0.10 at 16 x 192 x 4 x 4)
LOGISTIC_FROM = 1 << 18


def _logistic_form(x: Tensor) -> Tensor:
    s = torch.sigmoid(x.abs().mul_(2))
    return s.mul_(2).sub_(1).copysign_(x)


class _Tanh(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return _logistic_form(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(tangent, y)


def _tracing() -> bool:
    # compilers fuse torch.tanh into their own kernels, and torch.export cannot trace the Function
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def tanh(x: Tensor) -> Tensor:
    r""":math:`\tanh x`, differentiable any number of times; see the module docstring."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() < LOGISTIC_FROM or _tracing():
        return torch.tanh(x)
    return _Tanh.apply(x) if torch.is_grad_enabled() and x.requires_grad else _logistic_form(x)

r"""Plain-PyTorch copies of trained flows, for inference and for ``torch.export``.

:func:`export` deep-copies a flow (or transform) and replaces every equivariant convolution by a
:class:`PlainConv2d` holding its materialised filter: the orbit gather or escnn expansion, and for
the residual family the spectral normalisation :math:`W / \max(1, \sigma / c)` with the certified
:math:`\sigma`, are evaluated once. The copy computes the same maps, inverses and log-dets (it is the
same code minus the filter construction), has no escnn objects, and skips the layers' input checks
(shape, dtype, finiteness), whose data-dependent branches ``torch.export`` cannot trace. Its filters
are buffers: the copy is for inference, not training.

Residual blocks become :class:`PlainResidual`: the same map :math:`x + g(x)` with the exact log-det
(forward-mode derivatives along every input direction and ``slogdet``, in place of the stochastic
estimator, whose backward passes and random number of terms ``torch.export`` cannot trace) and the
fixed-point inverse as one ``torch.while_loop``. Dense Lipschitz layers become :class:`PlainLinear`.
Every family then passes ``torch.export`` in both directions (:class:`Direction` names one for it).
"""

from __future__ import annotations

import copy

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch._higher_order_ops import while_loop

from gflows.flow import Flow, Transform
from gflows.nn.equivariant import GConv2d
from gflows.nn.lipschitz import LipschitzLinear, SpectralNormalised
from gflows.transforms.residual import ResidualTransform, solve_tolerances

__all__ = ["Direction", "PlainConv2d", "PlainLinear", "PlainResidual", "export"]


class PlainConv2d(nn.Module):
    """A fixed convolution with the filter, bias, kernel size and padding of an equivariant one."""

    def __init__(self, weight: Tensor, bias: Tensor | None, padding_mode: str):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.padding_mode = padding_mode
        self.padding = weight.shape[-1] // 2

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode == "circular" and self.padding:
            p = (self.padding,) * 4
            return F.conv2d(F.pad(x, p, mode="circular"), self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


class PlainLinear(nn.Module):
    """A fixed dense layer with the (spectrally normalised) matrix and bias of a Lipschitz one."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class PlainResidual(Transform):
    r"""An exported residual block: :math:`f(x) = x + g(x)` with ``g``'s filters fixed.

    Log-det: exact, :math:`\log|\det(I + J_g(x))|` by ``slogdet`` of the Jacobian, whose columns
    :math:`J_g e_i` are forward-mode derivatives of ``g`` along the ``d`` input directions (``chunk``
    directions per evaluation of ``g`` on the batch). It costs ``d`` evaluations of ``g`` per sample
    and ``d^2`` memory: meant for lattices and small images; the training layer's stochastic
    estimator is unbiased but not a single number to export.

    Inverse: the fixed point of :math:`x \leftarrow z - g(x)` (a contraction with rate ``Lip(g) <= c``)
    iterated in one ``torch.while_loop`` until every entry moves by at most ``atol + rtol |x|``, or
    ``max_iters`` iterations: export cannot raise on data, so a caller that needs the guarantee
    checks ``|f(x) - z|``; with ``c <= 0.97`` the cap of 500 leaves a contraction of ``< 1e-6``.

    Group action: that of the exported block (``g`` is the same map).
    """

    def __init__(self, block: ResidualTransform, chunk: int = 64):
        super().__init__()
        self.g, self.event_shape = block.g, tuple(block.event_shape)
        self.atol, self.rtol = block.atol, block.rtol
        self.max_iters, self.chunk = block.max_iters, int(chunk)

    def logdet(self, x: Tensor) -> Tensor:
        """``log|det(I + J_g(x))|`` per sample, exactly."""
        b, d = x.shape[0], x[0].numel()
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        columns = []
        for start in range(0, d, self.chunk):
            e = eye[start : start + self.chunk]  # [k, d]: the directions of this pass
            k = e.shape[0]
            xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
            ts = e[:, None, :].expand(k, b, d).reshape(xs.shape)
            with fwAD.dual_level():
                tangent = fwAD.unpack_dual(self.g(fwAD.make_dual(xs, ts))).tangent
            columns.append(tangent.reshape(k, b, d))
        jac = torch.cat(columns, 0).permute(1, 2, 0)  # [b, d_out, d_in]
        return torch.linalg.slogdet(eye + jac).logabsdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x + self.g(x), self.logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        (atol, rtol), cap = solve_tolerances(self.atol, self.rtol, z.dtype), self.max_iters

        def unconverged(it: Tensor, x: Tensor, z: Tensor, excess: Tensor) -> Tensor:
            return (it < cap) & (excess > 0)

        def step(it: Tensor, x: Tensor, z: Tensor, excess: Tensor):
            new = z - self.g(x)
            excess = ((new - x).abs() - (atol + rtol * new.abs())).amax()
            return it + 1, new, z.clone(), excess

        # fresh contiguous tensors: the loop's carried inputs must match g's outputs in layout and not
        # be views (torch.export cannot trace a loop over a view of an earlier loop's output)
        z = z.clone(memory_format=torch.contiguous_format)
        start = (torch.zeros((), dtype=torch.int64, device=z.device), z.clone(), z,
                 torch.ones((), dtype=z.dtype, device=z.device))
        _, x, _, _ = while_loop(unconverged, step, start)
        return x, -self.logdet(x)


def _plain(module: nn.Module, chunk: int) -> nn.Module:
    if isinstance(module, ResidualTransform):
        return PlainResidual(module, chunk)
    with torch.no_grad():
        if isinstance(module, LipschitzLinear):
            return PlainLinear(*module.normalised())
        weight, bias = module.applied()
    return PlainConv2d(weight, bias, module.padding_mode)


def _replace(root: nn.Module, kinds: tuple[type, ...], chunk: int) -> None:
    for name, m in [(n, m) for n, m in root.named_modules() if isinstance(m, kinds)]:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, _plain(m, chunk))


def export(flow: Flow | Transform, jacobian_chunk: int = 64) -> Flow | Transform:
    """A plain-PyTorch copy of ``flow`` for inference (see the module docstring).

    The copy is in evaluation mode; so that the spectral-norm bounds are the certified ones,
    ``flow`` is evaluated once in evaluation mode first. ``jacobian_chunk``: input directions per
    forward-mode pass of an exported residual block's log-det (memory against passes).
    """
    original_mode = flow.training
    flow.eval()
    try:
        # certify the original's estimates before copying: certifying draws fresh noise, so a copy
        # certified on its own would hold another (equally valid) bound and compute another function
        with torch.no_grad():
            for m in flow.modules():
                if isinstance(m, SpectralNormalised):
                    m.normalised()
        copied = copy.deepcopy(flow)
        _replace(copied, (GConv2d, LipschitzLinear), jacobian_chunk)  # inside g first, then the blocks
        _replace(copied, (ResidualTransform,), jacobian_chunk)
        if isinstance(copied, ResidualTransform):
            copied = PlainResidual(copied, jacobian_chunk)
    finally:
        flow.train(original_mode)
    for m in copied.modules():
        if hasattr(m, "checks"):
            m.checks = False
    return copied.eval()


class Direction(nn.Module):
    """One direction of a transform as a module whose ``forward`` is that direction, for
    ``torch.export`` (which exports ``forward``): ``Direction(t, inverse=True)(z) = t.inverse(z)``."""

    def __init__(self, transform: Transform, inverse: bool = False):
        super().__init__()
        self.transform, self.inverted = transform, bool(inverse)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x) if self.inverted else self.transform(x)

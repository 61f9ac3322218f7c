r"""Spectral normalisation of the true convolution (or dense) operator.

For a convolution :math:`W` acting on inputs of shape ``[C, H, W]`` (with its padding), the
Lipschitz constant is the operator norm :math:`\sigma = \|W\|_2`, not the norm of the reshaped
kernel that ``torch.nn.utils.spectral_norm`` controls. :class:`LipschitzGConv2d` estimates
:math:`\sigma` by power iteration on :math:`W^\top W` with the layer's own padding (the adjoint is
the exact vector-Jacobian product of the linear map, so zero and circular padding are both right),
and uses the filter :math:`W / \max(1, \sigma / c)`. Dividing by a scalar keeps an equivariant
filter equivariant. :class:`LipschitzLinear` does the same for a dense matrix (the final
fully-connected blocks of Residual Flows).

The estimate is refreshed to a tolerance whenever the filter's parameters have changed (that is,
after every optimiser step), warm-started from the previous singular vectors, with more iterations
the first time. Gradients flow through :math:`\sigma = v^\top W u` as in Miyato et al. (2018).

With ``train_iters = n``, refreshes in training mode run only ``n`` warm-started iterations (as
Miyato et al. and Residual Flows do while training), which may underestimate :math:`\sigma` a
little between steps. The first of them starts from the stored :math:`v = W' u' / \|W' u'\|` of
the previous filter :math:`W'`: :math:`u \leftarrow W^\top v` applies :math:`W^\top W'` to
:math:`u'` (the alternating updates of ``torch.nn.utils.spectral_norm``), one application of the
map fewer than a full iteration of :math:`W^\top W`, and the differentiable
:math:`\sigma = v^\top W u` then gives the next :math:`v`. The first forward pass in evaluation
mode refreshes to the tolerance again, so evaluated likelihoods and samples always use the
certified bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gflows.groups import Group
from gflows.nn.equivariant import GConv2d
from gflows.nn.linearised import Linearised, linear

__all__ = ["LipschitzGConv2d", "LipschitzLinear", "SpectralNormalised", "lipschitz_layers", "operator_norm",
           "update_lipschitz"]


def _power_iteration(
    op, u: Tensor, tol: float, max_iters: int, adjoint=None, final: bool = True
) -> tuple[Tensor | None, Tensor, Tensor | None, int]:
    """Power iteration for the top singular triple of the linear map ``op`` from ``u``.

    Stops when the eigen-residual ``|W^T W u - sigma^2 u| / sigma^2`` is below ``tol``: unlike the
    change of ``sigma`` between iterations, it stays large while ``u`` still mixes in a singular
    vector whose value is close to the top one. Returns ``(sigma, u, v, iterations)`` with unit
    ``u``, ``v`` and ``op(u) = sigma v``. ``adjoint`` defaults to the exact vector-Jacobian product.
    With ``final=False`` the last application of ``op`` is left to the caller (who needs it with
    gradients anyway) and ``sigma`` and ``v`` come back as ``None``.
    """
    adjoint = _adjoint_or_vjp(op, u, adjoint)
    u = u / u.norm().clamp_min(1e-12)
    it = 0
    for it in range(1, max_iters + 1):
        v = op(u)
        sigma = v.norm().clamp_min(1e-12)
        wtw_u = adjoint(v / sigma)  # = W^T W u / sigma
        residual = float((wtw_u - sigma * u).norm() / sigma)
        u = wtw_u / wtw_u.norm().clamp_min(1e-12)
        if residual <= tol:
            break
    if not final:
        return None, u, None, it
    v = op(u)
    sigma = v.norm()
    return sigma, u, v / sigma.clamp_min(1e-12), it


def _adjoint_or_vjp(op, u: Tensor, adjoint=None):
    """``adjoint``, or the exact vector-Jacobian product of the linear map ``op`` at inputs like ``u``."""
    if adjoint is not None:
        return adjoint
    _, vjp = torch.func.vjp(op, torch.zeros_like(u))
    return lambda v: vjp(v)[0]


def operator_norm(op, shape: Sequence[int], tol: float = 1e-5, max_iters: int = 100_000,
                  generator: torch.Generator | None = None) -> float:
    """Operator 2-norm of a linear map on tensors of ``shape``, from a fresh random start."""
    u = torch.randn(*shape, generator=generator)
    sigma, *_ = _power_iteration(op, u, tol, max_iters)
    return float(sigma)


class SpectralNormalised:
    """Operator-norm bound shared by the Lipschitz layers: subclasses give the raw ``(weight, bias)``,
    the linear map ``_linear_map(x, weight)`` and, where cheaper than autograd's, its ``_adjoint``."""

    coeff: float
    #: a factor taken into the normalised weight: the layer maps ``x`` to ``W (input_scale x) + b``
    #: with ``||W||_2 <= coeff``, so that it may follow an activation whose normalising division
    #: was left out (``LipSwish(scaled=False)`` with ``1 / 1.1``); the class default serves pickles
    input_scale: float = 1.0
    tol: float
    max_iters: int
    init_iters: int
    u: Tensor
    v: Tensor
    sigma: Tensor
    initialised: Tensor

    def _init_norm(self, coeff: float, tol: float, max_iters: int, init_iters: int,
                   in_shape: Sequence[int], out_shape: Sequence[int], train_iters: int | None = None) -> None:
        if not 0 < coeff:
            raise ValueError(f"coeff must be positive, got {coeff}")
        if train_iters is not None and train_iters < 1:
            raise ValueError(f"train_iters must be a positive count or None, got {train_iters}")
        self.coeff, self.tol = float(coeff), float(tol)
        self.max_iters, self.init_iters = int(max_iters), int(init_iters)
        self.train_iters = None if train_iters is None else int(train_iters)
        self._certified = False  # whether the current estimate was refreshed to the tolerance
        self.register_buffer("u", torch.randn(1, *in_shape))
        self.register_buffer("v", torch.zeros(1, *out_shape))
        self.register_buffer("sigma", torch.ones(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self._seen: tuple | None = None
        self.last_iterations = 0

    def _raw(self) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _linear_map(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _adjoint(self, weight: Tensor):
        return None  # the exact vector-Jacobian product

    def _state(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    @torch.no_grad()
    def update(self, weight: Tensor | None = None, certify: bool | None = None, final: bool = True) -> None:
        """Refresh the singular-vector estimate for the current weight: to the tolerance, or (by
        default in training mode with ``train_iters``) with ``train_iters`` iterations.

        ``final=False`` updates ``u`` only: the caller then applies the map to it once and calls
        :meth:`_set_output`, which sets ``v`` and ``sigma``."""
        if weight is None:
            weight, _ = self._raw()
        weight = weight.detach()
        if certify is None:
            certify = not (self.training and self.train_iters)
        if not bool(self.initialised):
            certify, iters = True, self.init_iters
        else:
            iters = self.max_iters if certify else self.train_iters

        def op(x: Tensor) -> Tensor:
            return self._linear_map(x, weight)

        u = self.u.to(weight.dtype)
        adjoint = _adjoint_or_vjp(op, u, self._adjoint(weight))
        if not certify:
            # half an iteration from the stored v = W' u' / |W' u'| (W' the filter it was taken
            # with): u <- W^T v applies W^T W' to u', as a full iteration's W^T W does, with one
            # application of the map fewer
            u = adjoint(self.v.to(weight.dtype))
            iters -= 1
        # W^T W of an equivariant filter preserves each isotypic component, so a warm start that has
        # lost a component can never find a top singular vector that moved there: keep every
        # component alive with fresh noise, large enough (when certifying) that the residual test
        # cannot pass while a near-top singular value still hides in it. Quick refreshes add only a
        # little, which their few iterations cannot remove but which costs sigma only O(noise^2).
        noise = 0.3 if certify else 0.01
        u = u / u.norm().clamp_min(1e-12) + noise * torch.randn_like(u) / u.numel() ** 0.5
        sigma, u, v, n = _power_iteration(op, u, self.tol if certify else 0.0, iters, adjoint, final)
        self.u.copy_(u)
        if final:
            self.v.copy_(v)
            self.sigma.copy_(sigma)
        self.initialised.fill_(True)
        self.last_iterations = n if certify else n + 1  # the half iteration counts as one
        self._seen, self._certified = self._state(), certify

    def mark_stale(self) -> None:
        """Make the next forward pass refresh the estimate. Layers notice changed parameters by
        their version counters, which fused optimiser kernels (``Adam(fused=True)``) do not bump:
        after such a step call this (or :meth:`update`)."""
        self._seen = None

    def mark_fresh(self) -> None:
        """Declare the estimate (``u``, ``v``, ``sigma`` as they are, for example just loaded) to
        belong to the current parameters, so that the next forward pass does not refresh it: for a
        checkpoint written right after a refresh, so that a resumed run computes what an
        uninterrupted one does. A layer that never refreshed stays stale."""
        if bool(self.initialised):
            self._seen, self._certified = self._state(), False

    def normalised(self) -> tuple[Tensor, Tensor | None]:
        """Weight scaled to operator norm ``<= coeff * input_scale``, and the bias."""
        weight, bias = self._raw()
        tracked = torch.is_grad_enabled() and weight.requires_grad
        stale = self._seen != self._state() or not bool(self.initialised)
        if stale:
            # with gradients the map is applied to the new u below anyway: the refresh skips its own
            # last application (one operator application per layer and step)
            self.update(weight, final=not tracked)
        elif not self.training and not self._certified:
            self.update(weight, certify=True)
        if tracked:
            wu = self._linear_map(self.u, weight)
            if stale:
                self._set_output(wu.detach())
            # sigma = v^T W u with v = W u / |W u| held fixed: gradient v u^T (Miyato et al. 2018)
            sigma = (self.v * wu).sum()
        else:
            sigma = self.sigma
        scale = torch.clamp(sigma / self.coeff, min=1.0)
        if self.input_scale != 1.0:
            scale = scale / self.input_scale
        return weight / scale, bias

    @torch.no_grad()
    def _set_output(self, wu: Tensor) -> None:
        """``v`` and ``sigma`` from ``W u`` for the current ``u``."""
        sigma = wu.norm()
        self.v.copy_(wu / sigma.clamp_min(1e-12))
        self.sigma.copy_(sigma)

    # A copy (pickle, deepcopy) has new tensors: keep whether the estimate matched the weights, so
    # that a copy computes exactly what the original does instead of refreshing its estimate.
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_seen"] = self._seen is not None and self._seen == self._state()
        return state

    def __setstate__(self, state: dict) -> None:
        fresh = state.pop("_seen")
        super().__setstate__(state)
        self._seen = self._state() if fresh else None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._seen = None


class LipschitzGConv2d(SpectralNormalised, GConv2d):
    """A :class:`~gflows.nn.equivariant.GConv2d` whose operator norm is at most ``coeff``.

    Args:
        group, in_fields, out_fields, kernel_size, padding_mode, bias, basis, relax, relax_to: as for
            ``GConv2d``
            (a relaxed layer's bound holds for the whole filter, equivariant part and free part)
            (``basis='auto'``: one weight per orbit of filter entries where the group maps the grid
            onto itself, escnn's basis otherwise).
        input_hw: spatial size ``(H, W)`` of the inputs the operator norm is taken on.
        coeff: bound on the operator norm, ``c < 1`` for residual flows.
        tol: relative eigen-residual of ``W^T W`` at which power iteration stops.
        max_iters: iterations per refresh; ``init_iters`` for the first one.
        train_iters: with a number, refreshes in training mode run that many iterations only
            (see the module docstring); ``None``: always to the tolerance.
    """

    def __init__(
        self,
        group: str | Group,
        in_fields: tuple[int, str],
        out_fields: tuple[int, str],
        kernel_size: int = 3,
        padding_mode: str = "zeros",
        bias: bool = True,
        *,
        input_hw: Sequence[int],
        coeff: float = 0.98,
        tol: float = 1e-4,
        max_iters: int = 2000,
        init_iters: int = 5000,
        train_iters: int | None = None,
        basis: str = "auto",
        relax: float = 0.0,
        relax_to: str | Group | None = None,
    ):
        GConv2d.__init__(self, group, in_fields, out_fields, kernel_size, padding_mode, bias, basis, relax,
                         relax_to)
        h, w = (int(s) for s in input_hw)
        self._init_norm(coeff, tol, max_iters, init_iters, (self.in_channels, h, w),
                        (self.out_channels, h, w), train_iters)

    def _raw(self) -> tuple[Tensor, Tensor | None]:
        return self.expanded()

    def _linear_map(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.conv(x, weight)

    def _adjoint(self, weight: Tensor):
        # cheaper than autograd's vector-Jacobian product: one convolution (CPU backends run
        # conv_transpose2d on slow paths)
        return self.adjoint(weight)

    def applied(self) -> tuple[Tensor, Tensor | None]:
        return self.normalised()

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.normalised()
        return self.conv(x, w, b)


class LipschitzLinear(SpectralNormalised, nn.Linear):
    """A dense layer ``W x + b`` with ``||W||_2 <= coeff`` (power iteration on ``W^T W`` to ``tol``).

    Args:
        in_features, out_features, bias: as for ``torch.nn.Linear``.
        coeff, tol, max_iters, init_iters, train_iters: as for :class:`LipschitzGConv2d`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, coeff: float = 0.98,
                 tol: float = 1e-4, max_iters: int = 2000, init_iters: int = 5000,
                 train_iters: int | None = None):
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_norm(coeff, tol, max_iters, init_iters, (in_features,), (out_features,), train_iters)

    def _raw(self) -> tuple[Tensor, Tensor | None]:
        return self.weight, self.bias

    def _linear_map(self, x: Tensor, weight: Tensor) -> Tensor:
        return x @ weight.T

    def _adjoint(self, weight: Tensor):
        return lambda v: v @ weight

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.normalised()
        return F.linear(x, w, b)

    #: gives its Jacobian (:mod:`gflows.nn.linearised`)
    linearisable = True

    def linearise(self, x: Tensor) -> tuple[Tensor, Linearised]:
        """:meth:`forward`, and its Jacobian in ``x`` (the layer is linear: ``J t = W t``)."""
        w, b = self.normalised()
        w_const = w.detach()
        return F.linear(x, w, b), linear(lambda v: v @ w_const, lambda t: F.linear(t, w))


def update_lipschitz(module: nn.Module, certify: bool | None = None, lazy: bool = False) -> None:
    """Refresh the spectral-norm estimate of every Lipschitz layer in ``module``: call it after
    each optimiser step.

    Layers notice parameters changed by in-place operations (their version counters) and refresh
    in the next forward pass by themselves, but fused optimiser kernels (``Adam(fused=True)``)
    change parameters without a trace. ``lazy=True`` only marks the layers stale, so that the next
    forward pass refreshes: with gradients that refresh shares the pass's filter and its tracked
    application of the operator, the cheaper place. ``lazy=False`` refreshes now (before
    ``torch.compile``d passes, whose graph should not hold the refresh). ``certify=True`` refreshes
    to the tolerance even in training mode (see ``train_iters``).
    """
    for m in lipschitz_layers(module):
        if lazy:
            m.mark_stale()
        else:
            m.update(certify=certify)


def lipschitz_layers(module: nn.Module) -> list[SpectralNormalised]:
    """The Lipschitz layers in ``module`` (a trainer keeps the list: walking a model of escnn
    modules takes milliseconds, every step)."""
    return [m for m in module.modules() if isinstance(m, SpectralNormalised)]

r"""Invertible residual blocks and G-residual flows (Behrmann et al. 2019; Chen et al. 2019).

Map:      :math:`f(x) = x + g(x)` with :math:`\mathrm{Lip}(g) \le c < 1`.

Inverse:  the fixed point of :math:`x \leftarrow y - g(x)`, a contraction with rate
          :math:`\mathrm{Lip}(g)`, iterated to ``atol + rtol |x|``; failure to converge raises.
          Gradients of the inverse (in its input and in the parameters) come from the implicit
          function theorem: the adjoint system :math:`(I + J_g)^\top u = v` is solved by its own
          fixed-point iteration, with the same tolerance, cap and error (``_ImplicitInverse``).

Log-det:  :math:`\log\det(I + J_g) = \sum_{k\ge1} (-1)^{k+1} \operatorname{tr}(J_g^k) / k`, either

* ``'exact'``: brute-force Jacobian and ``slogdet`` (only for small inputs and tests), or
* ``'estimate'``: the unbiased Russian-roulette estimator of Residual Flows (Chen et al. 2019): the
  first ``n_exact_terms`` terms always, then :math:`N \sim \mathrm{Geometric}(p)` more, each
  reweighted by :math:`1 / P(\text{term included})`, with a Hutchinson probe
  :math:`v^\top J^k v` for the trace: Rademacher (``probe='rademacher'``, entries :math:`\pm 1`,
  Hutchinson's own) or Gaussian (Chen et al.'s). Both have :math:`E[v v^\top] = I`; for a symmetric
  ``A`` the Gaussian estimate's variance is :math:`2 \|A\|_F^2` and the Rademacher one's
  :math:`2 (\|A\|_F^2 - \sum_i A_{ii}^2)`, the diagonal's share less, never more. On the trained
  CIFAR flagship that is little: the whole roulette estimate's variance 0.96x, the training
  gradient's 0.91x with every entry probed and level with a quarter (its reweighted higher terms
  and the probed fraction dominate; ``benchmarks/bench_probe_variance.py``). Gradients use the Neumann series
  :math:`\nabla \log\det(I+J) = \mathbb{E}[\sum_k (-1)^k v^\top J^k (\nabla J) v]` (``neumann_grad``), and
  optionally the memory-saving backward pass that computes them during the forward pass. Where
  ``g`` gives its Jacobian (:mod:`gflows.nn.linearised`: stacks of G-convolutions, dense Lipschitz
  layers and their activations, group-averaged or on the un-squeezed grid), the
  series' products :math:`J^\top w` run through it without autograd, and the surrogate is
  :math:`u^\top J v` (the Neumann sum ``u`` held fixed) through its differentiable ``J v``: the same
  gradients as autograd's :math:`(J^\top u)^\top v`, without a second-order pass over backward
  operators.

  With ``probe_fraction`` ``q < 1`` a training pass probes only a random ``m = round(q B)`` of the
  ``B`` batch entries, with probes scaled by :math:`\sqrt{B/m}`, and the rest with ``v = 0``: still a
  Hutchinson probe of every entry (:math:`E[v v^\top] = I` over the draw), so each entry's estimate
  and gradient stay unbiased, with more variance, and the series' products and the surrogate's
  graph cost ``m`` entries instead of ``B`` (where ``g``'s Jacobian can restrict itself to rows,
  :attr:`~gflows.nn.linearised.Linearised.rows`; every entry otherwise). Evaluation probes all.

Group action: if :math:`g` is G-equivariant, :math:`f(h\cdot x) = h\cdot f(x)` and, since ``h`` acts by
a permutation, :math:`\log|\det J_f(h \cdot x)| = \log|\det J_f(x)|`. :class:`GResidualBlock` builds
:math:`g` from escnn steerable convolutions (``scalar -> regular -> regular -> scalar``), each
spectrally normalised to ``c`` on the true operator, with LipSwish in between (whose division by
1.1 the next convolution's filter takes), so :math:`\mathrm{Lip}(g) \le c^{L} \le c`.
:class:`GFCResidualBlock` (the fully-connected blocks that end Residual Flows' image models) takes
the group average of a dense LipSwish network with spectrally normalised matrices,
:math:`g(x) = \frac{1}{|H|}\sum_{h} h^{-1} g_0(h x)` over the grid-exact elements, exactly
equivariant to them with :math:`\mathrm{Lip}(g) \le \mathrm{Lip}(g_0) \le c^{L}`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gflows.flow import Transform
from gflows.groups import Group, get_group
from gflows.nn.equivariant import GConvNet, GroupAveraged, LipSwish, Tanh, is_channels_last
from gflows.nn.linearised import Linearised, Sequential, is_linearisable, linearise
from gflows.nn.lipschitz import LipschitzGConv2d, LipschitzLinear, SpectralNormalised
from gflows.nn.squeezed import AtFineGrid, squeezed_net

__all__ = [
    "ConvergenceError",
    "GFCResidualBlock",
    "GResidualBlock",
    "ResidualTransform",
    "logdet_mode",
    "solve_tolerances",
]

LOGDET_MODES = ("estimate", "exact")
PROBES = ("rademacher", "gaussian")


class ConvergenceError(RuntimeError):
    """The fixed-point inverse did not reach its tolerance."""


def solve_tolerances(atol: float | None, rtol: float | None, dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` of a fixed-point solve in ``dtype``; ``None`` means the dtype's round-off
    level, ``1e-12`` in float64 and ``1e-6`` otherwise."""
    default = 1e-12 if dtype == torch.float64 else 1e-6
    return (default if atol is None else atol, default if rtol is None else rtol)


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    # summed over the event dimensions in place: a reshape would copy channels-last products
    return (a * b).sum(tuple(range(1, a.dim())))


#: batch entries: consecutive ones as a slice, or any as a 1-D integer tensor
Rows = slice | Tensor


def _count(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


def _scattered(values: Tensor, rows: Rows, b: int) -> Tensor:
    """``values`` of the entries ``rows`` placed in a batch of ``b``, zeros elsewhere (differentiable)."""
    if isinstance(rows, slice):
        return F.pad(values, (rows.start, b - rows.stop))
    return values.new_zeros(b).index_copy(0, rows, values)


def _batch_jacobian(gx: Tensor, x: Tensor, create_graph: bool, chunk: int = 256) -> Tensor:
    """``J[b] = d gx[b] / d x[b]`` for a map that treats batch entries independently."""
    b, d = x.shape[0], x[0].numel()
    rows = []
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    for start in range(0, d, chunk):
        e = eye[start : start + chunk]
        grad_out = e[:, None, :].expand(-1, b, -1).reshape(-1, *x.shape)
        (r,) = torch.autograd.grad(
            gx, x, grad_out, retain_graph=True, create_graph=create_graph, is_grads_batched=True
        )
        rows.append(r.reshape(e.shape[0], b, d).transpose(0, 1))
    return torch.cat(rows, 1)


class ResidualTransform(Transform):
    """``f(x) = x + g(x)`` for any map ``g`` with ``Lip(g) < 1``; see the module docstring.

    Args:
        g: the residual branch; it must treat batch entries independently and be a contraction.
        event_shape: shape of one sample.
        logdet: ``'estimate'`` (unbiased, stochastic) or ``'exact'`` (brute force).
        n_exact_terms: power-series terms always computed in training.
        n_exact_terms_eval: the same at evaluation (``module.eval()``), lowering the variance.
        geom_p: success probability of the geometric number of extra terms.
        neumann_grad: Neumann-series gradients instead of back-propagating through the series.
        probe_fraction: the part of the batch a training pass probes (see the module docstring);
            1 probes every entry.
        probe: the Hutchinson probes' distribution, ``'rademacher'`` or ``'gaussian'``.
        memory_saving: compute the log-det gradients in the forward pass and free the power series'
            graph (``g``'s own graph is kept, as in Chen et al.'s code); needs
            a loss that weighs every sample's log-det equally (a mean or sum of log-likelihoods).
        atol, rtol, max_iters: stopping rule of the fixed-point inverse (and of its backward solve);
            ``None``: ``1e-6`` in float32 and ``1e-12`` in float64, so that inverses hold to the
            dtype's round-off.
    """

    def __init__(
        self,
        g: nn.Module,
        event_shape: Sequence[int],
        *,
        logdet: str = "estimate",
        n_exact_terms: int = 2,
        n_exact_terms_eval: int = 10,
        geom_p: float = 0.5,
        neumann_grad: bool = True,
        memory_saving: bool = False,
        probe_fraction: float = 1.0,
        probe: str = "gaussian",
        atol: float | None = None,
        rtol: float | None = None,
        max_iters: int = 500,
    ):
        super().__init__()
        if logdet not in LOGDET_MODES:
            raise ValueError(f"unknown logdet mode {logdet!r}: expected one of {LOGDET_MODES}")
        if not 0 < geom_p < 1:
            raise ValueError(f"geom_p must lie in (0, 1), got {geom_p}")
        if not 0 < probe_fraction <= 1:
            raise ValueError(f"probe_fraction must lie in (0, 1], got {probe_fraction}")
        if probe not in PROBES:
            raise ValueError(f"unknown probe {probe!r}: expected one of {PROBES}")
        self.g = g
        self.event_shape = tuple(int(s) for s in event_shape)
        self.logdet = logdet
        self.n_exact_terms, self.n_exact_terms_eval = int(n_exact_terms), int(n_exact_terms_eval)
        self.geom_p = float(geom_p)
        self.neumann_grad, self.memory_saving = bool(neumann_grad), bool(memory_saving)
        self.probe_fraction, self.probe = float(probe_fraction), probe
        self.atol = None if atol is None else float(atol)
        self.rtol = None if rtol is None else float(rtol)
        self.max_iters = int(max_iters)
        self.last_inverse_iterations = 0

    @property
    def lipschitz_bound(self) -> float:
        """Upper bound on ``Lip(g)`` for a chain of layers: the product of the bounds of its
        spectrally normalised layers (``coeff * input_scale``) and of its activations (1, or 1.1
        for a LipSwish that leaves its division to the next layer's ``input_scale``)."""
        bounds = [m.coeff * m.input_scale for m in self.g.modules() if isinstance(m, SpectralNormalised)]
        if not bounds:
            raise ValueError("g has no spectrally normalised layers: its Lipschitz bound is unknown")
        unscaled = [m.LIPSCHITZ for m in self.g.modules() if isinstance(m, LipSwish) and not m.scaled]
        return math.prod(bounds) * math.prod(unscaled)

    # -- log-det -----------------------------------------------------------------------------

    def _roulette(self) -> tuple[int, list[float]]:
        """Number of series terms and the weight 1 / P(term k included) of each, k = 1..n."""
        n_exact = self.n_exact_terms if self.training else self.n_exact_terms_eval
        extra = int(torch.distributions.Geometric(probs=torch.tensor(self.geom_p)).sample())
        n = n_exact + extra
        # P(n_exact + N >= k) = (1 - p)^(k - n_exact) for k > n_exact.
        weights = [(1 - self.geom_p) ** -max(k - n_exact, 0) for k in range(0, n + 1)]
        return n, weights

    def _probe(self, x: Tensor, rows: Rows | None = None) -> Tensor:
        """Hutchinson probe with E[v v^T] = I (:attr:`probe`: signs or normal draws), of the entries
        ``rows`` only (the others' are 0): those scaled by ``sqrt(B / m)``, ``m`` entries probed."""
        # drawn contiguous: randn_like keeps a permuted input's strides (a squeeze's, an invertible
        # 1x1 convolution's), on which CPU sampling runs about 9x slower; then in a channels-last
        # input's layout (the same numbers in either layout), which the Jacobian's products keep
        m = x.shape[0] if rows is None else _count(rows)
        shape = (m, *x.shape[1:])
        if self.probe == "rademacher":
            v = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_().mul_(2).sub_(1)
        else:
            v = torch.randn(shape, dtype=x.dtype, device=x.device)
        if rows is not None:
            v = v * math.sqrt(x.shape[0] / m)
        return v.contiguous(memory_format=torch.channels_last) if self._runs_channels_last(x) else v

    def _probed_rows(self, x: Tensor, jac: Linearised | None) -> Rows | None:
        """The batch entries a training pass probes, ``probe_fraction`` of them, each with that
        probability, or ``None`` for all (evaluation, or a Jacobian that cannot restrict itself to
        rows): where ``m`` divides the batch, one of its ``B / m`` blocks of consecutive entries at
        random (views of the layers' saved tensors, no gathers), else ``m`` entries at random."""
        if self.probe_fraction >= 1 or not self.training or jac is None or jac.rows is None:
            return None
        b = x.shape[0]
        m = max(1, round(self.probe_fraction * b))
        if m >= b:
            return None
        if b % m == 0:
            k = int(torch.randint(b // m, ()))
            return slice(k * m, (k + 1) * m)
        return torch.randperm(b, device=x.device)[:m].sort().values

    def _series(
        self, gx: Tensor, x: Tensor, create_graph: bool, jac: Linearised | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Russian-roulette estimate and, with Neumann gradients, the surrogate for backward.
        ``jac``: ``g``'s own Jacobian at ``x`` (:func:`~gflows.nn.linearised.linearise`), for the
        terms that need no graph and for the surrogate ``u^T J v``."""
        n, weights = self._roulette()
        graph = create_graph and not self.neumann_grad
        rows = None if graph else self._probed_rows(x, jac)
        if rows is not None:
            jac = jac.rows(rows)
        v = self._probe(x, rows)
        w, estimate = v, v.new_zeros(v.shape[0])
        neumann = v if self.neumann_grad and create_graph else None
        for k in range(1, n + 1):
            if jac is not None and not graph:
                w = jac.vjp(w)
            else:
                (w,) = torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=graph)
            estimate = estimate + (-1) ** (k + 1) / k * weights[k] * _flat_dot(w, v)
            if neumann is not None:
                neumann = neumann + (-1) ** k * weights[k] * w
        surrogate = None
        if neumann is not None:
            estimate = estimate.detach()
            # the surrogate u^T J v with u the Neumann sum: its gradient is the log-det's (Chen et al.)
            if jac is not None:
                surrogate = _flat_dot(neumann.detach(), jac.jvp(v))
            else:
                (vjp,) = torch.autograd.grad(gx, x, neumann.detach(), retain_graph=True, create_graph=True)
                surrogate = _flat_dot(vjp, v)
        if rows is None:
            return estimate, surrogate
        # the entries probed with v = 0: their terms are 0
        return (_scattered(estimate, rows, x.shape[0]),
                None if surrogate is None else _scattered(surrogate, rows, x.shape[0]))

    def _exact(self, gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        jac = _batch_jacobian(gx, x, create_graph)
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        return torch.linalg.slogdet(eye + jac).logabsdet

    def _prefers_channels_last(self, x: Tensor) -> bool:
        """Whether ``g`` runs faster on ``x`` stored channels-last (``GConvNet.prefers_channels_last``)."""
        prefers = getattr(self.g, "prefers_channels_last", None)
        return prefers is not None and self.logdet == "estimate" and prefers(x)

    def _runs_channels_last(self, x: Tensor) -> bool:
        return is_channels_last(x) and self._prefers_channels_last(x)

    def _g_and_logdet(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._prefers_channels_last(x):
            # g, the probe and every Jacobian product in one layout; g(x) back in the input's
            gx, logdet = self._g_and_logdet_in(x.contiguous(memory_format=torch.channels_last))
            return gx.contiguous(), logdet
        return self._g_and_logdet_in(x)

    def _g_and_logdet_in(self, x: Tensor) -> tuple[Tensor, Tensor]:
        params = [p for p in self.g.parameters() if p.requires_grad]
        grad_needed = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        if (
            grad_needed and self.logdet == "estimate" and self.training and self.memory_saving
            and self.neumann_grad
        ):
            gx, logdet = _MemorySaving.apply(self, x, *params)
            return gx, logdet
        if not grad_needed and self.logdet == "estimate" and is_linearisable(self.g):
            # evaluation and sampling: g's own vector-Jacobian products need no graph at all
            with torch.no_grad():
                gx, jac = linearise(self.g, x)
                return gx, self._series(gx, x, False, jac)[0]
        with torch.enable_grad():
            xg = x if x.requires_grad and grad_needed else x.detach().requires_grad_(True)
            if self.logdet == "exact":
                gx = self.g(xg)
                logdet = self._exact(gx, xg, grad_needed)
            else:
                gx, jac = linearise(self.g, xg)
                estimate, surrogate = self._series(gx, xg, grad_needed, jac)
                logdet = estimate if surrogate is None else estimate + surrogate - surrogate.detach()
        if not grad_needed:
            gx, logdet = gx.detach(), logdet.detach()
        return gx, logdet

    # -- contract ----------------------------------------------------------------------------

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        gx, logdet = self._g_and_logdet(x)
        return x + gx, logdet

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(atol, rtol)`` of the fixed-point solves in ``dtype``."""
        return solve_tolerances(self.atol, self.rtol, dtype)

    def _converged(self, new: Tensor, old: Tensor) -> bool:
        atol, rtol = self.tolerances(new.dtype)
        return bool(((new - old).abs() <= atol + rtol * new.abs()).all())

    def _iterate(self, step, start: Tensor) -> tuple[Tensor, int | None]:
        """``x <- step(x)`` from ``start`` until :meth:`_converged`; the last iterate and the number of
        iterations, ``None`` where ``max_iters`` ran out (the forward solve and its adjoint)."""
        x = start
        for it in range(1, self.max_iters + 1):
            new = step(x)
            done = self._converged(new, x)
            x = new
            if done:
                return x, it
        return x, None

    def _solve(self, z: Tensor) -> Tensor:
        """The fixed point of ``x <- z - g(x)``, without gradients."""
        with torch.no_grad():
            x, it = self._iterate(lambda x: z - self.g(x), z)
            if it is None:
                residual = float((x + self.g(x) - z).abs().max())
                raise ConvergenceError(
                    f"fixed-point inverse did not converge in {self.max_iters} iterations: "
                    f"max |f(x) - y| = {residual:.3e} (atol, rtol = {self.tolerances(z.dtype)})"
                )
            if not bool(torch.isfinite(x).all()):
                raise ConvergenceError("fixed-point inverse diverged to non-finite values")
        self.last_inverse_iterations = it
        return x

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Fixed-point inverse, differentiable in ``z`` and in the parameters by implicit
        differentiation (:class:`_ImplicitInverse`), and the log-det at the solved point."""
        self.check(z)
        x = self._solve(z)
        params = [p for p in self.g.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (z.requires_grad or params):
            x = _ImplicitInverse.apply(self, z, x, *params)
        _, logdet = self._g_and_logdet(x)
        return x, -logdet


class _ImplicitInverse(torch.autograd.Function):
    r"""The solved point ``x`` of ``x + g(x) = z`` as a differentiable function of ``z`` and of the
    parameters of ``g`` (implicit function theorem).

    With ``v = dL/dx``, the adjoint ``u`` solves :math:`(I + J_g)^\top u = v`; then
    :math:`dL/dz = u` and :math:`dL/d\theta = -u^\top \partial g / \partial\theta`. ``u`` is the fixed
    point of :math:`u \leftarrow v - J_g^\top u`, a contraction with the rate ``Lip(g)`` of the forward
    solve (``J_g^T`` has the norm of ``J_g``), iterated with the block's tolerance and cap. Each
    iteration is one vector-Jacobian product at the solved point, so memory does not grow with the
    number of iterations.
    """

    @staticmethod
    def forward(ctx, block: ResidualTransform, z: Tensor, x: Tensor, *params: Tensor) -> Tensor:
        ctx.block = block
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, v: Tensor):
        (x,) = ctx.saved_tensors
        block = ctx.block
        params = [p for p in block.g.parameters() if p.requires_grad]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            gx, jac = linearise(block.g, xg)
            if jac is not None:
                vjp = jac.vjp
            else:
                def vjp(u: Tensor) -> Tensor:
                    return torch.autograd.grad(gx, xg, u, retain_graph=True)[0]

            u, it = block._iterate(lambda u: v - vjp(u), v)
            if it is None:
                residual = float((u + vjp(u) - v).abs().max())
                raise ConvergenceError(
                    f"backward solve (I + J_g)^T u = v of the fixed-point inverse did not converge in "
                    f"{block.max_iters} iterations: max |(I + J_g)^T u - v| = {residual:.3e} "
                    f"(atol, rtol = {block.tolerances(v.dtype)})"
                )
            if not bool(torch.isfinite(u).all()):
                raise ConvergenceError("backward solve of the fixed-point inverse diverged to non-finite "
                                       "values")
            grads = torch.autograd.grad(gx, params, -u, allow_unused=True) if params else ()
        return (None, u, None, *grads)


class _MemorySaving(torch.autograd.Function):
    """Residual branch and log-det whose log-det gradients are computed during the forward pass.

    The power series' graph (``n`` vector-Jacobian products deep) does not outlive the forward pass:
    the log-det gradients are stored, and only ``g``'s own graph is kept for the gradient through
    ``x + g(x)`` (Chen et al. 2019, as their reference code does).
    """

    @staticmethod
    def forward(ctx, block: ResidualTransform, x: Tensor, *params: Tensor):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            gx, jac = linearise(block.g, xg)
            estimate, surrogate = block._series(gx, xg, True, jac)
            # keep g's own graph for the backward pass; the series' graph goes with `surrogate`
            grads = torch.autograd.grad(surrogate.sum(), (xg, *params), allow_unused=True, retain_graph=True)
        ctx.block, ctx.xg, ctx.gx, ctx.grads = block, xg, gx, grads
        return gx.detach(), estimate.detach()

    @staticmethod
    def backward(ctx, grad_gx: Tensor | None, grad_logdet: Tensor | None):
        params = [p for p in ctx.block.g.parameters() if p.requires_grad]
        inputs = (ctx.xg, *params)
        if grad_gx is not None:
            dg = torch.autograd.grad(ctx.gx, inputs, grad_gx, allow_unused=True)
        else:
            dg = (None,) * len(inputs)
        out = list(dg)
        if grad_logdet is not None and bool((grad_logdet != 0).any()):
            if not torch.allclose(grad_logdet, grad_logdet[:1].expand_as(grad_logdet)):
                raise RuntimeError(
                    "memory_saving residual blocks need a loss that weighs every sample's "
                    "log-det equally (mean or sum of log_prob); set memory_saving=False"
                )
            scale = grad_logdet[0]
            shape = (-1,) + (1,) * (ctx.xg.dim() - 1)
            for i, gr in enumerate(ctx.grads):
                if gr is None:
                    continue
                extra = grad_logdet.view(shape) * gr if i == 0 else scale * gr
                out[i] = extra if out[i] is None else out[i] + extra
        ctx.grads = ctx.gx = ctx.xg = None
        return (None, *out)


#: the activations of :class:`GResidualBlock`'s branch
RESIDUAL_ACTIVATIONS = ("lipswish", "tanh")


def _tanh(n_fields: int, field_size: int) -> nn.Module:
    return Tanh()  # odd and 1-Lipschitz: keeps Lip(g) <= c^L, and g odd without biases


class GResidualBlock(ResidualTransform):
    """G-residual block ``x + g(x)`` on scalar image channels, ``g`` G-equivariant, ``Lip(g) <= c``.

    Args:
        group: symmetry group (name or :class:`~gflows.groups.Group`), e.g. ``'d4'``.
        event_shape: ``(C, H, W)`` of one sample, ``C`` scalar channels.
        hidden_fields: regular fields per hidden layer (``hidden_fields * |G|`` channels).
        kernel_sizes: kernel size of each convolution of ``g`` (Residual Flows use 3, 1, 3).
        coeff: Lipschitz bound ``c`` of every convolution; ``Lip(g) <= c^len(kernel_sizes)``.
        padding_mode: ``'zeros'`` for images, ``'circular'`` for periodic lattices.
        lipschitz_kwargs: power-iteration options (``tol``, ``max_iters``, ``init_iters``) of
            :class:`~gflows.nn.lipschitz.LipschitzGConv2d`.
        relax: relaxed equivariance of every convolution (see :class:`~gflows.nn.equivariant.GConv2d`;
            the Lipschitz bound holds for the relaxed filters); 0: exactly equivariant.
        relax_to: the subgroup the relaxed filters' free part keeps (``None``: none).
        basis: parametrisation of the filters, ``'auto'`` (one weight per orbit of filter entries for
            subgroups of D4, escnn's basis otherwise), ``'orbit'`` or ``'escnn'`` (checkpoints written
            before ``'auto'`` became the default; see :class:`~gflows.nn.equivariant.GConv2d`).
        sign_symmetric: make ``g`` odd, ``g(-x) = -g(x)`` (convolutions without biases, ``tanh``
            between them, 1-Lipschitz and odd), so that ``f`` commutes with ``x -> -x`` too (lattice
            fields with a :math:`Z_2` symmetry) and ``log|det J_f|`` is even.
        activation: between the convolutions, ``'lipswish'`` (Residual Flows') or ``'tanh'``
            (1-Lipschitz, slope 1 at 0 where LipSwish's is 1/2.2: a larger typical gain of ``g``
            for the same bound); sign-symmetric branches always use ``tanh``.
        squeeze_levels: the input has been squeezed this many times; ``g`` is then equivariant for
            the squeezed tensor's true representation: on the coarse grid with steerable kernels for
            it where every element of the group is grid-exact, else on the un-squeezed grid
            (:class:`~gflows.nn.squeezed.AtFineGrid`). Squeezing permutes entries, so the
            Lipschitz bound holds either way.
        **kwargs: log-det and inverse options of :class:`ResidualTransform`.
    """

    def __init__(
        self,
        group: str | Group,
        event_shape: Sequence[int],
        hidden_fields: int = 8,
        kernel_sizes: Sequence[int] = (3, 1, 3),
        coeff: float = 0.98,
        padding_mode: str = "zeros",
        lipschitz_kwargs: dict | None = None,
        squeeze_levels: int = 0,
        sign_symmetric: bool = False,
        basis: str = "auto",
        relax: float = 0.0,
        activation: str = "lipswish",
        relax_to: str | Group | None = None,
        **kwargs,
    ):
        if len(event_shape) != 3:
            raise ValueError(f"event_shape must be (C, H, W), got {tuple(event_shape)}")
        if activation not in RESIDUAL_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: expected one of {RESIDUAL_ACTIVATIONS}")
        r = 2**squeeze_levels
        if event_shape[0] % (r * r):
            raise ValueError(f"{event_shape[0]} channels are not whole fields of {r * r} sub-pixels")
        if not 0 < coeff < 1:
            raise ValueError(f"coeff must lie in (0, 1) for an invertible block, got {coeff}")
        c, h, w = (int(s) for s in event_shape)
        get_group(group).check_grid(h, w, "GResidualBlock")

        def make(levels: int) -> GConvNet:
            k = 2 ** (squeeze_levels - levels)  # 1 on the coarse grid, 2^L on the un-squeezed one
            conv_kwargs = {"input_hw": (h * k, w * k), "coeff": coeff, "basis": basis, "relax": relax,
                           "relax_to": relax_to, **(lipschitz_kwargs or {})}
            return GConvNet(group, c // (k * k), c // (k * k), hidden_fields, kernel_sizes, padding_mode,
                            conv=LipschitzGConv2d, conv_kwargs=conv_kwargs, squeeze_levels=levels,
                            bias=not sign_symmetric,
                            activation=_tanh if sign_symmetric or activation == "tanh" else LipSwish)

        super().__init__(squeezed_net(group, squeeze_levels, make), event_shape, **kwargs)
        self.group = get_group(group)
        self.coeff = coeff
        self.sign_symmetric = bool(sign_symmetric)



class GFCResidualBlock(ResidualTransform):
    """Fully-connected G-residual block ``x + g(x)`` on the whole event, ``Lip(g) <= c^(n_hidden+1)``.

    ``g`` is the group average (:class:`~gflows.nn.equivariant.GroupAveraged`) of a dense network
    ``Linear -> LipSwish -> ... -> Linear`` whose matrices are spectrally normalised to ``c``
    (:class:`~gflows.nn.lipschitz.LipschitzLinear`), as at the end of Residual Flows' image models
    (Chen et al. 2019); the average makes it equivariant to the grid-exact elements of ``group``.

    Args:
        group: symmetry group.
        event_shape: ``(C, H, W)`` of one sample, ``C`` scalar channels of a grid squeezed
            ``squeeze_levels`` times (the network then sees the un-squeezed grid).
        hidden: width of the hidden layers.
        n_hidden: number of hidden layers.
        coeff: Lipschitz bound of every matrix.
        lipschitz_kwargs: power-iteration options of :class:`~gflows.nn.lipschitz.LipschitzLinear`.
        squeeze_levels: how many times the input has been squeezed.
        **kwargs: log-det and inverse options of :class:`ResidualTransform`.
    """

    def __init__(
        self,
        group: str | Group,
        event_shape: Sequence[int],
        hidden: int = 128,
        n_hidden: int = 2,
        coeff: float = 0.98,
        lipschitz_kwargs: dict | None = None,
        squeeze_levels: int = 0,
        **kwargs,
    ):
        if len(event_shape) != 3:
            raise ValueError(f"event_shape must be (C, H, W), got {tuple(event_shape)}")
        if not 0 < coeff < 1:
            raise ValueError(f"coeff must lie in (0, 1) for an invertible block, got {coeff}")
        if hidden < 1 or n_hidden < 0:
            raise ValueError(f"need hidden >= 1 and n_hidden >= 0, got {hidden}, {n_hidden}")
        r = 2**squeeze_levels
        c, h, w = int(event_shape[0]), int(event_shape[1]), int(event_shape[2])
        get_group(group).check_grid(h, w, "GFCResidualBlock")
        if c % (r * r):
            raise ValueError(f"{c} channels are not whole fields of {r * r} sub-pixels")
        fine = (c // (r * r), h * r, w * r)
        sizes = [math.prod(fine)] + [hidden] * n_hidden + [math.prod(fine)]
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(len(sizes) - 1):
            layers.append(LipschitzLinear(sizes[i], sizes[i + 1], coeff=coeff, **(lipschitz_kwargs or {})))
            if i < len(sizes) - 2:
                layers.append(LipSwish(sizes[i + 1]))
        layers.append(nn.Unflatten(1, fine))
        g: nn.Module = GroupAveraged(group, Sequential(*layers))
        if squeeze_levels:
            g = AtFineGrid(g, squeeze_levels)
        super().__init__(g, event_shape, **kwargs)
        self.group = get_group(group)
        self.coeff = coeff


@contextmanager
def logdet_mode(module: nn.Module, mode: str):
    """Temporarily set the log-det mode (``'exact'`` or ``'estimate'``) of every residual block."""
    if mode not in LOGDET_MODES:
        raise ValueError(f"unknown logdet mode {mode!r}: expected one of {LOGDET_MODES}")
    blocks = [m for m in module.modules() if isinstance(m, ResidualTransform)]
    old = [b.logdet for b in blocks]
    try:
        for b in blocks:
            b.logdet = mode
        yield module
    finally:
        for b, o in zip(blocks, old, strict=True):
            b.logdet = o
